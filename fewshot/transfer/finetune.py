"""A jit- and vmap-friendly fine-tuning loop (`fit`), in stages if asked."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fewshot.transfer.masks import Params


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
