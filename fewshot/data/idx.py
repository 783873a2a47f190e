"""The IDX files of MNIST and Fashion-MNIST (gzipped or not), as numpy."""

from __future__ import annotations

import gzip
import os

import numpy as np

# IDX type codes -> numpy dtypes (big-endian on disk).
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4',
           0x0D: '>f4', 0x0E: '>f8'}
MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
# Every file of both splits, as (gzipped, plain) names: either will do.
MNIST_FILE_NAMES = tuple((f'{stem}.gz', stem) for stems in MNIST_FILES.values()
                         for stem in stems)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The array stored in an IDX file (`.gz` read through gzip)."""
  opener = gzip.open if os.fspath(path).endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
    raise ValueError(f'{path} is not an IDX file (bad magic number).')
  dims = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(dims))
  array = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * dims)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path} holds {array.size} values; its header says '
                     f'{shape}.')
  return array.reshape(shape).astype(np.dtype(_DTYPES[data[2]]).newbyteorder(
      '='))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (for tests and tools)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def find_mnist_files(directory: str | os.PathLike, split: str
                     ) -> tuple[str, str]:
  """The images and labels files of `split` ('train'/'test') in `directory`."""
  found = []
  for stem in MNIST_FILES[split]:
    for name in (stem + '.gz', stem):
      if os.path.exists(os.path.join(directory, name)):
        found.append(os.path.join(directory, name))
        break
    else:
      raise FileNotFoundError(f'No {stem}[.gz] in {directory}.')
  return found[0], found[1]


def load_mnist_split(directory: str | os.PathLike, split: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`([N, 28, 28] uint8 images, [N] int32 labels)` of an MNIST-format split."""
  images_path, labels_path = find_mnist_files(directory, split)
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.shape != (images.shape[0],):
    raise ValueError(f'{directory}: {images.shape} images and {labels.shape} '
                     'labels do not form an MNIST split.')
  return images.astype(np.uint8), labels.astype(np.int32)


__all__ = ['MNIST_FILES', 'MNIST_FILE_NAMES', 'find_mnist_files',
           'load_mnist_split', 'read_idx', 'write_idx']
