"""A jit- and vmap-friendly fine-tuning loop and its inner optimizers."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fewshot.transfer.masks import Params

OPTIMIZERS = ('adam', 'sgd', 'momentum')


def inner_optimizer(name: str | optax.GradientTransformation,
                    learning_rate: float) -> optax.GradientTransformation:
  """'adam', 'sgd' or 'momentum' (SGD, momentum 0.9) at `learning_rate`.

  A `GradientTransformation` is returned unchanged (its own rate applies).
  """
  if isinstance(name, optax.GradientTransformation):
    return name
  if name == 'adam':
    return optax.adam(learning_rate)
  if name == 'sgd':
    return optax.sgd(learning_rate)
  if name == 'momentum':
    return optax.sgd(learning_rate, momentum=0.9)
  raise ValueError(f'optimizer must be one of {OPTIMIZERS} or an optax '
                   f'GradientTransformation, got {name!r}.')


def fit(loss_fn: Callable[[Params], jax.Array], params: Params,
        optimizer: optax.GradientTransformation,
        steps: int) -> tuple[Params, jax.Array]:
  """Minimises `loss_fn` from `params` with `steps` full-batch updates.

  The loop is a `lax.scan`, so it compiles once, vmaps over episodes and is
  differentiable end to end (second order through the updates).

  Returns:
    `(params, losses)` with the final parameters and the `[steps]` losses
    before each update.
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def step(carry, _):
    params, opt_state = carry
    loss, grads = grad_fn(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  if steps == 0:
    return params, jnp.zeros([0], jnp.float32)
  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                     None, length=steps)
  return params, losses


def linear_logits(features_BxD: jax.Array, head: dict[str, jax.Array]
                  ) -> jax.Array:
  """`[B, N]` logits of a linear head `{'kernel': [D, N], 'bias': [N]}`."""
  return features_BxD @ head['kernel'] + head['bias'][None, :]


def prototype_head(prototypes_NxD: jax.Array) -> dict[str, jax.Array]:
  """The linear head equal to nearest-prototype squared-Euclidean logits.

  `-||f - p||^2 = 2 f.p - ||p||^2 - ||f||^2`, and the last term is the same
  for every class, so kernel `2 p^T` and bias `-||p||^2` give the same
  softmax as ProtoNet (Triantafillou et al. 2020's ProtoMAML initialisation).
  """
  return {'kernel': 2.0 * prototypes_NxD.T,
          'bias': -jnp.sum(jnp.square(prototypes_NxD), axis=-1)}


def zeros_head(dim: int, num_ways: int, dtype: Any = jnp.float32
               ) -> dict[str, jax.Array]:
  """A zero-initialised linear head `{'kernel': [D, N], 'bias': [N]}`."""
  return {'kernel': jnp.zeros((dim, num_ways), dtype),
          'bias': jnp.zeros((num_ways,), dtype)}
