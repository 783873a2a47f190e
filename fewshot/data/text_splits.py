"""Train/val/test splits of labelled text: class splits and few-label splits.

Two protocols, for banking77 (`banking77_splits`) and any CSV or JSON-lines
file of (text, label) pairs (`text_splits`):

* 'episodic': disjoint classes per split, for N-way K-shot episodes. The
  classes come from a class-split JSON file (`{"train": [...], "val":
  [...], "test": [...]}`; banking77's committed 27/25/25 intents are
  `splits/banking77.json`) or a seeded split by `fractions`. Every text of a
  class (both files, when a test file is given) goes to its split.
* 'few_label': every class in every split. 'train' holds `shots` seeded
  texts per class of the training file, 'val' `val_shots` more, 'test' the
  test file (banking77: `test.csv`, 40 per intent) or, without one, the
  rest. `fewshot.evaluators.few_label` fits on 'train' and tests on all of
  'test' (77-way with 10 or 30 labelled examples per intent).

All splits share one token length (one encoding of every text).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pathlib
from typing import Sequence

import numpy as np

from fewshot.data import sources
from fewshot.data.cache import default_manual_dir
from fewshot.data.dataset import ClassDataset
from fewshot.data.text import Tokenizer, read_labelled_texts, text_dataset

PROTOCOLS = ('episodic', 'few_label')
SPLITS = ('train', 'val', 'test')


def _tokenizer(tokenizer: str | os.PathLike[str] | Tokenizer) -> Tokenizer:
  if isinstance(tokenizer, Tokenizer):
    return tokenizer
  return Tokenizer.from_file(tokenizer)


def read_class_split(path: str | os.PathLike[str]) -> dict[str, list[str]]:
  """`{'train': [...], 'val': [...], 'test': [...]}` class names from JSON."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'No class-split file at {path}.')
  split = json.loads(path.read_text())
  missing = [s for s in SPLITS if s not in split]
  if missing:
    raise ValueError(f'{path} has no {missing} class lists; it needs '
                     f'{list(SPLITS)}.')
  names = [n for s in SPLITS for n in split[s]]
  if len(set(names)) != len(names):
    raise ValueError(f'{path}: the train, val and test classes overlap.')
  return {s: list(split[s]) for s in SPLITS}


def _seeded_class_split(class_names: Sequence[str],
                        fractions: Sequence[float], seed: int
                        ) -> dict[str, list[str]]:
  if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(f'fractions must be 3 numbers summing to 1, got '
                     f'{tuple(fractions)}.')
  order = np.random.default_rng(seed).permutation(len(class_names))
  bounds = np.round(np.cumsum([0.0, *fractions]) * len(class_names))
  bounds = bounds.astype(int)
  return {s: sorted(class_names[i] for i in order[a:b])
          for s, a, b in zip(SPLITS, bounds[:-1], bounds[1:])}


def _rows(dataset: ClassDataset, rows: np.ndarray) -> ClassDataset:
  rows = np.sort(rows)
  return ClassDataset(dataset.images[rows], dataset.labels[rows],
                      dataset.class_names)


def text_splits(path: str | os.PathLike[str], *,
                tokenizer: str | os.PathLike[str] | Tokenizer,
                test_path: str | os.PathLike[str] | None = None,
                protocol: str = 'episodic',
                class_split: str | os.PathLike[str] | None = None,
                fractions: Sequence[float] = (0.4, 0.3, 0.3),
                shots: int = 10, val_shots: int = 5, seed: int = 0,
                max_length: int = 64, overflow: str = 'truncate',
                text_field: str = 'text', label_field: str | None = None
                ) -> dict[str, ClassDataset]:
  """The 'train'/'val'/'test' splits of a (text, label) file.

  Args:
    path: a CSV/TSV (with a header) or JSON-lines file
      (`fewshot.data.text.read_labelled_texts`).
    tokenizer: a `Tokenizer` or the path of a Hugging Face tokenizer.json.
    test_path: an optional second file, the official test set.
    protocol: 'episodic' or 'few_label' (module docstring).
    class_split: 'episodic': a class-split JSON file; default a seeded
      split of the classes by `fractions`.
    fractions: 'episodic' without `class_split`: train/val/test shares.
    shots, val_shots: 'few_label': seeded texts per class in 'train' and
      'val' (drawn without overlap from `path`; a class with fewer texts is
      a ValueError).
    seed: the seed of the class split or of the few-label draw.
    max_length, overflow: token budget and what to do past it
      (`Tokenizer.encode`).
    text_field, label_field: column names.

  Returns:
    `{'train', 'val', 'test'}` `ClassDataset`s of int32 token ids `[M, L]`.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol must be one of {PROTOCOLS}, got {protocol!r}.')
  tokenizer = _tokenizer(tokenizer)
  texts, labels = read_labelled_texts(path, text_field=text_field,
                                      label_field=label_field)
  source = np.zeros(len(texts), bool)  # True for rows of the test file
  if test_path is not None:
    test_texts, test_labels = read_labelled_texts(
        test_path, text_field=text_field, label_field=label_field)
    unknown = sorted(set(test_labels) - set(labels))
    if unknown:
      raise ValueError(f'{test_path} has labels that {path} lacks, e.g. '
                       f'{unknown[:3]}.')
    texts, labels = texts + test_texts, labels + test_labels
    source = np.concatenate([source, np.ones(len(test_texts), bool)])
  class_names = sorted(set(labels))
  # One encoding (one length bucket); rows sorted by class, stably, so the
  # source flags follow the same permutation.
  label_ids = np.array([class_names.index(l) for l in labels])
  source = source[np.argsort(label_ids, kind='stable')]
  everything = text_dataset(texts, labels, tokenizer, class_names=class_names,
                            max_length=max_length, overflow=overflow)
  if protocol == 'episodic':
    names = (read_class_split(class_split) if class_split is not None else
             _seeded_class_split(class_names, fractions, seed))
    return {s: everything.select_names(names[s]) for s in SPLITS}
  rng = np.random.default_rng(seed)
  train_rows, val_rows, rest_rows = [], [], []
  for c, name in enumerate(class_names):
    pool = np.flatnonzero((everything.labels == c) & ~source)
    if len(pool) < shots + val_shots:
      raise ValueError(f'Class {name!r} has {len(pool)} texts in {path}, '
                       f'fewer than shots + val_shots = {shots + val_shots}.')
    pool = rng.permutation(pool)
    train_rows.append(pool[:shots])
    val_rows.append(pool[shots:shots + val_shots])
    rest_rows.append(pool[shots + val_shots:])
  test_rows = (np.flatnonzero(source) if test_path is not None else
               np.concatenate(rest_rows))
  return {'train': _rows(everything, np.concatenate(train_rows)),
          'val': _rows(everything, np.concatenate(val_rows)),
          'test': _rows(everything, test_rows)}


def banking77_class_split() -> pathlib.Path:
  """The committed 27/25/25 intent split (`splits/banking77.json`)."""
  return pathlib.Path(str(importlib.resources.files('fewshot.data').joinpath(
      'splits/banking77.json')))


def banking77_splits(*, tokenizer: str | os.PathLike[str] | Tokenizer,
                     manual_dir: str | os.PathLike[str] | None = None,
                     protocol: str = 'episodic', shots: int = 10,
                     val_shots: int = 5, seed: int = 0, max_length: int = 64,
                     overflow: str = 'truncate') -> dict[str, ClassDataset]:
  """banking77 (Casanueva et al. 2020) from `<manual_dir>/banking77`.

  'episodic' uses the committed intent split (27 / 25 / 25, every text of
  `train.csv` and `test.csv`); 'few_label' draws `shots` (and `val_shots`)
  texts per intent from `train.csv` with `seed` and tests on `test.csv`.
  At `max_length=64` tokens, 35 of the 13,083 texts are truncated (with a
  warning).
  `manual_dir` defaults to `$FEWSHOT_MANUAL_DIR`.
  """
  base = default_manual_dir(manual_dir)
  files = ('train.csv', 'test.csv')
  # `<manual_dir>/banking77/`, or the manual dir itself if it holds them.
  extra = [base] if base is not None else []
  root = sources.check_manual_files('banking77', base, subdir='banking77',
                                    files=files, extra_folders=extra)
  train, test = root / 'train.csv', root / 'test.csv'
  return text_splits(train, tokenizer=tokenizer, test_path=test,
                     protocol=protocol,
                     class_split=banking77_class_split()
                     if protocol == 'episodic' else None,
                     shots=shots, val_shots=val_shots, seed=seed,
                     max_length=max_length, overflow=overflow,
                     label_field='category')
