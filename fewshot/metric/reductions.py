"""Masked reductions the metric losses share (fixed shapes, finite gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mean_of_positive(losses: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of the `losses` that are selected by `mask` and above zero.

  pytorch-metric-learning's `AvgNonZeroReducer`: 0 when none is (a batch
  with nothing to learn from has loss 0 and gradient 0).
  """
  keep = mask & (losses > 0)
  count = jnp.sum(keep)
  total = jnp.sum(jnp.where(keep, losses, 0.0))
  return total / jnp.maximum(count, 1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of `values` where `mask` holds; 0 if it holds nowhere."""
  return (jnp.sum(jnp.where(mask, values, 0.0))
          / jnp.maximum(jnp.sum(mask), 1))


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1
                     ) -> jax.Array:
  """`log(sum(exp(x)))` over the entries `mask` keeps; `-inf` where it keeps
  none (with a zero gradient there)."""
  any_kept = jnp.any(mask, axis=axis, keepdims=True)
  peak = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.where(any_kept, peak, 0.0))
  # exp of -inf, not a masked exp: a dropped entry far above the kept ones
  # would overflow, and 0 * inf in the backward pass is NaN.
  total = jnp.sum(jnp.exp(jnp.where(mask, x - peak, -jnp.inf)), axis=axis,
                  keepdims=True)
  result = jnp.where(any_kept, peak + jnp.log(jnp.where(any_kept, total, 1.0)),
                     -jnp.inf)
  return jnp.squeeze(result, axis)


def log1p_sum_exp(x: jax.Array, mask: jax.Array, axis: int = -1
                  ) -> jax.Array:
  """`log(1 + sum(exp(x)))` over the entries `mask` keeps (0 where none).

  The soft maximum with a zero floor that multi-similarity and Proxy-Anchor
  use (pytorch-metric-learning's `logsumexp(..., add_one=True)`).
  """
  return jax.nn.softplus(masked_logsumexp(x, mask, axis))


__all__ = ['log1p_sum_exp', 'masked_logsumexp', 'masked_mean',
           'mean_of_positive']
