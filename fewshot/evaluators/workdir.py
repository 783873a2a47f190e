"""Evaluating a workdir's latest checkpoint, or a configured model as it is."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from fewshot import workdir as workdir_lib
from fewshot.experiment import Experiment
from fewshot.evaluators.omniglot_runs import omniglot_runs_error_rate
from fewshot.objectives.base import init_state


def restore(experiment: Experiment, workdir: str) -> tuple[Any, Any, int]:
  """`(params, model_state, step)` of the latest checkpoint of `workdir`."""
  if experiment.objective is None:
    raise ValueError('This config has no objective section, so it cannot '
                     f'read the training checkpoints in {workdir}; evaluate '
                     'with the config the workdir was trained with.')
  state = init_state(experiment.objective, experiment.optimizer,
                     experiment.train_data, experiment.seed)
  state = workdir_lib.restore_state(workdir, state)
  return state.params, state.model_state, int(state.step)


PROTOCOLS = ('episodes', 'retrieval')


def evaluate_workdir(experiment: Experiment, workdir: str | None, *,
                     split: str = 'test', protocol: str = 'episodes',
                     per_episode: bool = False) -> dict[str, Any]:
  """Accuracy and 95% CI of a model on the seeded episodes of `split`, or
  its retrieval metrics over every image of `split` (`protocol`).

  The model is the latest checkpoint of `workdir`, or with `workdir=None`
  the configured model as built from its `backbone.weights` (a pretrained
  backbone with a linear probe, say, or fine-tuned per episode). Every
  model evaluated with the same `eval` settings sees the same episodes.
  `per_episode=True` adds `accuracies`, the list of per-episode accuracies
  (few-shot episodes only; other evaluations raise a ValueError).

  Returns:
    The evaluator's summary (episodes: `accuracy`, `ci95`, `episodes`,
    ways, shots, queries; retrieval: `precision_at_1`, `r_precision`,
    `map_at_r`, `recall_at_k`, `images`, `classes`; both: `seconds`) with
    `split`, `step`, `protocol` and the experiment's `info`.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'Unknown protocol {protocol!r}; known: {PROTOCOLS}.')
  if split not in experiment.evaluators:
    raise ValueError(f'No {split!r} split to evaluate; the dataset has '
                     f'{sorted(experiment.evaluators)}.')
  if protocol == 'retrieval' and not experiment.retrieval:
    raise ValueError('This experiment has no retrieval evaluation.')
  # Built first, so that a model it cannot evaluate fails before loading.
  if protocol == 'retrieval':
    evaluate = experiment.retrieval[split]()
  else:
    evaluate = experiment.evaluators[split]
  if per_episode and (protocol != 'episodes' or 'per_episode' not in
                      inspect.signature(evaluate).parameters):
    raise ValueError('Per-episode accuracies come from few-shot episodes '
                     f'only; this evaluation ({protocol}) has none.')
  info = dict(experiment.info)
  if workdir is None:
    # Frozen features alone are a model only if nothing on them is trained.
    untrained_on_features = (info.get('features') and
                             info.get('trainable_parameters') == 0)
    if not info.get('weights') and not untrained_on_features:
      raise ValueError('Nothing to evaluate: give a workdir with checkpoints, '
                       'or config.backbone.weights (a pretrain workdir or a '
                       "named source such as 'imagenet'), or frozen features "
                       '(config.data.features) with no trained network on '
                       "them (backbone 'mlp' with widths=()).")
    params, model_state = experiment.initial()
    step = 0
  else:
    params, model_state, step = restore(experiment, workdir)
    info['weights'] = workdir
  result = (evaluate(params, model_state, per_episode=True) if per_episode
            else evaluate(params, model_state))
  # A few-label evaluator names its own protocol.
  result.update(split=split, step=step, **info)
  result.setdefault('protocol', protocol)
  return result


def evaluate_omniglot_runs(experiment: Experiment, workdir: str,
                           runs: Sequence) -> dict[str, Any]:
  """Lake's 20-way one-shot runs error rate of a workdir's checkpoint."""
  params, model_state, step = restore(experiment, workdir)
  learner = experiment.learner
  result = omniglot_runs_error_rate(learner.algorithm,
                                    learner.meta_params(params),
                                    learner.model_state(model_state),
                                    runs)
  result['step'] = step
  return result


__all__ = ['PROTOCOLS', 'evaluate_omniglot_runs', 'evaluate_workdir',
           'restore']
