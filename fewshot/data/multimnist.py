"""MultiMNIST, Multi-Fashion-MNIST and Multi-(Fashion+MNIST), built from the IDX files.

The two-task benchmarks of the Pareto multi-task literature (Sener and
Koltun 2018; Lin et al. 2019): two 28x28 items on one 36x36 canvas, one at
the top left and one shifted 8 pixels right and down, overlaid by their
pixelwise maximum; the tasks classify the left item and the right item (10
classes each). Variants:

* 'mnist': both items digits; 'fashion': both Fashion-MNIST items (the two
  items of a canvas always have different classes);
* 'mixed': a Fashion-MNIST item on the left and a digit on the right.

Every image of the source split is the left item of one canvas, its right
partner drawn from the same split with a seeded generator, so the build is
deterministic. The training canvases are split into 'train' and 'val'
(`val_fraction`, seeded); 'test' comes from the sources' test split.
"""

from __future__ import annotations

import os

import numpy as np

from fewshot.data import sources
from fewshot.data.batches import MultiLabelImages
from fewshot.data.idx import MNIST_FILE_NAMES, load_mnist_split
from fewshot.data.cache import MANUAL_DIR_ENV, default_manual_dir

VARIANTS = ('mnist', 'fashion', 'mixed')
FASHION_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'  # Debian package
CANVAS = 36
SHIFT = CANVAS - 28


def default_source_dir(source: str, manual_dir=None) -> str:
  """Where the 'mnist' or 'fashion' IDX files are looked for by default.

  `<manual_dir or $FEWSHOT_MANUAL_DIR>/mnist` (or `/fashion-mnist`); for
  Fashion-MNIST also the Debian package's folder.
  """
  name = {'mnist': 'mnist', 'fashion': 'fashion-mnist'}[source]
  fashion = source == 'fashion'
  return os.fspath(sources.check_manual_files(
      {'mnist': 'MNIST', 'fashion': 'Fashion-MNIST'}[source],
      default_manual_dir(manual_dir), subdir=name,
      files=MNIST_FILE_NAMES,
      extra_folders=[FASHION_SYSTEM_DIR] if fashion else [],
      origin='apt-get install dataset-fashion-mnist' if fashion else None,
      setting=f"${MANUAL_DIR_ENV} (or the data section's manual_dir)"))


def overlay(left_NxHxW: np.ndarray, right_NxHxW: np.ndarray,
            shift: int = SHIFT) -> np.ndarray:
  """`[N, H + shift, W + shift, 1]` canvases: left at (0, 0), right at
  (shift, shift), pixelwise maximum."""
  n, h, w = left_NxHxW.shape
  canvas = np.zeros((n, h + shift, w + shift), np.uint8)
  canvas[:, :h, :w] = left_NxHxW
  canvas[:, shift:, shift:] = np.maximum(canvas[:, shift:, shift:],
                                         right_NxHxW)
  return canvas[..., None]


def pair_partners(left_labels: np.ndarray, right_labels: np.ndarray,
                  rng: np.random.Generator, different: bool) -> np.ndarray:
  """For each left item, the index of a random right item (of a different
  class when `different`)."""
  partners = rng.integers(0, len(right_labels), len(left_labels))
  if different:
    clash = right_labels[partners] == left_labels
    while clash.any():
      partners[clash] = rng.integers(0, len(right_labels), int(clash.sum()))
      clash = right_labels[partners] == left_labels
  return partners


def multimnist_splits(*, variant: str = 'mnist', mnist_dir=None,
                      fashion_dir=None, manual_dir=None,
                      val_fraction: float = 0.1, seed: int = 0,
                      max_train_images: int | None = None
                      ) -> dict[str, MultiLabelImages]:
  """`{'train', 'val', 'test'}` two-task canvases with labels 'left', 'right'.

  Args:
    variant: 'mnist', 'fashion' or 'mixed' (see the module docstring).
    mnist_dir, fashion_dir: folders of the IDX files (default
      `default_source_dir`).
    val_fraction: the share of the training canvases held out as 'val'.
    seed: pairs the items and picks the validation canvases.
    max_train_images: keep only the first this many training source images
      (a quick run); the test split is always complete.
  """
  if variant not in VARIANTS:
    raise ValueError(f'Unknown MultiMNIST variant {variant!r}; known: '
                     f'{VARIANTS}.')
  if not 0 < val_fraction < 1:
    raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}.')
  sources = {'mnist': ('mnist', 'mnist'), 'fashion': ('fashion', 'fashion'),
             'mixed': ('fashion', 'mnist')}[variant]
  dirs = {'mnist': mnist_dir, 'fashion': fashion_dir}

  def source_dir(source):
    return dirs[source] or default_source_dir(source, manual_dir)

  rng = np.random.default_rng(seed)
  splits = {}
  for split in ('train', 'test'):
    left, left_labels = load_mnist_split(source_dir(sources[0]), split)
    right, right_labels = load_mnist_split(source_dir(sources[1]), split)
    if split == 'train' and max_train_images:
      left, left_labels = left[:max_train_images], left_labels[:max_train_images]
    partners = pair_partners(left_labels, right_labels, rng,
                             different=sources[0] == sources[1])
    splits[split] = MultiLabelImages(
        images=overlay(left, right[partners]),
        labels={'left': left_labels, 'right': right_labels[partners]})
  train = splits.pop('train')
  order = rng.permutation(train.num_images)
  num_val = max(1, int(round(val_fraction * train.num_images)))

  def take(index):
    index = np.sort(index)
    return MultiLabelImages(images=train.images[index],
                            labels={k: v[index]
                                    for k, v in train.labels.items()})

  return {'train': take(order[num_val:]), 'val': take(order[:num_val]),
          'test': splits['test']}


__all__ = ['CANVAS', 'VARIANTS', 'default_source_dir', 'multimnist_splits',
           'overlay', 'pair_partners']
