"""Tiny-ImageNet-200 class splits for few-shot learning (120/40/40 classes).

The split is committed in `splits/tiny_imagenet.json` (made by
`splits/make_tiny_imagenet_split.py`, seed recorded in the file). Its classes
are ImageNet classes: an ImageNet-pretrained backbone has seen them.
"""

from __future__ import annotations

import json
import os
import pathlib

from fewshot.data.dataset import ClassDataset

TINY_IMAGENET_TFDS_NAME = 'fewshot_tiny_imagenet'
SPLIT_FILE = pathlib.Path(__file__).parent / 'splits' / 'tiny_imagenet.json'
SPLIT_NAMES = ('train', 'val', 'test')


def tiny_imagenet_class_split() -> dict[str, list[str]]:
  """`{'train': 120 wnids, 'val': 40, 'test': 40}` from the committed JSON."""
  record = json.loads(SPLIT_FILE.read_text())
  return {name: list(record[name]) for name in SPLIT_NAMES}


def tiny_imagenet_splits(*, data_dir: str | os.PathLike | None = None,
                         manual_dir: str | os.PathLike | None = None,
                         image_size: int | None = None
                         ) -> dict[str, ClassDataset]:
  """Tiny-ImageNet's 100,000 training images split by class, 120/40/40.

  Prepares the `fewshot_tiny_imagenet` TFDS dataset on first use (from
  `<manual_dir>/tiny-imagenet/tiny-imagenet-200-train.zip`) and caches the
  decoded arrays.

  Args:
    data_dir: TFDS data dir (default `$FEWSHOT_DATA_DIR`, else TFDS's).
    manual_dir: folder holding `tiny-imagenet/` (default
      `$FEWSHOT_MANUAL_DIR`).
    image_size: resize to `[S, S]`; None keeps 64x64.

  Returns:
    `{'train', 'val', 'test'}` -> `ClassDataset` with images `[500 * classes,
    S, S, 3]` uint8 RGB; class names are wnids, in sorted order.
  """
  from fewshot.data.tfds_loading import load_class_dataset  # pylint: disable=g-import-not-at-top
  full = load_class_dataset(TINY_IMAGENET_TFDS_NAME, 'train',
                            data_dir=data_dir, manual_dir=manual_dir,
                            image_size=image_size)
  return {name: full.select_names(wnids)
          for name, wnids in tiny_imagenet_class_split().items()}


def tiny_imagenet_descriptions(*, data_dir: str | os.PathLike | None = None,
                               manual_dir: str | os.PathLike | None = None
                               ) -> dict[str, str]:
  """wnid -> words.txt text ('n01443537' -> 'goldfish, Carassius auratus').

  Read from the prepared dataset's metadata (prepares it if needed).
  """
  from fewshot.data.tfds_loading import get_builder  # pylint: disable=g-import-not-at-top
  builder = get_builder(TINY_IMAGENET_TFDS_NAME, data_dir=data_dir,
                        manual_dir=manual_dir)
  return dict(builder.info.metadata['descriptions'])
