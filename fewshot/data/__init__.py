"""Class-grouped datasets, class splits and episode sampling."""

from __future__ import annotations

from typing import Any

from fewshot._utils import check_options
from fewshot.data.dataset import ClassDataset
from fewshot.data.sampling import (DeviceDataset, EpisodeSpec, HostSampler,
                                   check_class_balanced, check_spec,
                                   index_by_class, sample_class_balanced,
                                   sample_episode, sample_meta_batch,
                                   to_device)


def load_splits(name: str, **kwargs: Any) -> dict[str, ClassDataset]:
  """The 'train'/'val'/'test' class splits of a named dataset.

  Names: 'omniglot' (background alphabets -> evaluation alphabets),
  'tiny_imagenet' (the committed 120/40/40 class split), 'synthetic'
  (generated), 'folder' (your own `root/<class>/*.png|jpg` or a zip of it;
  `fewshot.data.folders.folder_splits`), and for text 'banking77' and
  'text' (any CSV / JSON-lines file of (text, label) pairs;
  `fewshot.data.text_splits`). kwargs go to the loader (`data_dir`,
  `manual_dir`, `image_size`, `tokenizer`, ...).
  """
  # Imported lazily: the TFDS-backed loaders are heavy and optional.
  if name == 'omniglot':
    from fewshot.data.omniglot import omniglot_splits as loader
  elif name == 'tiny_imagenet':
    from fewshot.data.tiny_imagenet import tiny_imagenet_splits as loader
  elif name == 'synthetic':
    from fewshot.data.synthetic import synthetic_splits as loader
  elif name == 'folder':
    from fewshot.data.folders import folder_splits as loader
  elif name == 'banking77':
    from fewshot.data.text_splits import banking77_splits as loader
  elif name == 'text':
    from fewshot.data.text_splits import text_splits as loader
  else:
    raise ValueError(f'Unknown dataset {name!r}; known: omniglot, '
                     'tiny_imagenet, synthetic, folder, banking77, text.')
  check_options(loader, kwargs, f'dataset {name!r}')
  return loader(**kwargs)


__all__ = [
    'ClassDataset', 'DeviceDataset', 'EpisodeSpec', 'HostSampler',
    'check_class_balanced', 'check_spec', 'index_by_class',
    'sample_class_balanced', 'load_splits', 'sample_episode',
    'sample_meta_batch',
    'to_device',
]
