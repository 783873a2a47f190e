"""Writes `banking77.json`: a seeded 27/25/25 intent split for text episodes.

The 77 intents of `categories.json` are ordered by the SHA-256 hex digest
of `'<seed>:<intent>'` (independent of library versions and platforms);
the first 27 are meta-train, the next 25 validation, the last 25 test.

Usage (from the repository root):
  python fewshot/data/splits/make_banking77_split.py \
      --categories ../shared/data/banking77/categories.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

DEFAULT_SEED = 0
SIZES = {'train': 27, 'val': 25, 'test': 25}
OUTPUT = pathlib.Path(__file__).with_name('banking77.json')


def make_split(intents: list[str], seed: int) -> dict[str, list[str]]:
  if len(intents) != sum(SIZES.values()) or len(set(intents)) != len(intents):
    raise ValueError(f'Expected {sum(SIZES.values())} distinct intents, got '
                     f'{len(intents)}.')
  order = sorted(intents, key=lambda name: hashlib.sha256(
      f'{seed}:{name}'.encode()).hexdigest())
  split, start = {}, 0
  for name, size in SIZES.items():
    split[name] = sorted(order[start:start + size])
    start += size
  return split


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--categories', type=pathlib.Path, required=True)
  parser.add_argument('--seed', type=int, default=DEFAULT_SEED)
  args = parser.parse_args()
  intents = json.loads(args.categories.read_text())
  split = dict(seed=args.seed, **make_split(intents, args.seed))
  OUTPUT.write_text(json.dumps(split, indent=1) + '\n')
  print(f'wrote {OUTPUT}: ' + ', '.join(f'{k} {len(split[k])}' for k in SIZES))


if __name__ == '__main__':
  main()
