"""Labelled text as class-grouped token ids: tokenizer, files, datasets.

A text dataset is a `ClassDataset` whose `images` are int32 token ids
`[M, L]`, right-padded with the tokenizer's pad id to one length bucket
(the longest text rounded up to a multiple of `multiple_of`, at most
`max_length`), so episode samplers, probes, metric losses and every
algorithm run on text unchanged; a text backbone (`BertEncoder`) derives
its attention mask from the pad id.

    tokenizer = Tokenizer.from_file(text_weights.tokenizer_file('minilm_l6'))
    texts, labels = read_labelled_texts('intents.csv')
    dataset = text_dataset(texts, labels, tokenizer, max_length=64)

Tokenisation is Hugging Face `tokenizers` reading a `tokenizer.json`
(offline, no hand-written WordPiece).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import warnings
from typing import Any, Sequence

import numpy as np

from fewshot.data.dataset import ClassDataset

OVERFLOWS = ('truncate', 'error')
# Column names tried, in order, when a file's label column is not named.
LABEL_FIELDS = ('label', 'category', 'intent', 'class')


class Tokenizer:
  """A `tokenizers.Tokenizer` that returns padded int32 id arrays.

  Attributes:
    pad_id: the id that pads sequences (BERT's `[PAD]` is 0).
    max_positions: the longest sequence the model's position table takes.
  """

  def __init__(self, tokenizer: Any, *, pad_token: str = '[PAD]',
               max_positions: int = 512, source: str = '<tokenizer>'):
    self._tokenizer = tokenizer
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
      raise ValueError(f'{source} has no pad token {pad_token!r}.')
    self.pad_id = int(pad_id)
    self.max_positions = int(max_positions)
    self.source = source

  @classmethod
  def from_file(cls, path: str | os.PathLike[str], **kwargs: Any
                ) -> 'Tokenizer':
    """Reads a Hugging Face `tokenizer.json`.

    Raises:
      FileNotFoundError: there is no such file.
      ValueError: it is not a `tokenizers` JSON file.
    """
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ImportError("Text datasets need Hugging Face tokenizers: pip "
                        "install tokenizers (or 'fewshot[text]').") from error
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'No tokenizer file at {path} (expected a '
                              'Hugging Face tokenizer.json).')
    try:
      tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception
      raise ValueError(f'{path} is not a Hugging Face tokenizer.json: '
                       f'{error}') from error
    return cls(tokenizer, source=str(path), **kwargs)

  def encode(self, texts: Sequence[str], *, max_length: int | None = None,
             overflow: str = 'truncate', multiple_of: int = 8) -> np.ndarray:
    """Token ids `[M, L]` int32 (special tokens included), right-padded.

    Args:
      texts: M strings.
      max_length: the longest sequence kept (default and upper bound: the
        position table, `max_positions`).
      overflow: 'truncate' (keep the first tokens, with a warning that
        counts the texts cut) or 'error' for texts longer than `max_length`.
      multiple_of: L is the longest encoded text rounded up to a multiple
        of this, capped at `max_length` (a few compiled shapes, little
        padding).
    """
    if overflow not in OVERFLOWS:
      raise ValueError(f'overflow must be one of {OVERFLOWS}, got '
                       f'{overflow!r}.')
    if max_length is None:
      max_length = self.max_positions
    if not 2 < max_length <= self.max_positions:
      raise ValueError(f'max_length must lie in (2, {self.max_positions}] '
                       f'(the position table), got {max_length}.')
    texts = [str(t) for t in texts]
    encoded = [e.ids for e in self._tokenizer.encode_batch(texts)]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long:
      longest = max(len(encoded[i]) for i in too_long)
      message = (f'{len(too_long)} of {len(texts)} texts are longer than '
                 f'max_length={max_length} tokens (longest {longest}), e.g. '
                 f'{texts[too_long[0]][:80]!r}')
      if overflow == 'error':
        raise ValueError(message + '; raise max_length or use '
                         "overflow='truncate'.")
      warnings.warn(message + '; they are truncated.')
      self._tokenizer.enable_truncation(max_length)
      try:
        cut = self._tokenizer.encode_batch([texts[i] for i in too_long])
      finally:
        self._tokenizer.no_truncation()
      for i, e in zip(too_long, cut):
        encoded[i] = e.ids
    longest = max((len(ids) for ids in encoded), default=1)
    length = min(max_length, -(-longest // multiple_of) * multiple_of)
    ids = np.full((len(encoded), length), self.pad_id, np.int32)
    for i, row in enumerate(encoded):
      ids[i, :len(row)] = row
    return ids


def read_labelled_texts(path: str | os.PathLike[str], *,
                        text_field: str = 'text',
                        label_field: str | None = None
                        ) -> tuple[list[str], list[str]]:
  """`(texts, labels)` from a CSV (with a header) or JSON-lines file.

  The format follows the suffix (`.csv`, `.tsv`; `.jsonl`, `.json`,
  `.ndjson`). Without `label_field` the first of `LABEL_FIELDS` present
  is used. Labels come back as strings.

  Raises:
    FileNotFoundError, or ValueError naming the missing column, the line
    of a malformed JSON record, or an empty text.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'No text file at {path}.')
  suffix = path.suffix.lower()
  if suffix in ('.csv', '.tsv'):
    with open(path, newline='', encoding='utf-8') as f:
      records = list(csv.DictReader(
          f, delimiter='\t' if suffix == '.tsv' else ','))
  elif suffix in ('.jsonl', '.json', '.ndjson'):
    records = []
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f'{path}:{number} is not a JSON object: '
                           f'{error}') from error
        if not isinstance(record, dict):
          raise ValueError(f'{path}:{number} is not a JSON object.')
        records.append(record)
  else:
    raise ValueError(f'{path}: unknown text file type {suffix!r}; use .csv, '
                     '.tsv or .jsonl.')
  if not records:
    raise ValueError(f'{path} holds no records.')
  fields = list(records[0])
  if label_field is None:
    label_field = next((f for f in LABEL_FIELDS if f in fields), None)
    if label_field is None:
      raise ValueError(f'{path} has no label column ({", ".join(LABEL_FIELDS)}'
                       f'); its columns are {fields}: set label_field.')
  for field in (text_field, label_field):
    if field not in fields:
      raise ValueError(f'{path} has no column {field!r}; its columns are '
                       f'{fields}.')
  texts, labels = [], []
  for number, record in enumerate(records, 1):
    text, label = record.get(text_field), record.get(label_field)
    if text is None or not str(text).strip() or label is None:
      raise ValueError(f'{path}: record {number} has an empty '
                       f'{text_field!r} or {label_field!r}.')
    texts.append(str(text))
    labels.append(str(label))
  return texts, labels


def text_dataset(texts: Sequence[str], labels: Sequence[str],
                 tokenizer: Tokenizer, *,
                 class_names: Sequence[str] | None = None,
                 max_length: int | None = None, overflow: str = 'truncate',
                 multiple_of: int = 8) -> ClassDataset:
  """A `ClassDataset` of token ids, rows sorted by class (stable).

  `class_names` fixes the classes and their order (default: the sorted
  distinct labels); a label outside it is a ValueError.
  """
  if len(texts) != len(labels):
    raise ValueError(f'{len(texts)} texts but {len(labels)} labels.')
  if class_names is None:
    class_names = sorted(set(labels))
  index = {name: i for i, name in enumerate(class_names)}
  unknown = sorted(set(labels) - set(index))
  if unknown:
    raise ValueError(f'{len(unknown)} labels are not among the classes, e.g. '
                     f'{unknown[:3]}.')
  label_ids = np.array([index[label] for label in labels], np.int32)
  order = np.argsort(label_ids, kind='stable')
  ids = tokenizer.encode([texts[i] for i in order], max_length=max_length,
                         overflow=overflow, multiple_of=multiple_of)
  return ClassDataset(ids, label_ids[order], tuple(class_names))
