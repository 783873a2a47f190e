"""Writes `pacs.json`: a seeded 90/10 train/val split of each PACS domain.

Within each (domain, class), the images are ordered by the SHA-256 hex
digest of `'<seed>:<domain>/<class>/<file>'` (independent of library
versions and platforms) and the first `round(0.1 * n)` (at least one) are
validation images. The file lists the validation images of each domain as
`<class>/<file>`, sorted; every other image of the domain is training.

Usage (from the repository root):
  python fewshot/data/splits/make_pacs_split.py \
      --archive ../shared/data/pacs/pacs_128.zip
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import zipfile

DEFAULT_SEED = 0
VAL_FRACTION = 0.1
OUTPUT = pathlib.Path(__file__).with_name('pacs.json')


def read_names(archive: pathlib.Path) -> dict[str, dict[str, list[str]]]:
  """`{domain: {class: [file, ...]}}` of `PACS/<domain>/<class>/<file>`."""
  found = collections.defaultdict(lambda: collections.defaultdict(list))
  with zipfile.ZipFile(archive) as zf:
    for name in zf.namelist():
      parts = name.split('/')
      if len(parts) == 4 and parts[0] == 'PACS' and parts[3]:
        found[parts[1]][parts[2]].append(parts[3])
  return {d: dict(classes) for d, classes in found.items()}


def make_split(names: dict[str, dict[str, list[str]]], seed: int
               ) -> dict[str, list[str]]:
  split = {}
  for domain, classes in sorted(names.items()):
    val = []
    for name, files in sorted(classes.items()):
      order = sorted(files, key=lambda f: hashlib.sha256(
          f'{seed}:{domain}/{name}/{f}'.encode()).hexdigest())
      count = max(1, round(VAL_FRACTION * len(files)))
      val.extend(f'{name}/{f}' for f in order[:count])
    split[domain] = sorted(val)
  return split


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--archive', type=pathlib.Path, required=True)
  parser.add_argument('--seed', type=int, default=DEFAULT_SEED)
  args = parser.parse_args()
  record = {'seed': args.seed, 'val_fraction': VAL_FRACTION,
            'val': make_split(read_names(args.archive), args.seed)}
  OUTPUT.write_text(json.dumps(record, indent=1) + '\n')
  print(f'wrote {OUTPUT}: ' + ', '.join(
      f'{d} {len(v)} val' for d, v in record['val'].items()))


if __name__ == '__main__':
  main()
