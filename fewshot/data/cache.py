"""Where data lives, and an atomic `.npz` cache of decoded `ClassDataset`s.

`FEWSHOT_DATA_DIR` (prepared data and caches) and `FEWSHOT_MANUAL_DIR`
(downloaded archives, e.g. `../shared/data`) are read here, by every loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any
import uuid
import zipfile

import numpy as np

from fewshot.data.dataset import ClassDataset

DATA_DIR_ENV = 'FEWSHOT_DATA_DIR'
MANUAL_DIR_ENV = 'FEWSHOT_MANUAL_DIR'
CACHE_SUBDIR = 'fewshot_cache'


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str | None:
  """`data_dir`, else `$FEWSHOT_DATA_DIR`, else None (TFDS's default)."""
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get(DATA_DIR_ENV) or None


def default_manual_dir(manual_dir: str | os.PathLike | None = None
                       ) -> str | None:
  """`manual_dir`, else `$FEWSHOT_MANUAL_DIR`, else None ('' is unset)."""
  if manual_dir is not None and os.fspath(manual_dir):
    return os.fspath(manual_dir)
  return os.environ.get(MANUAL_DIR_ENV) or None


def keyed_cache_path(data_dir: str | os.PathLike | None, kind: str,
                     key: dict[str, Any], stem: str) -> pathlib.Path | None:
  """`<data dir>/fewshot_cache/<kind>/<stem>-<digest of key>.npz`, or None
  without a data dir (`default_data_dir`): then nothing is cached."""
  base = default_data_dir(data_dir)
  if base is None:
    return None
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()
                        ).hexdigest()[:12]
  return pathlib.Path(base, CACHE_SUBDIR, kind, f'{stem}-{digest}.npz')


def save_cached(path: pathlib.Path, dataset: ClassDataset,
                key: dict[str, Any]) -> None:
  """Writes `dataset` to `path` atomically (temp file, then os.replace)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  groups = dataset.class_groups
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp')
  try:
    with open(tmp, 'wb') as f:
      np.savez(
          f,
          images=dataset.images,
          labels=dataset.labels,
          class_names=np.array(dataset.class_names, dtype=str),
          class_groups=np.array(groups if groups is not None else [],
                                dtype=str),
          key=np.array(json.dumps(
              {**key, 'has_groups': groups is not None}, sort_keys=True)))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_cached(path: pathlib.Path, key: dict[str, Any]
                ) -> ClassDataset | None:
  """The cached dataset, or None if absent, unreadable or for another key."""
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      stored = json.loads(str(data['key']))
      has_groups = stored.pop('has_groups')
      if stored != key:
        return None
      names = tuple(str(n) for n in data['class_names'])
      groups = (tuple(str(g) for g in data['class_groups'])
                if has_groups else None)
      return ClassDataset(data['images'], data['labels'], names, groups)
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None  # Truncated or foreign file: rebuild it.


__all__ = ['CACHE_SUBDIR', 'DATA_DIR_ENV', 'MANUAL_DIR_ENV', 'default_data_dir',
           'default_manual_dir', 'keyed_cache_path', 'load_cached',
           'save_cached']
