"""A jit- and vmap-friendly fine-tuning loop and its inner optimizers."""

from __future__ import annotations

from typing import Any, Callable, Sequence

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
        optimizer: optax.GradientTransformation, steps: int, *,
        stages: Sequence[tuple[int, Any]] | None = None
        ) -> tuple[Params, jax.Array]:
  """Minimises `loss_fn` from `params` with `steps` full-batch updates.

  The loop is a `lax.scan`, so it compiles once, vmaps over episodes and is
  differentiable end to end (second order through the updates).

  Args:
    loss_fn: `params -> scalar loss`.
    params: the starting parameters.
    optimizer: the update rule (freezing and unfreezing schedules included).
    steps: the number of updates.
    stages: optional `(start_step, trainable_mask)` pairs, the first at step
      0: from `start_step` on, the leaves outside `trainable_mask` (a bool
      pytree like `params`) enter the loss through `lax.stop_gradient`, so
      the backward pass skips the layers below the lowest trainable one (a
      head-only stage costs a forward pass). It only saves work: the
      optimizer must itself keep those leaves fixed (`freeze`,
      `gradual_unfreezing` with the same schedule). One scan per stage.

  Returns:
    `(params, losses)` with the final parameters and the `[steps]` losses
    before each update.
  """
  if steps == 0:
    return params, jnp.zeros([0], jnp.float32)
  if stages is None:
    stages = [(0, None)]
  starts = [int(start) for start, _ in stages]
  if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise ValueError(f'Stage starts must begin at 0 and increase, got '
                     f'{starts}.')

  def step_fn(mask):
    def masked(params):
      if mask is None:
        return params
      return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p),
                          params, mask)
    grad_fn = jax.value_and_grad(lambda p: loss_fn(masked(p)))

    def step(carry, _):
      params, opt_state = carry
      loss, grads = grad_fn(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    return step

  carry = (params, optimizer.init(params))
  losses = []
  ends = starts[1:] + [steps]
  for (start, mask), end in zip(stages, ends):
    length = min(end, steps) - start
    if length <= 0:
      break
    carry, stage_losses = jax.lax.scan(step_fn(mask), carry, None,
                                       length=length)
    losses.append(stage_losses)
  return carry[0], jnp.concatenate(losses)


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
