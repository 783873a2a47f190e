"""Domains for adaptation: labelled datasets that share their classes.

`load_domain(name, **options)` returns `{'train', 'val', 'test'}` ->
`ClassDataset`, every split with the same classes in the same order (the
images are split, not the classes). Names:

* 'mnist': the IDX files of `<manual_dir>/mnist`; train is the official
  training set less a seeded `val_fraction` of each class, test the
  official 10,000;
* 'usps': the ESL text files of `<manual_dir>/usps` (16x16 grey values in
  [-1, 1]), resized to 28x28 (bilinear, the usual protocol); train less
  val as for MNIST, test the official 2,007;
* 'fashion_mnist': the IDX files of `<manual_dir>/fashion-mnist` or the
  Debian package (`apt-get install dataset-fashion-mnist`);
* 'pacs' with `domain` (art_painting, cartoon, photo, sketch, or several
  joined by '+', e.g. the three sources of leave-one-domain-out): the images
  of `<manual_dir>/pacs/pacs_128.zip` (downscaled to 128x128 in this
  copy); train and val are the committed seeded 90/10 split
  (`splits/pacs.json`), test is every image of the domain (the standard
  protocol evaluates on the whole target domain);
* 'folder' with `root`: any `root/<class>/*.png|jpg` (or a zip of it, or
  `root/train|val|test/<class>/...`), split by image with `fractions`.

`image_size` and `channels` resize and convert any domain (e.g. 32x32 RGB
digits). Decoded domains are cached as `.npz` files under
`<data_dir>/fewshot_cache/domains/`.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from fewshot.data import sources
from fewshot.data.cache import (MANUAL_DIR_ENV, default_manual_dir,
                                keyed_cache_path, load_cached, save_cached)
from fewshot.data.dataset import ClassDataset, resize_images
from fewshot.data.folders import _decode, read_class_folders
from fewshot.data.idx import MNIST_FILE_NAMES, load_mnist_split

DOMAINS = ('fashion_mnist', 'folder', 'mnist', 'pacs', 'usps')
PACS_DOMAINS = ('art_painting', 'cartoon', 'photo', 'sketch')
PACS_ARCHIVE = 'pacs/pacs_128.zip'
# A domain section (`config.source`, `config.target`) may set manual_dir.
_SETTING = f"${MANUAL_DIR_ENV} (or the domain's manual_dir option)"
USPS_FILES = (('zip.train.gz', 'zip.train'), ('zip.test.gz', 'zip.test'))
PACS_SPLIT_FILE = pathlib.Path(__file__).parent / 'splits' / 'pacs.json'
FASHION_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal',
                 'shirt', 'sneaker', 'bag', 'ankle_boot')
SPLITS = ('train', 'val', 'test')
_CACHE_FORMAT = 1
_FOLDER_SIZE = 128  # a folder domain's image size unless image_size is set


def _manual_folder(manual_dir, subdir: str, what: str, files,
                   **kwargs) -> pathlib.Path:
  """`<manual_dir>/<subdir>` holding `files`; else a clear, fast error."""
  return sources.check_manual_files(
      what, default_manual_dir(manual_dir), subdir=subdir, files=files,
      setting=_SETTING, **kwargs)


def hold_out(labels: np.ndarray, fraction: float, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """`(train, val)` sorted indices: a seeded `fraction` of each class held out
  (at least one image of a class with two or more)."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {fraction}.')
  rng = np.random.default_rng(seed)
  train, val = [], []
  for label in np.unique(labels):
    index = rng.permutation(np.flatnonzero(labels == label))
    count = 0 if fraction == 0 else min(len(index) - 1,
                                        max(1, round(fraction * len(index))))
    val.append(index[:count])
    train.append(index[count:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _train_val_test(images, labels, test_images, test_labels, names,
                    val_fraction, seed) -> dict[str, ClassDataset]:
  train, val = hold_out(labels, val_fraction, seed)
  return {'train': ClassDataset(images[train], labels[train], names),
          'val': ClassDataset(images[val], labels[val], names),
          'test': ClassDataset(test_images, test_labels, names)}


def read_usps(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """`([N, 16, 16] uint8, [N] int32)` of an ESL USPS file (gzip or text).

  Each line is a label and 256 grey values in [-1, 1] (row-major); -1 is
  the background, mapped to 0, and 1 to 255 (MNIST's white-on-black).
  """
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'rt') as f:
    rows = [line.split() for line in f if line.strip()]
  if any(len(row) != 257 for row in rows):
    raise ValueError(f'{path}: every USPS line needs a label and 256 values.')
  values = np.asarray(rows, np.float64)
  labels = values[:, 0].astype(np.int32)
  grey = np.clip(np.round((values[:, 1:] + 1.0) * 127.5), 0, 255)
  return grey.astype(np.uint8).reshape(-1, 16, 16), labels


def _resize_bilinear(images_NxHxW: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(image).resize(
      (size, size), Image.Resampling.BILINEAR)) for image in images_NxHxW])


def _usps(manual_dir, val_fraction, seed) -> dict[str, ClassDataset]:
  folder = _manual_folder(manual_dir, 'usps', 'USPS', USPS_FILES)
  splits = {}
  for split, stem in (('train', 'zip.train'), ('test', 'zip.test')):
    path = folder / (stem + '.gz')
    path = path if path.exists() else folder / stem
    images, labels = read_usps(path)
    splits[split] = (_resize_bilinear(images, 28)[..., None], labels)
  return _train_val_test(*splits['train'], *splits['test'], DIGIT_NAMES,
                         val_fraction, seed)


def _idx_domain(folder, names, val_fraction, seed):
  (images, labels), (test_images, test_labels) = (
      load_mnist_split(folder, split) for split in ('train', 'test'))
  return _train_val_test(images[..., None], labels, test_images[..., None],
                         test_labels, names, val_fraction, seed)


def _fashion_folder(manual_dir) -> pathlib.Path:
  return _manual_folder(manual_dir, 'fashion-mnist', 'Fashion-MNIST',
                        MNIST_FILE_NAMES, extra_folders=[FASHION_SYSTEM_DIR],
                        origin='apt-get install dataset-fashion-mnist')


def pacs_val_names() -> dict[str, list[str]]:
  """`{domain: ['<class>/<file>', ...]}`: the committed validation images."""
  return json.loads(PACS_SPLIT_FILE.read_text())['val']


def _pacs(manual_dir, domain: str | None) -> dict[str, ClassDataset]:
  """One PACS domain, or several joined by '+' (domain generalisation's
  sources: every split the union of theirs)."""
  names = (domain or '').split('+')
  unknown = [n for n in names if n not in PACS_DOMAINS]
  if unknown:
    raise ValueError(f'Unknown PACS domain {unknown[0]!r}; known: '
                     f'{", ".join(PACS_DOMAINS)} (several joined by +).')
  if len(names) > 1:
    parts = [_pacs(manual_dir, n) for n in names]
    return {s: ClassDataset(np.concatenate([p[s].images for p in parts]),
                            np.concatenate([p[s].labels for p in parts]),
                            parts[0][s].class_names) for s in SPLITS}
  import zipfile  # pylint: disable=g-import-not-at-top
  folder, name = PACS_ARCHIVE.split('/')
  archive = _manual_folder(manual_dir, folder, 'PACS', [name]) / name
  prefix = f'PACS/{domain}/'
  with zipfile.ZipFile(archive) as zf:
    names = sorted(n for n in zf.namelist()
                   if n.startswith(prefix) and len(n.split('/')) == 4
                   and not n.endswith('/'))
    images = np.stack([_decode(zf.read(n), 128, 3) for n in names])
  relative = [n[len(prefix):] for n in names]
  classes = tuple(sorted({r.split('/')[0] for r in relative}))
  labels = np.asarray([classes.index(r.split('/')[0]) for r in relative],
                      np.int32)
  is_val = np.isin(relative, pacs_val_names()[domain])
  return {'train': ClassDataset(images[~is_val], labels[~is_val], classes),
          'val': ClassDataset(images[is_val], labels[is_val], classes),
          'test': ClassDataset(images, labels, classes)}


def _folder(root, fractions, seed, image_size, channels
            ) -> dict[str, ClassDataset]:
  if root is None:
    raise ValueError("A 'folder' domain needs root=<folder or zip of "
                     'class folders>.')
  found = read_class_folders(root, image_size=image_size or _FOLDER_SIZE,
                             channels=channels or 3)
  if isinstance(found, dict):
    missing = [s for s in SPLITS if s not in found]
    if missing:
      raise ValueError(f'{root} has split folders but no {missing}.')
    names = found['train'].class_names
    for split, dataset in found.items():
      if dataset.class_names != names:
        raise ValueError(f'{root}/{split} has classes {dataset.class_names}, '
                         f'train has {names}: a domain\'s splits share their '
                         'classes.')
    return found
  fractions = np.asarray(fractions, float)
  if fractions.shape != (3,) or (fractions <= 0).any():
    raise ValueError(f'fractions must be three positive shares, got '
                     f'{tuple(fractions)}.')
  rest, test = hold_out(found.labels, fractions[2] / fractions.sum(), seed)
  train, val = hold_out(found.labels[rest],
                        fractions[1] / fractions[:2].sum(), seed + 1)
  pick = lambda index: ClassDataset(found.images[index], found.labels[index],
                                    found.class_names)
  return {'train': pick(rest[train]), 'val': pick(rest[val]),
          'test': pick(test)}



def convert_images(images: np.ndarray, image_size: int | None,
                   channels: int | None) -> np.ndarray:
  """`[M, H, W, C]` uint8 resized to `image_size` squares (Lanczos) and
  converted to `channels` (grey repeated to RGB; RGB to ITU-R 601 luma)."""
  if channels is not None and images.shape[-1] != channels:
    if channels == 3:
      images = np.repeat(images, 3, axis=-1)
    elif channels == 1:
      luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114],
                                                  np.float32)
      images = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    else:
      raise ValueError(f'channels must be 1 or 3, got {channels}.')
  if image_size is not None:
    images = resize_images(images, image_size)
  return images


def _cache_path(data_dir, key: dict[str, Any]) -> pathlib.Path | None:
  return keyed_cache_path(data_dir, 'domains', key,
                          f'{key["name"]}-{key.get("domain") or ""}')


def load_domain(name: str, *, domain: str | None = None,
                root: str | os.PathLike | None = None,
                manual_dir: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None,
                image_size: int | None = None, channels: int | None = None,
                val_fraction: float = 0.1,
                fractions: Sequence[float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> dict[str, ClassDataset]:
  """The 'train', 'val' and 'test' splits of a domain (module docstring).

  Args:
    name: one of `DOMAINS`.
    domain: PACS's domain.
    root: a 'folder' domain's folder or zip.
    manual_dir: where the archives are (default `$FEWSHOT_MANUAL_DIR`).
    data_dir: where the decoded cache goes (default `$FEWSHOT_DATA_DIR`;
      no cache without either).
    image_size: resize every split to `image_size` squares.
    channels: convert to 1 or 3 channels.
    val_fraction: the share of each class of the digits' official
      training sets held out for validation.
    fractions: a 'folder' domain's train/val/test shares per class.
    seed: the seed of those held-out images.
  """
  if name not in DOMAINS:
    raise ValueError(f'Unknown domain {name!r}; known: {", ".join(DOMAINS)} '
                     f'(pacs with domain= one of {", ".join(PACS_DOMAINS)}).')
  if name != 'pacs' and domain is not None:
    raise ValueError(f"domain={domain!r} applies to 'pacs' only.")
  if name != 'folder' and root is not None:
    raise ValueError(f"root={root!r} applies to 'folder' only.")
  key = dict(name=name, domain=domain, root=None if root is None else str(
      pathlib.Path(root).expanduser().resolve()), image_size=image_size,
             channels=channels, val_fraction=val_fraction,
             fractions=list(fractions), seed=seed, format=_CACHE_FORMAT)
  cache = _cache_path(data_dir, key)
  if cache is not None:
    cached = {s: load_cached(cache / f'{s}.npz', key) for s in SPLITS}
    if all(d is not None for d in cached.values()):
      return cached
  if name == 'mnist':
    splits = _idx_domain(_manual_folder(manual_dir, 'mnist', 'MNIST',
                                        MNIST_FILE_NAMES),
                         DIGIT_NAMES, val_fraction, seed)
  elif name == 'usps':
    splits = _usps(manual_dir, val_fraction, seed)
  elif name == 'fashion_mnist':
    splits = _idx_domain(_fashion_folder(manual_dir), FASHION_NAMES,
                         val_fraction, seed)
  elif name == 'pacs':
    splits = _pacs(manual_dir, domain)
  else:
    splits = _folder(root, fractions, seed, image_size, channels)
  if image_size is not None or channels is not None:
    splits = {s: ClassDataset(convert_images(d.images, image_size, channels),
                              d.labels, d.class_names)
              for s, d in splits.items()}
  if cache is not None:
    for split, dataset in splits.items():
      save_cached(cache / f'{split}.npz', dataset, key)
  return splits


__all__ = ['DOMAINS', 'PACS_DOMAINS', 'convert_images', 'hold_out',
           'load_domain', 'pacs_val_names', 'read_usps']
