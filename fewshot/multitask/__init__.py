"""Multi-task learning pieces below the objective: gradients and weighting.

* `gradients`: per-task gradients from one forward pass, their Gram matrix;
* `simplex`: the small simplex problems of MGDA and CAGrad;
* `weighting`: equal, fixed, uncertainty, DWA, GradNorm, PCGrad, CAGrad,
  MGDA (`WEIGHTINGS`, `make_weighting`);
* `improvement`: Delta-p and per-task gaps against single-task baselines.

The objective that trains one encoder with named heads on them is
`fewshot.objectives.multitask`.
"""

from fewshot.multitask.gradients import combine, gram_matrix, task_gradients
from fewshot.multitask.improvement import delta_p, task_gaps
from fewshot.multitask.weighting import (WEIGHTINGS, Combination, Weighting,
                                         make_weighting)

__all__ = ['Combination', 'WEIGHTINGS', 'Weighting', 'combine', 'delta_p',
           'gram_matrix', 'make_weighting', 'task_gaps', 'task_gradients']
