"""Omniglot protocols: background/evaluation class splits and Lake's 20 runs.

Images keep the release polarity: strokes are 0 (black) on a 255 (white)
background.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from typing import Sequence

import numpy as np
from PIL import Image

from fewshot.data.dataset import add_rotations
from fewshot.data.dataset import ClassDataset
from fewshot.data.dataset import resize_images

OMNIGLOT_TFDS_NAME = 'fewshot_omniglot'


def _seeded_order(names: Sequence[str], seed: int) -> list[str]:
  """`names` ordered by SHA-256 of `'<seed>:<name>'` (version independent)."""
  return sorted(names, key=lambda n: hashlib.sha256(
      f'{seed}:{n}'.encode()).hexdigest())


def validation_alphabets(alphabets: Sequence[str], num_val_alphabets: int,
                         seed: int) -> list[str]:
  """The held-out alphabets: the first `num_val_alphabets` in seeded order."""
  alphabets = sorted(set(alphabets))
  if not 0 <= num_val_alphabets < len(alphabets):
    raise ValueError(f'num_val_alphabets must be in [0, {len(alphabets)}), got '
                     f'{num_val_alphabets}.')
  return sorted(_seeded_order(alphabets, seed)[:num_val_alphabets])


def omniglot_splits(*, data_dir: str | os.PathLike | None = None,
                    manual_dir: str | os.PathLike | None = None,
                    image_size: int | None = 28, rotations: bool = True,
                    num_val_alphabets: int = 5,
                    seed: int = 0) -> dict[str, ClassDataset]:
  """The standard background/evaluation Omniglot splits.

  Prepares the `fewshot_omniglot` TFDS dataset on first use (from
  `<manual_dir>/omniglot/*.zip`, else downloaded) and caches decoded arrays.

  Args:
    data_dir: TFDS data dir (default `$FEWSHOT_DATA_DIR`, else TFDS's).
    manual_dir: folder holding `omniglot/images_*.zip` (default
      `$FEWSHOT_MANUAL_DIR`).
    image_size: images are resized to `[S, S]`; None keeps 105x105.
    rotations: add each training character rotated by 90, 180 and 270 degrees
      as three new classes (named `<alphabet>/character<NN>/rot<deg>`).
    num_val_alphabets: background alphabets held out for validation.
    seed: picks the validation alphabets (see `validation_alphabets`).

  Returns:
    `{'train', 'val', 'test'}` -> `ClassDataset` with images `[M, S, S, 1]`
    uint8 and `class_groups` = alphabets. 'train': the other background
    alphabets (964 - val characters, times 4 with rotations); 'val': the
    held-out background alphabets, unrotated; 'test': the 20 evaluation
    alphabets (659 characters), unrotated. No character is in two splits.
  """
  # Imported here so that reading the runs does not import TFDS.
  from fewshot.data.tfds_loading import load_class_dataset  # pylint: disable=g-import-not-at-top
  kwargs = dict(data_dir=data_dir, manual_dir=manual_dir,
                group_key='alphabet', image_size=image_size)
  background = load_class_dataset(OMNIGLOT_TFDS_NAME, 'train', **kwargs)
  evaluation = load_class_dataset(OMNIGLOT_TFDS_NAME, 'test', **kwargs)
  assert background.class_groups is not None
  alphabets = sorted(set(background.class_groups))
  val_alphabets = validation_alphabets(alphabets, num_val_alphabets, seed)
  train = background.select_groups(
      [a for a in alphabets if a not in val_alphabets])
  val = background.select_groups(val_alphabets)
  if rotations:
    train = add_rotations(train)
  overlap = set(background.class_names) & set(evaluation.class_names)
  if overlap:
    raise ValueError(f'Background and evaluation share characters, e.g. '
                     f'{sorted(overlap)[:3]}.')
  return {'train': train, 'val': val, 'test': evaluation}


@dataclasses.dataclass(frozen=True)
class OmniglotRun:
  """One run of Lake et al.'s one-shot classification task.

  Attributes:
    name: the run folder, e.g. `run01`.
    training_images: `[N, S, S, 1]` uint8 (0/255 before resizing), one image
      per class, in file order `class01, class02, ...`.
    test_images: `[Q, S, S, 1]` uint8, in file order `item01, item02, ...`.
    test_labels: `[Q]` int32, index into `training_images` of the correct
      class of each test image.
  """
  name: str
  training_images: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def _read_png(path: pathlib.Path) -> np.ndarray:
  """A (1-bit) PNG as `[H, W, 1]` uint8 0..255."""
  with Image.open(path) as image:
    return np.asarray(image.convert('L'))[..., None]


def _stack(paths: Sequence[pathlib.Path], image_size: int | None
           ) -> np.ndarray:
  """`[len(paths), S, S, 1]` uint8 (original size if `image_size` is None)."""
  arrays = [_read_png(p) for p in paths]
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1:
    raise ValueError(f'Images in {paths[0].parent} have different sizes '
                     f'{sorted(shapes)}; pass image_size.')
  images = np.stack(arrays)
  return resize_images(images, image_size) if image_size else images


def _numbered_pngs(folder: pathlib.Path, stem: str) -> list[pathlib.Path]:
  """`<folder>/<stem><NN>.png`, sorted by number; errors on anything else."""
  if not folder.is_dir():
    raise FileNotFoundError(f'Missing folder {folder}; expected '
                            f'{stem}NN.png files in it.')
  pattern = re.compile(rf'{stem}(\d+)\.png')
  files = [p for p in folder.iterdir() if not p.name.startswith('.')]
  bad = [p.name for p in files if not pattern.fullmatch(p.name)]
  if bad or not files:
    raise ValueError(f'Unexpected contents of {folder}: expected only '
                     f'{stem}NN.png files, found {bad[:3] or "nothing"}.')
  return sorted(files, key=lambda p: int(pattern.fullmatch(p.name)[1]))


def _read_run(runs_dir: pathlib.Path, run_dir: pathlib.Path,
              image_size: int | None) -> OmniglotRun:
  """Reads `run_dir` = `<runs_dir>/runNN` (see `read_omniglot_runs`)."""
  training = _numbered_pngs(run_dir / 'training', 'class')
  test = _numbered_pngs(run_dir / 'test', 'item')
  labels_file = run_dir / 'class_labels.txt'
  if not labels_file.is_file():
    raise FileNotFoundError(f'Missing {labels_file}; expected lines '
                            f'"{run_dir.name}/test/itemNN.png '
                            f'{run_dir.name}/training/classNN.png".')
  training_index = {p.resolve(): i for i, p in enumerate(training)}
  test_index = {p.resolve(): i for i, p in enumerate(test)}
  test_labels = np.full(len(test), -1, np.int32)
  for line_no, line in enumerate(labels_file.read_text().splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split()
    where = f'{labels_file}:{line_no}'
    if len(fields) != 2:
      raise ValueError(f'{where}: expected "<test image> <training image>", '
                       f'got {line!r}.')
    # Paths are relative to the folder holding the runs (as published);
    # paths relative to the run folder are accepted too.
    resolved = []
    for field, index in zip(fields, (test_index, training_index)):
      candidates = [(runs_dir / field).resolve(), (run_dir / field).resolve()]
      found = [c for c in candidates if c in index]
      if not found:
        raise ValueError(f'{where}: {field!r} is not one of the '
                         f'{"test" if index is test_index else "training"} '
                         f'images of {run_dir}.')
      resolved.append(index[found[0]])
    item, cls = resolved
    if test_labels[item] >= 0:
      raise ValueError(f'{where}: {fields[0]!r} is labelled twice.')
    test_labels[item] = cls
  unlabelled = [test[i].name for i in np.flatnonzero(test_labels < 0)]
  if unlabelled:
    raise ValueError(f'{labels_file} gives no label for {unlabelled[:3]}.')
  return OmniglotRun(
      name=run_dir.name,
      training_images=_stack(training, image_size),
      test_images=_stack(test, image_size),
      test_labels=test_labels)


def read_omniglot_runs(runs_dir: str | os.PathLike,
                       image_size: int | None = 28) -> list[OmniglotRun]:
  """Reads Lake et al.'s one-shot classification runs (the `all_runs` folder).

  Layout: `<runs_dir>/runNN/training/classNN.png` (one drawing per class),
  `<runs_dir>/runNN/test/itemNN.png` and `<runs_dir>/runNN/class_labels.txt`,
  whose lines read `runNN/test/itemNN.png runNN/training/classNN.png`.
  The images are 105x105 1-bit PNGs; they are read as 0/255 and resized to
  `image_size` (None keeps them).

  Returns:
    The runs sorted by number (20 in the published set, each with 20 training
    and 20 test images).

  Raises:
    FileNotFoundError: `runs_dir` or a file of the layout is missing.
    ValueError: the folder does not have the layout above.
  """
  runs_dir = pathlib.Path(runs_dir)
  if not runs_dir.is_dir():
    raise FileNotFoundError(
        f'Omniglot runs folder {runs_dir} does not exist; expected the '
        'published all_runs folder (run01/, run02/, ... each with training/, '
        'test/ and class_labels.txt).')
  pattern = re.compile(r'run(\d+)')
  run_dirs = sorted((p for p in runs_dir.iterdir()
                     if p.is_dir() and pattern.fullmatch(p.name)),
                    key=lambda p: int(pattern.fullmatch(p.name)[1]))
  if not run_dirs:
    raise ValueError(
        f'No runNN/ folders in {runs_dir}; expected the published all_runs '
        'layout runNN/{training/classNN.png, test/itemNN.png, '
        'class_labels.txt}.')
  return [_read_run(runs_dir, run_dir, image_size) for run_dir in run_dirs]
