"""Tables of finished runs: one row per workdir, for WORKSPACE.md and papers.

`runs_table` takes `(name, records, config)` per run (the records of
`fewshot.workdir.read_metrics` and the `config.json` dict; see
`fewshot.records`); `markdown_table` prints its rows.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from fewshot.progress import format_duration
from fewshot.records import (Record, ci_key, config_differences, final_value,
                             is_number)


def _metric_keys(records: Sequence[Record], split: str) -> list[str]:
  """`split`'s metrics worth a column: those with a CI, and accuracies."""
  keys = {k for r in records for k, v in r.items() if is_number(v)}
  found = set()
  for key in keys:
    if not key.startswith(f'{split}_') or key.endswith('ci95'):
      continue
    if key.endswith('accuracy') or ci_key(key, keys):
      found.add(key)
  return sorted(found, key=lambda k: (k != f'{split}_accuracy', k))


def _column_name(key: str) -> str:
  split, _, rest = key.partition('_')
  if rest == 'accuracy':
    return f'{split} accuracy (%)'
  if rest.endswith('_accuracy'):
    return f'{split} {rest[:-len("_accuracy")]} (%)'
  name, _, metric = rest.rpartition('_')
  return f'{split} {name} {metric}' if name else f'{split} {metric}'


def _format_metric(key: str, mean: float | None, ci: float | None) -> str:
  if mean is None:
    return '—'
  if not math.isfinite(mean):
    return 'NaN' if math.isnan(mean) else f'{mean}'
  scale, digits = (100.0, 2) if key.endswith('accuracy') else (1.0, 4)
  text = f'{scale * mean:.{digits}f}'
  if ci is not None:
    text += f' ± {scale * ci:.{digits}f}'
  return text


def _cell(value: Any) -> str:
  if value is None:
    return '—'
  if isinstance(value, (list, tuple)):
    return '(' + ', '.join(_cell(v) for v in value) + ')'
  return str(value).replace('|', '\\|')


def runs_table(runs: Sequence[tuple[str, Sequence[Record],
                                    Mapping[str, Any]]]) -> list[list[str]]:
  """The rows (header first) of a table of `(name, records, config)` runs.

  Columns: run, final step, the final validation then test metrics (an
  accuracy as `mean ± ci95` in %, a metric with a CI as `mean ± ci95`),
  wall time (first to last record), then one column per config key whose
  value differs between the runs.
  """
  val_keys, test_keys = [], []
  for _, records, _ in runs:
    for split, found in (('val', val_keys), ('test', test_keys)):
      found.extend(k for k in _metric_keys(records, split) if k not in found)
  for split, found in (('val', val_keys), ('test', test_keys)):
    found.sort(key=lambda k, s=split: (k != f'{s}_accuracy', k))
  differing = config_differences([config for _, _, config in runs])
  header = (['run', 'step'] + [_column_name(k) for k in val_keys + test_keys]
            + ['wall time'] + list(differing))
  rows = [header]
  for i, (name, records, _) in enumerate(runs):
    keys = {k for r in records for k in r}
    steps = [int(r['step']) for r in records if 'step' in r]
    times = [float(r['time']) for r in records if is_number(r.get('time'))]
    row = [_cell(name), str(max(steps)) if steps else '—']
    for key in val_keys + test_keys:
      band = ci_key(key, keys)
      row.append(_format_metric(key, final_value(records, key),
                                final_value(records, band) if band else None))
    row.append(format_duration(max(times) - min(times)) if times else '—')
    row.extend(_cell(values[i]) for values in differing.values())
    rows.append(row)
  return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
  """`rows` (header first) as a GitHub Markdown table."""
  header, *body = rows
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in body]
  return '\n'.join(lines)


__all__ = ['markdown_table', 'runs_table']
