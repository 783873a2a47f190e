"""Reading a run's records: metric series, final values and config changes.

A record is one line of a workdir's `metrics.jsonl` as
`fewshot.workdir.read_metrics` returns it: `step`, `time` and scalars named
`train_<metric>`, `val_<metric>`, `test_<metric>`; a run with several
tasks, heads or domains logs `val_<name>_<metric>`, and a 95% CI beside a
metric as `val_ci95` (for `val_accuracy`) or `<key>_ci95`. A config is a
`config.json` as nested dicts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

Record = Mapping[str, Any]


def is_number(value: Any) -> bool:
  """Whether `value` is an int or float (not a bool)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_series(records: Sequence[Record], key: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """`(steps, values)` of `key`, by step, non-finite values kept.

  A resumed run repeats the steps after its last checkpoint: the value
  logged last at a step is the one kept.
  """
  by_step = {}
  for record in records:
    if is_number(record.get(key)):
      by_step[int(record['step'])] = float(record[key])
  steps = sorted(by_step)
  return (np.asarray(steps, dtype=np.int64),
          np.asarray([by_step[s] for s in steps], dtype=np.float64))


def final_value(records: Sequence[Record], key: str) -> float | None:
  """`key`'s value at the last step that logged it (None if never)."""
  _, values = metric_series(records, key)
  return float(values[-1]) if values.size else None


def ci_key(key: str, keys: Sequence[str] | set[str]) -> str | None:
  """The 95% CI key logged beside `key`, if any.

  `val_accuracy` -> `val_ci95`, `val_<name>_accuracy` -> `val_<name>_ci95`,
  any other `val_<m>` -> `val_<m>_ci95`.
  """
  for candidate in (f'{key}_ci95', key[:-len('accuracy')] + 'ci95'
                    if key.endswith('accuracy') else None):
    if candidate in keys and candidate != key:
      return candidate
  return None


def named_keys(records: Sequence[Record], split: str, metric: str
               ) -> dict[str, str]:
  """`{name: key}` of `split`'s `metric`: `''` for `<split>_<metric>`, else
  `name` for `<split>_<name>_<metric>`, sorted by name."""
  keys = {k for r in records for k, v in r.items() if is_number(v)}
  found = {}
  for key in keys:
    if key == f'{split}_{metric}':
      found[''] = key
    elif key.startswith(f'{split}_') and key.endswith(f'_{metric}'):
      found[key[len(split) + 1:-len(metric) - 1]] = key
  return dict(sorted(found.items()))


def flatten_config(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """`{'optimizer.learning_rate': 0.001, ...}` of a nested config dict; an
  empty section stays as `{name: {}}` (adding one is a change)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, f'{prefix}{key}.') or
                  {f'{prefix}{key}': {}})
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(configs: Sequence[Mapping[str, Any]]
                       ) -> dict[str, list[Any]]:
  """`{dotted key: [value per config]}` of the keys whose values differ
  (a key missing from a config differs, its value None), sorted."""
  flat = [flatten_config(c) for c in configs]
  keys = sorted(set().union(*flat)) if flat else []
  missing = object()
  differing = {}
  for key in keys:
    values = [f.get(key, missing) for f in flat]
    if any(v != values[0] for v in values[1:]):
      differing[key] = [None if v is missing else v for v in values]
  return differing


__all__ = ['Record', 'ci_key', 'config_differences', 'final_value',
           'flatten_config', 'is_number', 'metric_series', 'named_keys']
