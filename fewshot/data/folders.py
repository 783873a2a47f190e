"""A user's own images: `root/<class>/*.{png,jpg,jpeg}`, or a zip of that layout.

`folder_splits(root, image_size=...)` reads every image, resizes it to a
square (PIL Lanczos) and returns the class splits that every config takes
(`data.name='folder'`). If `root` holds `train/`, `val/` and `test/` folders
of classes, those are the splits; otherwise the classes are split at random
by `fractions` with `seed` (disjoint classes, as in few-shot learning).
"""

from __future__ import annotations

import io
import os
import pathlib
import zipfile
from typing import Iterator, Sequence

import numpy as np

from fewshot.data.dataset import ClassDataset, split_classes

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
SPLITS = ('train', 'val', 'test')


def _is_image(relative: str) -> bool:
  """An image file, not in a hidden folder or a macOS `__MACOSX` fork."""
  parts = relative.split('/')
  return (parts[-1].lower().endswith(IMAGE_SUFFIXES)
          and not any(p.startswith('.') or p == '__MACOSX' for p in parts))


def _entries(root: pathlib.Path) -> Iterator[tuple[str, bytes]]:
  """`(relative path, bytes)` of every image file under `root` (dir or zip)."""
  if root.is_file() and zipfile.is_zipfile(root):
    with zipfile.ZipFile(root) as archive:
      for name in sorted(archive.namelist()):
        if _is_image(name):
          yield name, archive.read(name)
  elif root.is_dir():
    for path in sorted(root.rglob('*')):
      relative = path.relative_to(root).as_posix()
      if path.is_file() and _is_image(relative):
        yield relative, path.read_bytes()
  else:
    raise FileNotFoundError(f'{root} is neither a folder nor a zip archive of '
                            'class folders (root/<class>/*.png|jpg).')


def _decode(data: bytes, size: int, channels: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(io.BytesIO(data)).convert('L' if channels == 1 else 'RGB')
  image = image.resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(image, np.uint8).reshape(size, size, channels)


def _dataset(items: Sequence[tuple[str, np.ndarray]], where: str
             ) -> ClassDataset:
  names = sorted({name for name, _ in items})
  if not names:
    raise ValueError(f'No images found in {where}.')
  index = {name: i for i, name in enumerate(names)}
  return ClassDataset(images=np.stack([image for _, image in items]),
                      labels=np.array([index[n] for n, _ in items], np.int32),
                      class_names=tuple(names))


def folder_splits(root: str | os.PathLike, *, image_size: int = 84,
                  channels: int = 3,
                  fractions: Sequence[float] = (0.6, 0.2, 0.2),
                  seed: int = 0) -> dict[str, ClassDataset]:
  """The train/val/test class splits of a folder (or zip) of class folders.

  Args:
    root: `root/<class>/<image>` or `root/{train,val,test}/<class>/<image>`,
      as a folder or a zip archive with that layout (a single top folder
      inside the zip is allowed).
    image_size: images are resized to `image_size` x `image_size`.
    channels: 1 (grayscale) or 3 (RGB).
    fractions: the train/val/test shares of the classes, when the root has
      no split folders.
    seed: the random class split's seed.
  """
  root = pathlib.Path(root).expanduser()
  found = read_class_folders(root, image_size=image_size, channels=channels)
  if isinstance(found, dict):
    return found
  return dict(zip(SPLITS, split_classes(found, fractions, seed)))


def read_class_folders(root: str | os.PathLike, *, image_size: int,
                       channels: int = 3
                       ) -> ClassDataset | dict[str, ClassDataset]:
  """Every image of `root/<class>/*` as one dataset, or `{split: dataset}`
  if `root` holds `train/`, `val/` and `test/` folders of classes.

  `root` is a folder or a zip of that layout (a single top folder inside
  the zip is allowed); images are resized to `image_size` squares with
  `channels` 1 (grayscale) or 3 (RGB).
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}.')
  root = pathlib.Path(root).expanduser()
  items = []
  for name, data in _entries(root):
    parts = name.split('/')
    items.append((parts, _decode(data, image_size, channels)))
  if not items:
    raise ValueError(f'No {"/".join(IMAGE_SUFFIXES)} images under {root}.')
  # A zip of one top folder (`myset/<class>/...`): drop that folder.
  while (len({parts[0] for parts, _ in items}) == 1
         and min(len(parts) for parts, _ in items) >= 3
         and items[0][0][0] not in SPLITS):
    items = [(parts[1:], image) for parts, image in items]
  depth = {len(parts) for parts, _ in items}
  if depth == {3} and {parts[0] for parts, _ in items} <= set(SPLITS):
    return {split: _dataset([(p[1], im) for p, im in items if p[0] == split],
                            f'{root}/{split}')
            for split in SPLITS if any(p[0] == split for p, _ in items)}
  if depth != {2}:
    raise ValueError(f'Expected {root}/<class>/<image> (or '
                     f'{root}/train|val|test/<class>/<image>); found images at '
                     f'depths {sorted(depth)}.')
  return _dataset([(parts[0], image) for parts, image in items], str(root))


__all__ = ['folder_splits', 'read_class_folders']
