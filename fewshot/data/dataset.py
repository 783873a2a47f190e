"""Class-grouped datasets (images or token ids) and class splits (host numpy)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassDataset:
  """Images (or texts) grouped by class.

  Attributes:
    images: `[M, H, W, C]` uint8 in 0..255, or for text int32 token ids
      `[M, L]` padded with the tokenizer's pad id (`fewshot.data.text`),
      or float32 feature vectors `[M, D]` of a frozen backbone
      (`fewshot.features.embed_dataset`); samplers, episodes and
      algorithms treat all three alike.
    labels: `[M]` int32 class index in `[0, num_classes)`.
    class_names: `num_classes` names; `labels` index into it.
    class_groups: optional `num_classes` group names (Omniglot's alphabet).
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  class_groups: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.images.ndim == 2 and np.issubdtype(self.images.dtype, np.integer):
      # Token ids of a text dataset (`fewshot.data.text`).
      object.__setattr__(self, 'images', self.images.astype(np.int32,
                                                            copy=False))
    elif self.images.ndim == 2 and np.issubdtype(self.images.dtype,
                                                 np.floating):
      # A frozen backbone's features (`fewshot.features.embed_dataset`).
      if not np.isfinite(self.images).all():
        raise ValueError('Feature vectors must be finite.')
      object.__setattr__(self, 'images', self.images.astype(np.float32,
                                                            copy=False))
    elif self.images.ndim != 4:
      raise ValueError(
          f'images must be [M, H, W, C] (or int32 token ids [M, L], or '
          f'float feature vectors [M, D]), got shape {self.images.shape}.')
    elif self.images.dtype != np.uint8:
      raise ValueError(f'images must be uint8 0..255, got {self.images.dtype}.')
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(
          f'labels shape {self.labels.shape} does not match '
          f'{self.images.shape[0]} images.')
    object.__setattr__(self, 'labels', self.labels.astype(np.int32))
    object.__setattr__(self, 'class_names', tuple(self.class_names))
    if len(self.labels) and (self.labels.min() < 0 or
                             self.labels.max() >= len(self.class_names)):
      raise ValueError(
          f'labels must lie in [0, {len(self.class_names)}); got '
          f'[{self.labels.min()}, {self.labels.max()}].')
    if self.class_groups is not None:
      object.__setattr__(self, 'class_groups', tuple(self.class_groups))
      if len(self.class_groups) != len(self.class_names):
        raise ValueError('class_groups needs one entry per class.')

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, ...]:
    """`(H, W, C)`, or `(L,)` for token ids, `(D,)` for features."""
    return tuple(self.images.shape[1:])

  @property
  def is_text(self) -> bool:
    return self.images.ndim == 2 and self.images.dtype == np.int32

  @property
  def is_features(self) -> bool:
    """Whether `images` are feature vectors `[M, D]` (float32)."""
    return self.images.ndim == 2 and self.images.dtype == np.float32

  def class_counts(self) -> np.ndarray:
    """`[num_classes]` number of images in each class."""
    return np.bincount(self.labels, minlength=self.num_classes)

  def select_classes(self, class_indices: Sequence[int]) -> 'ClassDataset':
    """The sub-dataset of the given classes, relabelled `0..len-1` in order."""
    class_indices = np.asarray(class_indices, dtype=np.int64)
    if len(np.unique(class_indices)) != len(class_indices):
      raise ValueError('select_classes got repeated class indices.')
    remap = np.full(self.num_classes, -1, np.int64)
    remap[class_indices] = np.arange(len(class_indices))
    keep = remap[self.labels] >= 0
    groups = None
    if self.class_groups is not None:
      groups = tuple(self.class_groups[i] for i in class_indices)
    return ClassDataset(
        images=self.images[keep],
        labels=remap[self.labels[keep]].astype(np.int32),
        class_names=tuple(self.class_names[i] for i in class_indices),
        class_groups=groups)

  def select_names(self, names: Sequence[str]) -> 'ClassDataset':
    """The sub-dataset of the classes with these names, in this order."""
    index = {name: i for i, name in enumerate(self.class_names)}
    missing = [n for n in names if n not in index]
    if missing:
      raise ValueError(f'{len(missing)} class names are not in the dataset, '
                       f'for example {missing[:3]}.')
    return self.select_classes([index[n] for n in names])

  def select_groups(self, groups: Sequence[str]) -> 'ClassDataset':
    """The sub-dataset of the classes whose group is in `groups`."""
    if self.class_groups is None:
      raise ValueError('This dataset has no class groups.')
    wanted = set(groups)
    unknown = wanted - set(self.class_groups)
    if unknown:
      raise ValueError(f'Unknown groups: {sorted(unknown)[:5]}.')
    return self.select_classes(
        [i for i, g in enumerate(self.class_groups) if g in wanted])


def concatenate(datasets: Sequence[ClassDataset]) -> ClassDataset:
  """Joins datasets with disjoint classes into one; labels are offset."""
  images, labels, names, groups = [], [], [], []
  offset = 0
  for ds in datasets:
    images.append(ds.images)
    labels.append(ds.labels + offset)
    names.extend(ds.class_names)
    groups.extend(ds.class_groups or [''] * ds.num_classes)
    offset += ds.num_classes
  if len(set(names)) != len(names):
    raise ValueError('concatenate needs datasets with distinct class names.')
  has_groups = any(ds.class_groups is not None for ds in datasets)
  return ClassDataset(np.concatenate(images), np.concatenate(labels),
                      tuple(names), tuple(groups) if has_groups else None)


def add_rotations(dataset: ClassDataset,
                  quarter_turns: Sequence[int] = (1, 2, 3)) -> ClassDataset:
  """Adds each class rotated by 90 degrees * k as a new class (Omniglot).

  The result has `num_classes * (1 + len(quarter_turns))` classes: the
  originals first, then the rotated copies, named `<name>/rot<degrees>`.
  """
  parts = [dataset]
  for k in quarter_turns:
    if k % 4 == 0:
      raise ValueError('quarter_turns must not include multiples of 4.')
    parts.append(ClassDataset(
        images=np.ascontiguousarray(np.rot90(dataset.images, k, axes=(1, 2))),
        labels=dataset.labels,
        class_names=tuple(f'{n}/rot{90 * k}' for n in dataset.class_names),
        class_groups=dataset.class_groups))
  return concatenate(parts)


def split_classes(dataset: ClassDataset, fractions: Sequence[float],
                  seed: int) -> list[ClassDataset]:
  """Splits the classes (not the images) at random into disjoint parts."""
  if abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f'fractions must sum to 1, got {fractions}.')
  order = np.random.default_rng(seed).permutation(dataset.num_classes)
  bounds = np.round(np.cumsum([0.0, *fractions]) * dataset.num_classes)
  bounds = bounds.astype(int)
  return [dataset.select_classes(np.sort(order[a:b]))
          for a, b in zip(bounds[:-1], bounds[1:])]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes `[M, H, W, C]` uint8 images to `[M, size, size, C]` (PIL Lanczos)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((images.shape[0], size, size, images.shape[3]), np.uint8)
  for i, image in enumerate(images):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))
    out[i] = resized.reshape(size, size, images.shape[3])
  return out
