"""AdaBN (Li et al. 2016): BatchNorm statistics re-estimated on the target.

A backbone's BatchNorm layers update their running statistics as
`s' = m s + (1 - m) b` from the batch statistics `b`. `batch_statistics`
reads `b` of every layer from two training-mode passes (from all-zero and
all-one states: `m = s'_1 - s'_0`, `b = s'_0 / (1 - m)`), so it works for
any backbone and momentum; `adapt_batch_norm` averages them over the
target's batches. Only the statistics change, never the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewshot.backbones.base import Backbone, ModelState, Params


def batch_statistics(backbone: Backbone, params: Params,
                     model_state: ModelState, images: jax.Array
                     ) -> ModelState:
  """Every BatchNorm layer's statistics on one batch, as a model state.

  Leaves that a training-mode pass does not update keep `model_state`'s
  value.
  """
  zeros = jax.tree.map(jnp.zeros_like, model_state)
  ones = jax.tree.map(jnp.ones_like, model_state)
  _, from_zeros = backbone.apply(params, zeros, images, True)
  _, from_ones = backbone.apply(params, ones, images, True)

  def statistic(old, at_zero, at_one):
    keep = at_one - at_zero  # the momentum m
    updated = jnp.abs(1.0 - keep) > 1e-6
    return jnp.where(updated, at_zero / jnp.where(updated, 1.0 - keep, 1.0),
                     old)

  return jax.tree.map(statistic, model_state, from_zeros, from_ones)


def adapt_batch_norm(backbone: Backbone, params: Params,
                     model_state: ModelState, images: jax.Array, *,
                     batch_size: int = 256) -> ModelState:
  """`model_state` with BatchNorm statistics averaged over `images`' batches.

  `images [M, H, W, C]` (the unlabelled target) are cut into `M //
  batch_size` full batches (at least one); each layer's mean and variance
  become the average of its batch statistics over them, as PyTorch's
  cumulative average (`momentum=None`) would give.
  """
  if not jax.tree.leaves(model_state):
    raise ValueError('AdaBN needs a backbone with BatchNorm running '
                     "statistics (e.g. norm='batch_running'); this one has "
                     'none.')
  batch_size = max(1, min(batch_size, images.shape[0]))
  num_batches = images.shape[0] // batch_size
  batches = images[:num_batches * batch_size].reshape(
      num_batches, batch_size, *images.shape[1:])
  per_batch = jax.lax.map(
      lambda batch: batch_statistics(backbone, params, model_state, batch),
      batches)
  return jax.tree.map(lambda s: jnp.mean(s, axis=0), per_batch)


__all__ = ['adapt_batch_norm', 'batch_statistics']
