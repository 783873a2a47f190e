"""The algorithm interface every few-shot learner implements."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from fewshot.backbones.base import ModelState
from fewshot.episodes import Episode

MetaParams = Any  # pytree trained in the outer loop
TaskParams = Any  # pytree produced by adapting to one episode

# (key, sample_images [B,H,W,C]) -> (meta_params, model_state)
InitFn = Callable[[jax.Array, jax.Array], tuple[MetaParams, ModelState]]
# (meta_params, model_state, episode, key, train) -> (task_params, model_state)
AdaptFn = Callable[[MetaParams, ModelState, Episode, jax.Array, bool],
                   tuple[TaskParams, ModelState]]
# (meta_params, model_state, task_params, images [B,H,W,C], train)
#   -> (logits [B, N], model_state)
PredictFn = Callable[[MetaParams, ModelState, TaskParams, jax.Array, bool],
                     tuple[jax.Array, ModelState]]
# (logits [B, N], labels [B]) -> mean loss
QueryLossFn = Callable[[jax.Array, jax.Array], jax.Array]


class Algorithm(NamedTuple):
  """A few-shot learner as pure functions written for ONE episode.

  Batch over the tasks of a meta-batch with `jax.vmap`; `fewshot.losses`
  holds the one generic loss that every algorithm is trained with.
  `model_state` carries non-trainable state (BatchNorm running averages); it
  is only changed when `train` is True. `query_loss` replaces the query
  cross-entropy where a method trains with another loss (relation networks'
  squared error); accuracy is always the argmax of the logits.
  """
  init: InitFn
  adapt: AdaptFn
  predict: PredictFn
  query_loss: QueryLossFn | None = None
