"""The functional boundary between flax modules and few-shot algorithms."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax

Params = Any      # a pytree of trainable arrays
ModelState = Any  # a pytree of non-trainable arrays (BatchNorm statistics)

# (params, model_state, images [B,H,W,C], train) -> (features [B,D], model_state)
ApplyFn = Callable[[Params, ModelState, jax.Array, bool],
                   tuple[jax.Array, ModelState]]


class Backbone(NamedTuple):
  """A feature extractor as two pure functions.

  `init(key, images)` returns `(params, model_state)`; `apply(params,
  model_state, images, train)` returns `(features [B, D], new_model_state)`.
  In training mode, BatchNorm running statistics (if the module keeps any) are
  updated; evaluation mode never changes `model_state`.
  """
  init: Callable[[jax.Array, jax.Array], tuple[Params, ModelState]]
  apply: ApplyFn
  module: nn.Module


def from_flax(module: nn.Module) -> Backbone:
  """Wraps a flax module `__call__(images, train) -> features [B, D]`."""

  def init(key: jax.Array, images: jax.Array) -> tuple[Params, ModelState]:
    variables = dict(module.init(key, images, train=False))
    params = variables.pop('params')
    return params, variables

  def apply(params: Params, model_state: ModelState, images: jax.Array,
            train: bool) -> tuple[jax.Array, ModelState]:
    variables = {'params': params, **model_state}
    if train and model_state:
      features, new_state = module.apply(variables, images, train=True,
                                         mutable=list(model_state))
      return features, dict(new_state)
    return module.apply(variables, images, train=train), model_state

  return Backbone(init=init, apply=apply, module=module)
