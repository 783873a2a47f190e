"""L2-SP: weight decay toward the pretrained weights (Li et al. 2018)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fewshot.transfer.masks import Params, map_unmasked


def _strengths(strength: float | Any, reference: Params) -> Any:
  if isinstance(strength, (int, float)):
    return jax.tree.map(lambda _: float(strength), reference)
  return strength


def l2sp_penalty(params: Params, reference: Params,
                 strength: float | Any) -> jax.Array:
  """The loss term `sum_leaves strength / 2 * ||params - reference||^2`.

  Args:
    params: the parameters being fine-tuned.
    reference: a pytree like `params`: the pretrained weights where they
      exist, and zeros for newly added layers, which makes the penalty on
      those ordinary L2 toward zero (the paper's `beta` term).
    strength: a float, or a pytree of floats like `params` for per-leaf
      strengths (e.g. `alpha` on the backbone, `beta` on the head, 0 to skip).
  """
  terms = jax.tree.map(
      lambda p, r, s: 0.5 * s * jnp.sum(jnp.square(p - r)),
      params, reference, _strengths(strength, reference))
  return sum(jax.tree.leaves(terms), jnp.zeros([], jnp.float32))


class L2SPState(NamedTuple):
  reference: Params  # the weights to decay toward


def l2sp(reference: Params, strength: float | Any
         ) -> optax.GradientTransformation:
  """Adds `strength * (params - reference)` to the gradients.

  This is the gradient of `l2sp_penalty`, so chaining it *before* an
  optimizer, `optax.chain(l2sp(pretrained, 1e-2), optax.sgd(lr))`, is the
  same as adding the penalty to the loss ("coupled" decay, as
  `add_decayed_weights` before `sgd`). Chained after an adaptive optimizer
  it becomes decoupled decay toward `reference` (scale it by minus the
  learning rate yourself then). See `l2sp_penalty` for `reference` and
  `strength`. The reference lives in the optimizer state rather than in the
  compiled program, so large backbones do not become constants.
  """

  def init(params):
    del params
    return L2SPState(reference=jax.tree.map(jnp.asarray, reference))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('l2sp needs the params: call update(g, state, params).')
    updates = map_unmasked(
        lambda u, p, r, s: (u + s * (p - r)).astype(u.dtype),
        updates, params, state.reference, _strengths(strength, reference))
    return updates, state

  return optax.GradientTransformation(init, update)
