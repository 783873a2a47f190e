"""`Experiment`: what a config describes, built (`fewshot.builder.build`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optax

from fewshot.backbones.base import ModelState, Params
from fewshot.evaluators.episodes import Evaluator, FewShotLearner
from fewshot.evaluators.retrieval import Embedder
from fewshot.objectives.base import Objective


class Experiment(NamedTuple):
  """What a config describes, built.

  Attributes:
    objective: what is trained (None for an evaluation-only config).
    optimizer: its optimizer (None without an objective).
    train_data: the training data as host (numpy) arrays, the pytree
      `objective.sample` takes once the harness has placed it.
    learner: how the trained parameters are evaluated few-shot.
    validate: the evaluator run during training (`eval.val_episodes`
      meta-validation episodes).
    evaluators: `{'val', 'test'}` evaluators of `eval.num_episodes`.
    initial: `() -> (params, model_state)` of the model as configured,
      before any training (pretrained weights where configured).
    seed: the run's seed.
    info: what evaluation results are labelled with.
    embedder: how the trained parameters embed images (the backbone, with
      a metric run's projection head).
    retrieval: `{'val', 'test'}` -> `() -> Evaluator` of retrieval metrics
      over every image of the split (built when called: it embeds them all).
  """
  objective: Objective | None
  optimizer: optax.GradientTransformation | None
  train_data: Any
  learner: FewShotLearner
  validate: Evaluator
  evaluators: dict[str, Evaluator]
  initial: Callable[[], tuple[Params, ModelState]]
  seed: int
  info: dict[str, Any]
  embedder: Embedder | None = None
  retrieval: dict[str, Callable[[], Evaluator]] | None = None


__all__ = ['Experiment']
