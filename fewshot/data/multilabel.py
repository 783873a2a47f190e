"""Image-level splits with several label sets, for multi-task training.

`load_task_splits(name, **options)` returns `{'train', 'val', 'test'}` ->
`MultiLabelImages` (host numpy arrays):

* 'multimnist': MultiMNIST and its Fashion variants (labels 'left' and
  'right'; `fewshot.data.multimnist`);
* 'class_images': the images of a class-grouped dataset's classes split by
  image (every class in every split), labels 'class' and, where the
  dataset groups its classes (Omniglot's alphabets), 'group'.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fewshot._utils import check_options
from fewshot.data.batches import MultiLabelImages
from fewshot.data.dataset import ClassDataset

TASK_DATASETS = ('class_images', 'multimnist')


def merge_classes(datasets: Sequence[ClassDataset]) -> ClassDataset:
  """One dataset holding the classes of all `datasets`, in order."""
  offsets = np.cumsum([0] + [d.num_classes for d in datasets[:-1]])
  groups = None
  if all(d.class_groups is not None for d in datasets):
    groups = sum((d.class_groups for d in datasets), ())
  return ClassDataset(
      images=np.concatenate([d.images for d in datasets]),
      labels=np.concatenate([d.labels + o for d, o in zip(datasets, offsets)]),
      class_names=sum((d.class_names for d in datasets), ()),
      class_groups=groups)


def split_images(dataset: ClassDataset, fractions: Sequence[float],
                 seed: int = 0) -> dict[str, MultiLabelImages]:
  """Splits every class's images into 'train', 'val' and 'test' parts.

  Each class's images are shuffled (seeded) and cut at `fractions`
  (train, val, test shares); every part of every class gets at least one
  image, so a class needs three.
  """
  fractions = np.asarray(fractions, float)
  if fractions.shape != (3,) or (fractions <= 0).any():
    raise ValueError(f'fractions must be three positive shares (train, val, '
                     f'test), got {tuple(fractions)}.')
  counts = dataset.class_counts()
  if counts.min() < 3:
    name = dataset.class_names[int(np.argmin(counts))]
    raise ValueError(f'Class {name!r} has {counts.min()} images; splitting '
                     'by image needs at least 3 per class.')
  rng = np.random.default_rng(seed)
  cumulative = np.cumsum(fractions / fractions.sum())
  parts = {'train': [], 'val': [], 'test': []}
  for c in range(dataset.num_classes):
    index = rng.permutation(np.flatnonzero(dataset.labels == c))
    n = len(index)
    cut_val = min(max(1, int(round(cumulative[0] * n))), n - 2)
    cut_test = min(max(cut_val + 1, int(round(cumulative[1] * n))), n - 1)
    parts['train'].append(index[:cut_val])
    parts['val'].append(index[cut_val:cut_test])
    parts['test'].append(index[cut_test:])
  group_ids = None
  if dataset.class_groups is not None:
    names = sorted(set(dataset.class_groups))
    group_ids = np.asarray([names.index(g) for g in dataset.class_groups],
                           np.int32)
  result = {}
  for split, pieces in parts.items():
    index = np.sort(np.concatenate(pieces))
    labels = {'class': dataset.labels[index]}
    if group_ids is not None:
      labels['group'] = group_ids[dataset.labels[index]]
    result[split] = MultiLabelImages(images=dataset.images[index],
                                     labels=labels)
  return result


def class_image_splits(*, dataset: dict[str, Any],
                       splits: Sequence[str] = ('train',),
                       fractions: Sequence[float] = (0.8, 0.1, 0.1),
                       seed: int = 0) -> dict[str, MultiLabelImages]:
  """The classes of `load_splits(**dataset)[splits]`, split by image.

  E.g. `dataset=dict(name='omniglot', rotations=False), splits=('train',
  'val')`: all 964 background characters, labels 'class' (character) and
  'group' (alphabet, 30).
  """
  from fewshot.data import load_splits  # pylint: disable=g-import-not-at-top
  options = dict(dataset)
  loaded = load_splits(options.pop('name'), **options)
  missing = [s for s in splits if s not in loaded]
  if missing:
    raise ValueError(f'The dataset has no {missing[0]!r} split; it has '
                     f'{sorted(loaded)}.')
  return split_images(merge_classes([loaded[s] for s in splits]), fractions,
                      seed)


def load_task_splits(name: str, **options: Any
                     ) -> dict[str, MultiLabelImages]:
  """The 'train'/'val'/'test' `MultiLabelImages` of a named task dataset."""
  if name == 'multimnist':
    from fewshot.data.multimnist import multimnist_splits as loader  # pylint: disable=g-import-not-at-top
  elif name == 'class_images':
    loader = class_image_splits
  else:
    raise ValueError(f'Unknown multi-task dataset {name!r}; known: '
                     f'{TASK_DATASETS} (a class dataset such as {name!r} '
                     f"is split by image with name='class_images', "
                     f"dataset=dict(name={name!r}, ...)).")
  check_options(loader, options, f'dataset {name!r}')
  return loader(**options)


__all__ = ['TASK_DATASETS', 'class_image_splits', 'load_task_splits',
           'merge_classes', 'split_images']
