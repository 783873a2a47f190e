"""Pairwise distances and similarities for metric-learning losses and miners.

A `Distance` is what pytorch-metric-learning calls a distance object:
`LpDistance(normalize_embeddings=True)` is `Distance('euclidean')`,
`LpDistance(power=2)` is `Distance('squared')` and `CosineSimilarity()` is
`Distance('cosine')`. Euclidean kinds L2-normalise the embeddings first unless
`normalize=False` (pytorch-metric-learning's default too); cosine always does.
A similarity grows as points get closer (`is_similarity`); `margin(x, y)` is
"how much farther x is than y" for either kind, so a loss is written once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fewshot.heads import l2_normalize

DISTANCE_KINDS = ('euclidean', 'squared', 'cosine')


class Distance(NamedTuple):
  """A pairwise distance (`euclidean`, `squared`) or similarity (`cosine`)."""
  kind: str = 'euclidean'
  normalize: bool = True

  @property
  def is_similarity(self) -> bool:
    return self.kind == 'cosine'

  def matrix(self, x_BxD: jax.Array, y_MxD: jax.Array | None = None
             ) -> jax.Array:
    """`[B, M]` distances (or similarities) between the rows of x and y."""
    if self.kind not in DISTANCE_KINDS:
      raise ValueError(f'Unknown distance {self.kind!r}; known: '
                       f'{DISTANCE_KINDS}.')
    if self.normalize or self.kind == 'cosine':
      x_BxD = l2_normalize(x_BxD)
      y_MxD = x_BxD if y_MxD is None else l2_normalize(y_MxD)
    elif y_MxD is None:
      y_MxD = x_BxD
    dots = jnp.einsum('bd,md->bm', x_BxD, y_MxD,
                      precision=jax.lax.Precision.HIGHEST)
    if self.kind == 'cosine':
      return dots
    squared = jnp.maximum(
        jnp.sum(jnp.square(x_BxD), -1)[:, None]
        + jnp.sum(jnp.square(y_MxD), -1)[None, :] - 2.0 * dots, 0.0)
    if self.kind == 'squared':
      return squared
    return safe_sqrt(squared)

  def margin(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """How much farther apart `x` is than `y`: `x - y`, or `y - x` for a
    similarity."""
    return y - x if self.is_similarity else x - y

  def closeness(self, values: jax.Array) -> jax.Array:
    """Larger means closer: the similarity itself, or minus the distance."""
    return values if self.is_similarity else -values


def safe_sqrt(x: jax.Array, tiny: float = 1e-12) -> jax.Array:
  """`sqrt(x)` for `x >= 0` with value and gradient 0 below `tiny`.

  The plain square root has an infinite derivative at 0, which turns the
  zero distance of two equal embeddings into NaN gradients.
  """
  positive = x > tiny
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


# What a distance's name means everywhere (losses, miners, retrieval):
# 'euclidean' and 'squared' normalise first, as pytorch-metric-learning's
# LpDistance does by default; the 'raw_' names measure the embeddings as
# they are (ProtoNet's squared distance, say).
DISTANCE_NAMES = (*DISTANCE_KINDS, 'raw_euclidean', 'raw_squared')


def as_distance(distance: Distance | str | None,
                default: Distance | None = None) -> Distance:
  """A `Distance` from itself, a name of `DISTANCE_NAMES`, or None (`default`)."""
  if distance is None:
    if default is None:
      raise ValueError('No distance given.')
    return default
  if isinstance(distance, str):
    if distance not in DISTANCE_NAMES:
      raise ValueError(f'Unknown distance {distance!r}; known: '
                       f'{DISTANCE_NAMES}.')
    raw = distance.startswith('raw_')
    distance = Distance(distance.removeprefix('raw_'), normalize=not raw)
  if distance.kind not in DISTANCE_KINDS:
    raise ValueError(f'Unknown distance {distance.kind!r}; known: '
                     f'{DISTANCE_NAMES}.')
  return distance


EUCLIDEAN = Distance('euclidean')
SQUARED = Distance('squared')
COSINE = Distance('cosine')

__all__ = ['COSINE', 'DISTANCE_KINDS', 'DISTANCE_NAMES', 'Distance',
           'EUCLIDEAN', 'SQUARED',
           'as_distance', 'safe_sqrt']
