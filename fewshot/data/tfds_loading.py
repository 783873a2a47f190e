"""Loads any TFDS image-classification dataset as a `ClassDataset`.

Preparation (once per data dir) writes ArrayRecord files, which are read back
without TensorFlow through `tfds.data_source`-style random access. Decoding
every image on each load would be slow (about a minute for 100k JPEGs), so the
decoded (and resized) arrays are cached as one `.npz` file per
(dataset, config, version, split, size, keys) under
`<data_dir>/fewshot_cache/`, written atomically.

Environment variables: `FEWSHOT_DATA_DIR` (default `data_dir`, else TFDS's own
default, `~/tensorflow_datasets` or `$TFDS_DATA_DIR`) and `FEWSHOT_MANUAL_DIR`
(default `manual_dir`, for example `../shared/data`).
"""

from __future__ import annotations

from concurrent import futures
import hashlib
import io
import json
import os
import pathlib
import re
from typing import Any, Sequence
import urllib.parse

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fewshot.data import builders as _builders  # pylint: disable=unused-import
from fewshot.data import sources
# DATA_DIR_ENV, MANUAL_DIR_ENV and the default_*_dir helpers are re-exported.
from fewshot.data.cache import (  # pylint: disable=unused-import
    CACHE_SUBDIR, DATA_DIR_ENV, MANUAL_DIR_ENV, default_data_dir,
    default_manual_dir, load_cached, save_cached)
from fewshot.data.dataset import ClassDataset
from fewshot.data.dataset import resize_images

_CACHE_FORMAT = 1
_CHUNK = 2048
_PIL_MODES = {1: 'L', 3: 'RGB', 4: 'RGBA'}


def get_builder(name: str, *, data_dir: str | os.PathLike | None = None,
                manual_dir: str | os.PathLike | None = None,
                prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The ArrayRecord TFDS builder for `name`, prepared unless `prepare=False`.

  Args:
    name: a TFDS name, optionally with config and version
      (`'fewshot_omniglot'`, `'cifar100:3.0.2'`, ...).
    data_dir: where prepared data lives (see `default_data_dir`).
    manual_dir: where manually downloaded archives live (see
      `default_manual_dir`).
    prepare: prepare the dataset if it is not prepared yet.

  Raises:
    FileNotFoundError: preparing needs archives that cannot be had (a given
      manual dir lacks them, or none was given and the download host does not
      answer): raised within seconds, naming the files (see
      `fewshot.data.sources`).
  """
  builder = tfds.builder(name, data_dir=default_data_dir(data_dir),
                         file_format='array_record')
  if prepare and not builder.is_prepared():
    manual_dir = default_manual_dir(manual_dir)
    check_sources(builder, manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def check_sources(builder: tfds.core.DatasetBuilder,
                  manual_dir: str | None) -> None:
  """Fails fast when `builder` cannot get its archives (before TFDS retries).

  The library's builders check their own (`check_sources`). Any other TFDS
  builder with registered URLs needs each file in `manual_dir` or its host to
  answer a connect.
  """
  own = getattr(type(builder), 'check_sources', None)
  if own is not None:
    own(manual_dir)
    return
  try:
    url_infos = dict(builder.url_infos or {})
  except Exception:  # pylint: disable=broad-except
    return  # No checksums registered: leave it to TFDS.
  needed = {}  # url -> file name, for the files not in the manual dir
  for url, info in url_infos.items():
    filename = info.filename or url.rstrip('/').rsplit('/', 1)[-1]
    if manual_dir is None or not os.path.exists(
        os.path.join(os.path.expanduser(manual_dir), filename)):
      needed[url] = filename
  for url in {urllib.parse.urlsplit(u).netloc: u for u in needed}.values():
    sources.check_online(builder.name, url, subdir='',
                         files=sorted(needed.values()), manual_dir=manual_dir)


def _cache_path(builder: tfds.core.DatasetBuilder, split: str,
                key: dict[str, Any]) -> pathlib.Path:
  """`<data_dir_root>/fewshot_cache/<name>/[<config>/]<version>/<file>.npz`."""
  digest = hashlib.sha1(
      json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
  safe_split = re.sub(r'[^A-Za-z0-9_.-]+', '_', split)
  size = key['image_size'] or 'orig'
  parts = [builder.name]
  if builder.builder_config is not None:
    parts.append(builder.builder_config.name)
  parts.append(str(builder.version))
  folder = pathlib.Path(os.fspath(builder.data_dir_root), CACHE_SUBDIR, *parts)
  return folder / f'{safe_split}-{size}-{digest}.npz'


def _decode(data: bytes, mode: str | None, image_size: int | None
            ) -> np.ndarray:
  """Encoded image -> `[H, W, C]` uint8 (`[S, S, C]` if `image_size`)."""
  with Image.open(io.BytesIO(data)) as image:
    if mode is None:  # Unknown channel count: keep gray, else RGB.
      mode = 'L' if image.mode in ('1', 'L', 'I', 'I;16') else 'RGB'
    array = np.asarray(image.convert(mode))
  if array.ndim == 2:
    array = array[..., None]
  if image_size is not None:
    array = resize_images(array[None], image_size)[0]
  return array


def _group_name(feature: Any, value: Any) -> str:
  """A group feature's value as a string (ClassLabel values by name)."""
  if isinstance(feature, tfds.features.ClassLabel):
    return feature.int2str(int(value))
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode() if isinstance(value, bytes) else str(value)


def _read_split(builder: tfds.core.DatasetBuilder, split: str, image_key: str,
                label_key: str, group_key: str | None,
                image_size: int | None) -> ClassDataset:
  """Reads and decodes one split; classes without images are dropped."""
  features = builder.info.features
  for key in (image_key, label_key, group_key):
    if key is not None and key not in features:
      raise KeyError(f'{builder.name} has no feature {key!r}; its features are '
                     f'{sorted(features.keys())}.')
  image_feature = features[image_key]
  label_feature = features[label_key]
  if not isinstance(image_feature, tfds.features.Image):
    raise TypeError(f'{builder.name}[{image_key!r}] is a '
                    f'{type(image_feature).__name__}, not an Image.')
  if not isinstance(label_feature, tfds.features.ClassLabel):
    raise TypeError(f'{builder.name}[{label_key!r}] is a '
                    f'{type(label_feature).__name__}, not a ClassLabel.')
  channels = image_feature.shape[-1]
  mode = _PIL_MODES.get(channels) if channels is not None else None

  source = builder.as_data_source(
      split, decoders={image_key: tfds.decode.SkipDecoding()})
  encoded: list[bytes] = []
  labels = np.empty(len(source), np.int64)
  groups: list[str] = []
  for start in range(0, len(source), _CHUNK):
    indices = list(range(start, min(start + _CHUNK, len(source))))
    for i, example in zip(indices, source.__getitems__(indices)):
      encoded.append(example[image_key])
      labels[i] = example[label_key]
      if group_key is not None:
        groups.append(_group_name(features[group_key], example[group_key]))
  # Group the images by class (stable, so the stored order is kept within);
  # unlabelled examples (label -1, as in some TFDS test splits) are dropped.
  order = np.argsort(labels, kind='stable')
  order = order[labels[order] >= 0]
  if not len(order):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'{builder.name} split {split!r} has no labelled '
                     'examples.')
  present, labels = np.unique(labels[order], return_inverse=True)
  class_names = tuple(label_feature.int2str(int(c)) for c in present)
  class_groups = None
  if group_key is not None:
    group_of = np.asarray(groups)[order]  # Aligned with the sorted `labels`.
    bounds = np.searchsorted(labels, np.arange(len(present) + 1))
    class_groups = []
    for c in range(len(present)):
      members = np.unique(group_of[bounds[c]:bounds[c + 1]])
      if len(members) != 1:
        raise ValueError(
            f'Class {class_names[c]!r} has several {group_key!r} values: '
            f'{list(members)[:5]}.')
      class_groups.append(str(members[0]))

  def decode(i: int) -> np.ndarray:
    return _decode(encoded[i], mode, image_size)

  images = None
  with futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)
                                  ) as pool:
    for start in range(0, len(order), _CHUNK):
      chunk = order[start:start + _CHUNK]
      for j, array in enumerate(pool.map(decode, chunk), start):
        if images is None:
          images = np.empty((len(order), *array.shape), np.uint8)
        elif array.shape != images.shape[1:]:
          raise ValueError(
              f'{builder.name} split {split!r} has images of different shapes '
              f'({images.shape[1:]} and {array.shape}); pass image_size to '
              'resize them all.')
        images[j] = array
  return ClassDataset(images, labels.astype(np.int32), class_names,
                      class_groups)


def load_class_dataset(name: str, split: str, *,
                       data_dir: str | os.PathLike | None = None,
                       manual_dir: str | os.PathLike | None = None,
                       image_key: str = 'image', label_key: str = 'label',
                       group_key: str | None = None,
                       image_size: int | None = None) -> ClassDataset:
  """Loads a TFDS image dataset with a class label as a `ClassDataset`.

  Prepares the dataset (ArrayRecord) if needed, decodes every image to uint8
  and caches the result; later calls read the cache.

  Args:
    name: TFDS name, optionally with config and version (`'fewshot_omniglot'`,
      `'fewshot_tiny_imagenet'`, `'cifar100'`, ...). The library's builders are
      registered on import of this module.
    split: TFDS split, slicing allowed (`'train'`, `'test[:10%]'`).
    data_dir: prepared data and the cache; default `$FEWSHOT_DATA_DIR`, else
      TFDS's default.
    manual_dir: manually downloaded archives; default `$FEWSHOT_MANUAL_DIR`.
    image_key: the `Image` feature.
    label_key: the `ClassLabel` feature that defines the classes.
    group_key: optional per-class feature giving `class_groups` (Omniglot:
      `'alphabet'`); must be constant within each class.
    image_size: if set, images are resized to `[S, S]` (PIL Lanczos, aspect
      ratio not kept); needed when the dataset's images differ in size.

  Returns:
    `images [M, H, W, C]` uint8 (C from the Image feature: 1 gray, 3 RGB),
    grouped by class; `labels [M]` in `[0, num_classes)`. Only classes with
    images in `split` are kept, in ClassLabel order, named by the ClassLabel's
    names.
  """
  builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir,
                        prepare=False)
  key = {
      'format': _CACHE_FORMAT,
      'name': builder.name,
      'config': builder.builder_config.name if builder.builder_config else None,
      'version': str(builder.version),
      'split': split,
      'image_key': image_key,
      'label_key': label_key,
      'group_key': group_key,
      'image_size': image_size,
  }
  path = _cache_path(builder, split, key)
  dataset = load_cached(path, key)
  if dataset is not None:
    return dataset
  builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir)
  dataset = _read_split(builder, split, image_key, label_key, group_key,
                        image_size)
  save_cached(path, dataset, key)
  return dataset


def class_names(name: str, *, data_dir: str | os.PathLike | None = None,
                manual_dir: str | os.PathLike | None = None,
                label_key: str = 'label') -> Sequence[str]:
  """All names of ClassLabel `label_key` (prepares the dataset if needed)."""
  builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir)
  return builder.info.features[label_key].names
