"""Learning curves, accuracy histograms and run tables of finished runs.

Everything here takes what a workdir holds, already read: the records of
`fewshot.workdir.read_metrics` (one dict per log line, `step`, `time` and
`train_<metric>`, `val_<metric>`, `test_<metric>` scalars) and its
`config.json` as a dict. The drawing functions return a matplotlib
`Figure` (object-oriented API, no pyplot state; `figure.savefig(path)`
needs no display); matplotlib is imported only when one is called.

Metric names: a run with one head logs `val_accuracy` with `val_ci95`; a
run with several tasks, heads or domains logs `val_<name>_accuracy` with
`val_<name>_ci95` (a regressor `val_<name>_mse` with `val_<name>_mse_ci95`),
and training metrics `train_loss`, `train_<name>_loss`, `train_accuracy`,
`train_<name>_accuracy`. A figure draws one colour per run and one line
style per name.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from fewshot.stats import mean_confidence_interval

Record = Mapping[str, Any]
Run = tuple[str, Sequence[Record]]  # (label, records)

# (split, metric, panel title); a panel is drawn where some run logs it.
PANELS = (('train', 'loss', 'Training loss'),
          ('train', 'accuracy', 'Training accuracy'),
          ('val', 'accuracy', 'Validation accuracy (band: 95% CI)'),
          ('val', 'mse', 'Validation MSE (band: 95% CI)'))
_LINESTYLES = ('-', '--', ':', '-.', (0, (5, 1, 1, 1, 1, 1)))
_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X')


def _matplotlib():
  """`(Figure, Line2D, ticker)`, or an ImportError saying how to install."""
  try:
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
    from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Plots need matplotlib: pip install matplotlib (or '
                      "pip install -e '.[plots]').") from e
  return Figure, Line2D, ticker


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_series(records: Sequence[Record], key: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """`(steps, values)` of `key`, by step, non-finite values kept.

  A resumed run repeats the steps after its last checkpoint: the value
  logged last at a step is the one kept.
  """
  by_step = {}
  for record in records:
    if _is_number(record.get(key)):
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
  keys = {k for r in records for k, v in r.items() if _is_number(v)}
  found = {}
  for key in keys:
    if key == f'{split}_{metric}':
      found[''] = key
    elif key.startswith(f'{split}_') and key.endswith(f'_{metric}'):
      found[key[len(split) + 1:-len(metric) - 1]] = key
  return dict(sorted(found.items()))


def _finite(steps, *arrays):
  keep = np.all([np.isfinite(a) for a in arrays], axis=0)
  return (steps[keep],) + tuple(a[keep] for a in arrays)


def curves(runs: Sequence[Run], *, title: str | None = None,
           panel_size: tuple[float, float] = (4.8, 3.6), dpi: int = 100):
  """Learning curves of `runs` (`(label, records)` pairs) as one Figure.

  One panel per entry of `PANELS` that some run logs (training loss,
  training accuracy, validation accuracy with its 95% CI band, validation
  MSE), side by side; one colour per run (the figure's legend) and one line
  style per task/head/domain name (each panel's legend, where a run has
  named ones). Non-finite values are left out, and the run's legend entry
  says how many. Every line and band carries `gid` `'<label>|<key>'`.

  Raises:
    ValueError: no run logs any of the panels' metrics.
  """
  Figure, Line2D, ticker = _matplotlib()
  panels = []
  for split, metric, panel_title in PANELS:
    names = {}
    for _, records in runs:
      names.update(named_keys(records, split, metric))
    if names:
      panels.append((split, metric, panel_title, sorted(names)))
  if not panels:
    raise ValueError('No training or validation metrics to plot (keys such '
                     'as train_loss, val_accuracy).')
  width, height = panel_size
  figure = Figure(figsize=(width * len(panels), height), dpi=dpi,
                  layout='constrained')
  axes = figure.subplots(1, len(panels), squeeze=False, sharex=True)[0]
  colours = [f'C{i % 10}' for i in range(len(runs))]
  skipped = [0] * len(runs)
  for ax, (split, metric, panel_title, names) in zip(axes, panels):
    style = {name: i for i, name in enumerate(names)}
    for r, (label, records) in enumerate(runs):
      keys = {k for record in records for k in record}
      for name, key in named_keys(records, split, metric).items():
        steps, values = metric_series(records, key)
        band = ci_key(key, keys) if split != 'train' else None
        ci = (metric_series(records, band)[1] if band else None)
        if ci is not None and ci.shape != values.shape:
          ci = None  # logged at other steps than the mean: no band
        skipped[r] += int(np.sum(~np.isfinite(values)))
        kept_steps, kept = _finite(steps, values)
        ax.plot(kept_steps, kept, color=colours[r], gid=f'{label}|{key}',
                linestyle=_LINESTYLES[style[name] % len(_LINESTYLES)],
                marker=(_MARKERS[style[name] % len(_MARKERS)]
                        if split != 'train' else None),
                markersize=3.5, linewidth=1.4)
        if ci is not None:
          skipped[r] += int(np.sum(~np.isfinite(ci)))
          band_steps, mean, half = _finite(steps, values, ci)
          ax.fill_between(band_steps, mean - half, mean + half,
                          color=colours[r], alpha=0.18, linewidth=0,
                          gid=f'{label}|{band}')
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel('step')
    ax.set_ylabel(metric if metric != 'accuracy' else 'accuracy (%)')
    if metric == 'accuracy':
      ax.yaxis.set_major_formatter(ticker.PercentFormatter(xmax=1.0))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if names != ['']:  # name the line styles (a single name too)
      handles = [Line2D([], [], color='0.3', label=name or metric,
                        linestyle=_LINESTYLES[i % len(_LINESTYLES)],
                        marker=(_MARKERS[i % len(_MARKERS)]
                                if split != 'train' else None))
                 for i, name in enumerate(names)]
      ax.legend(handles=handles, fontsize=7, title='name', title_fontsize=7)
  handles = [Line2D([], [], color=colours[r], linewidth=2,
                    label=label + (f' ({skipped[r]} non-finite '
                                   f"value{'s' if skipped[r] > 1 else ''} "
                                   'skipped)' if skipped[r] else ''))
             for r, (label, _) in enumerate(runs)]
  figure.legend(handles=handles, loc='outside lower center',
                ncols=min(len(runs), 4), frameon=False, fontsize=9)
  if title:
    figure.suptitle(title)
  return figure


def _bin_edges(values: np.ndarray) -> np.ndarray:
  """Edges centred on the values' grid (accuracies are multiples of
  1 / queries), so that no bin is empty by aliasing; else 'auto' bins."""
  unique = np.unique(values)
  if unique.size > 1:
    gap = float(np.min(np.diff(unique)))
    offsets = (unique - unique[0]) / gap
    if unique.size <= 60 and np.allclose(offsets, np.round(offsets),
                                         atol=1e-6):
      count = int(round(offsets[-1])) + 1
      return unique[0] - gap / 2 + gap * np.arange(count + 1)
  elif unique.size == 1:
    return np.array([unique[0] - 0.01, unique[0] + 0.01])
  return np.histogram_bin_edges(values, bins='auto')


def accuracy_histogram(accuracies: Any, *, ci95: float | None = None,
                       title: str | None = None,
                       size: tuple[float, float] = (6.0, 4.0),
                       dpi: int = 100):
  """A histogram of per-episode accuracies (in [0, 1]) as a Figure.

  The mean is a vertical line and its 95% CI (`ci95`, by default
  `fewshot.stats.mean_confidence_interval`'s) a band around it.
  """
  Figure, _, ticker = _matplotlib()
  values = np.asarray(accuracies, dtype=np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError('No accuracies to draw.')
  if ci95 is None:
    mean, ci95 = (mean_confidence_interval(values) if values.size > 1
                  else (float(values[0]), 0.0))
  else:
    mean = float(values.mean())
  figure = Figure(figsize=size, dpi=dpi, layout='constrained')
  ax = figure.subplots()
  ax.hist(values, bins=_bin_edges(values), color='C0', alpha=0.75,
          edgecolor='white', gid='episodes')
  ax.axvspan(mean - ci95, mean + ci95, color='C3', alpha=0.2, gid='ci95',
             label=f'95% CI ± {100 * ci95:.2f}')
  ax.axvline(mean, color='C3', linewidth=1.5, gid='mean',
             label=f'mean {100 * mean:.2f}%')
  ax.xaxis.set_major_formatter(ticker.PercentFormatter(xmax=1.0))
  ax.set_xlabel('episode accuracy')
  ax.set_ylabel('episodes')
  ax.legend(loc='upper left', fontsize=9)
  ax.set_title(title or f'{values.size} episodes: {100 * mean:.2f}% ± '
               f'{100 * ci95:.2f} (95% CI)', fontsize=10)
  ax.grid(alpha=0.3, axis='y')
  return figure


# Runs table --------------------------------------------------------------


def _flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(configs: Sequence[Mapping[str, Any]]
                       ) -> dict[str, list[Any]]:
  """`{dotted key: [value per config]}` of the keys whose values differ
  (a key missing from a config differs, its value None), sorted."""
  flat = [_flatten(c) for c in configs]
  keys = sorted(set().union(*flat)) if flat else []
  missing = object()
  differing = {}
  for key in keys:
    values = [f.get(key, missing) for f in flat]
    if any(v != values[0] for v in values[1:]):
      differing[key] = [None if v is missing else v for v in values]
  return differing


def _metric_keys(records: Sequence[Record], split: str) -> list[str]:
  """`split`'s metrics worth a column: those with a CI, and accuracies."""
  keys = {k for r in records for k, v in r.items() if _is_number(v)}
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


def format_duration(seconds: float) -> str:
  """`'42 s'`, `'12.5 min'` or `'3.2 h'`."""
  if seconds < 120:
    return f'{seconds:.0f} s'
  if seconds < 2 * 3600:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.1f} h'


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
    times = [float(r['time']) for r in records if _is_number(r.get('time'))]
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


__all__ = ['PANELS', 'accuracy_histogram', 'ci_key', 'config_differences',
           'curves', 'final_value', 'format_duration', 'markdown_table',
           'metric_series', 'named_keys', 'runs_table']
