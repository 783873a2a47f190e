"""Multi-task results against single-task baselines: Delta-p and per-task gaps.

`delta_p` is LibMTL's `count_improvement` (Maninis et al. 2019; Lin and
Zhang 2023): the mean over tasks of the mean over each task's metrics of
the relative change against the single-task baseline, with the sign
flipped for metrics where lower is better, in percent.
`task_gaps` compares per-seed results: for each task, multi-task minus
single-task with a 95% confidence interval over the seeds, and which tasks
gain and which lose (the interval excludes zero).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fewshot.stats import mean_confidence_interval

Results = Mapping[str, Mapping[str, float]]   # task -> metric -> value


def delta_p(results: Results, baselines: Results,
            higher_is_better: Mapping[str, Mapping[str, bool]]) -> float:
  """Delta-p in percent: `100/T sum_t 1/M_t sum_m (-1)^{h} (B - N) / B`.

  `h` is 1 where higher is better (the change `(N - B) / B` counts), 0
  where lower is better. Every task and metric of `results` needs a
  baseline and a direction.
  """
  if not results:
    raise ValueError('delta_p needs at least one task.')
  per_task = []
  for task, metrics in results.items():
    if task not in baselines:
      raise ValueError(f'No single-task baseline for task {task!r}; '
                       f'baselines cover {sorted(baselines)}.')
    changes = []
    for metric, value in metrics.items():
      base = baselines[task].get(metric)
      if base is None:
        raise ValueError(f'The baseline of task {task!r} has no {metric!r}.')
      if base == 0:
        raise ValueError(f'The baseline {metric!r} of task {task!r} is 0, so '
                         'the relative change is undefined.')
      sign = 1.0 if higher_is_better[task][metric] else -1.0
      changes.append(sign * (value - base) / base)
    per_task.append(np.mean(changes))
  return float(100.0 * np.mean(per_task))


def task_gaps(multitask: Mapping[str, Sequence[float]],
              single_task: Mapping[str, Sequence[float]],
              higher_is_better: Mapping[str, bool]) -> dict[str, object]:
  """Per task: multi-task minus single-task over paired seeds, with a CI.

  `multitask[task]` and `single_task[task]` hold one value per seed (the
  same seeds, in the same order). The gap is signed so that positive means
  the multi-task model is better. Returns `{'tasks': {task: {'gap',
  'ci95', 'seeds'}}, 'gain': [...], 'lose': [...]}`; a task gains or loses
  when its interval excludes zero.
  """
  tasks, gain, lose = {}, [], []
  for task, values in multitask.items():
    if task not in single_task:
      raise ValueError(f'No single-task results for task {task!r}.')
    values, base = np.asarray(values, float), np.asarray(single_task[task],
                                                          float)
    if values.shape != base.shape:
      raise ValueError(f'Task {task!r}: {values.size} multi-task seeds but '
                       f'{base.size} single-task seeds.')
    sign = 1.0 if higher_is_better[task] else -1.0
    gap, ci95 = mean_confidence_interval(sign * (values - base))
    tasks[task] = {'gap': gap, 'ci95': ci95, 'seeds': int(values.size)}
    if gap - ci95 > 0:
      gain.append(task)
    elif gap + ci95 < 0:
      lose.append(task)
  return {'tasks': tasks, 'gain': gain, 'lose': lose}


__all__ = ['delta_p', 'task_gaps']
