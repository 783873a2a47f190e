"""Statistic alignment losses: multi-kernel MMD (DAN) and CORAL."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fewshot.transfer.diagnostics import (DEFAULT_MULTIPLIERS,
                                          median_bandwidth, mmd)


def mmd_loss(source_BxD: jax.Array, target_BxD: jax.Array, *,
             multipliers: Sequence[float] = DEFAULT_MULTIPLIERS) -> jax.Array:
  """DAN's multi-kernel MMD^2 between two feature batches, as a loss.

  The biased (V-statistic) estimate of `fewshot.transfer.diagnostics.mmd`:
  the squared RKHS distance of the two batches' kernel mean embeddings,
  so never negative and exactly 0 for identical batches. The Gaussian
  bandwidths are the median heuristic's times `multipliers`, computed
  without gradient (as TLlib's kernels track their bandwidth).
  """
  bandwidths = jax.lax.stop_gradient(
      median_bandwidth(source_BxD, target_BxD)
      * jnp.asarray(multipliers, jnp.float32))
  return mmd(source_BxD, target_BxD, bandwidths=bandwidths, biased=True)


def _moments(x_BxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(x_BxD, axis=0, keepdims=True)
  centred = x_BxD - mean
  return mean[0], centred.T @ centred / (x_BxD.shape[0] - 1)


def coral(source_BxD: jax.Array, target_BxD: jax.Array) -> jax.Array:
  """CORAL (Sun & Saenko 2016) as TLlib defines it: the mean squared
  difference of the two batches' feature covariances (unbiased) plus that
  of their means; 0 for identical batches."""
  source_mean, source_cov = _moments(source_BxD)
  target_mean, target_cov = _moments(target_BxD)
  return (jnp.mean(jnp.square(source_mean - target_mean))
          + jnp.mean(jnp.square(source_cov - target_cov)))


__all__ = ['coral', 'mmd_loss']
