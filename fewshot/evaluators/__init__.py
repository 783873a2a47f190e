"""Evaluators: seeded few-shot episodes with CIs, Omniglot runs, workdirs.

`few_shot_evaluator` builds `evaluate(params, model_state) -> summary` from
a `FewShotLearner` (how a trained state is evaluated few-shot) and a split;
the builder makes them for a config and the harness runs them. Workdir
evaluation (`fewshot.evaluators.workdir`) sits above the builder's output.
"""

from fewshot.evaluators.episodes import (EvaluateFn, Evaluator, FeatureCache,
                                         FewShotLearner, episode_accuracies,
                                         feature_cache, few_shot_evaluator,
                                         fixed_episode_accuracy)
from fewshot.evaluators.omniglot_runs import omniglot_runs_error_rate

__all__ = ['EvaluateFn', 'Evaluator', 'FeatureCache', 'FewShotLearner',
           'episode_accuracies', 'feature_cache', 'few_shot_evaluator',
           'fixed_episode_accuracy', 'omniglot_runs_error_rate']
