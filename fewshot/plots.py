"""Learning curves and accuracy histograms of finished runs.

Everything here takes what a workdir holds, already read: the records of
`fewshot.workdir.read_metrics` (one dict per log line, `step`, `time` and
`train_<metric>`, `val_<metric>`, `test_<metric>` scalars; see
`fewshot.records`). The drawing functions return a matplotlib
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

from typing import Any, Sequence

import numpy as np

from fewshot.records import Record, ci_key, metric_series, named_keys
from fewshot.stats import mean_confidence_interval

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


__all__ = ['PANELS', 'accuracy_histogram', 'curves']
