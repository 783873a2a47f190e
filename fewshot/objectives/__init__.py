"""Training objectives: what a run needs from a method, one file each.

`OBJECTIVES` maps a config's `objective.name` to its factory; the builder
(`fewshot.builder`) calls it and the harness (`fewshot.harness`) runs the
result. A new objective is a new file with a factory returning an
`Objective`, plus its entry in the builder.
"""

from fewshot.objectives.adaptation import adaptation
from fewshot.objectives.base import (Objective, TrainState, init_state,
                                     make_train_step)
from fewshot.objectives.distillation import distillation
from fewshot.objectives.episodic import episodic
from fewshot.objectives.metric import metric
from fewshot.objectives.multitask import multitask
from fewshot.objectives.supervised import supervised

OBJECTIVES = {
    'adaptation': adaptation,
    'distillation': distillation,
    'episodic': episodic,
    'metric': metric,
    'multitask': multitask,
    'supervised': supervised,
}

__all__ = ['OBJECTIVES', 'Objective', 'TrainState', 'adaptation', 'distillation',
           'episodic',
           'init_state', 'make_train_step', 'metric', 'multitask',
           'supervised']
