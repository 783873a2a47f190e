"""Writes `tiny_imagenet.json`: a seeded 120/40/40 class split of Tiny-ImageNet.

The 200 wnids of `wnids.txt` are ordered by the SHA-256 hex digest of
`'<seed>:<wnid>'` (independent of library versions and platforms); the first
120 are meta-train, the next 40 meta-validation, the last 40 meta-test. Each
list is stored sorted.

Usage (from the repository root):
  python fewshot/data/splits/make_tiny_imagenet_split.py \
      --archive ../shared/data/tiny-imagenet/tiny-imagenet-200-train.zip
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import zipfile

SIZES = {'train': 120, 'val': 40, 'test': 40}
DEFAULT_SEED = 0
OUTPUT = pathlib.Path(__file__).with_name('tiny_imagenet.json')


def read_wnids(archive: pathlib.Path) -> list[str]:
  """The sorted wnids of `tiny-imagenet-200/wnids.txt` in the zip."""
  with zipfile.ZipFile(archive) as zf:
    return sorted(set(zf.read('tiny-imagenet-200/wnids.txt').decode().split()))


def make_split(wnids: list[str], seed: int) -> dict[str, list[str]]:
  """`{'train': 120 wnids, 'val': 40, 'test': 40}`, each sorted."""
  if len(set(wnids)) != sum(SIZES.values()):
    raise ValueError(f'Expected {sum(SIZES.values())} distinct wnids, got '
                     f'{len(set(wnids))}.')
  order = sorted(set(wnids), key=lambda w: hashlib.sha256(
      f'{seed}:{w}'.encode()).hexdigest())
  split, start = {}, 0
  for name, size in SIZES.items():
    split[name] = sorted(order[start:start + size])
    start += size
  return split


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--archive', type=pathlib.Path, required=True,
                      help='tiny-imagenet-200-train.zip (or the full zip)')
  parser.add_argument('--seed', type=int, default=DEFAULT_SEED)
  parser.add_argument('--output', type=pathlib.Path, default=OUTPUT)
  args = parser.parse_args()
  split = make_split(read_wnids(args.archive), args.seed)
  record = {
      'dataset': 'Tiny-ImageNet-200 (training images)',
      'method': ("wnids ordered by sha256('<seed>:<wnid>') hex digest; first "
                 '120 train, next 40 val, last 40 test; lists sorted'),
      'script': 'fewshot/data/splits/make_tiny_imagenet_split.py',
      'seed': args.seed,
      'sizes': SIZES,
      **split,
  }
  args.output.write_text(json.dumps(record, indent=1) + '\n')
  print(f'Wrote {args.output}: ' +
        ', '.join(f'{k} {len(v)}' for k, v in split.items()))


if __name__ == '__main__':
  main()
