"""Which pairs and triplets of a batch a loss learns from.

Mined tuples are boolean masks, so they have static shapes and compose with
jit and vmap: `Pairs(positive [B, B], negative [B, B])` over `(anchor,
other)` and `Triplets(mask [B, B, B])` over `(anchor, positive, negative)`.
A miner is `(embeddings [B, D], labels [B]) -> Pairs | Triplets`, written
after pytorch-metric-learning's miner of the same name. Triplet masks cost
`B^3` (2 M entries at B=128, 134 M at B=512: keep triplet losses to batches
of a few hundred). Masks are sets: a tuple is mined at most once (pytorch-metric-learning's index lists can
repeat a pair when triplets are turned into pairs; these cannot).
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from fewshot.metric.distances import COSINE, EUCLIDEAN, Distance

TRIPLET_KINDS = ('all', 'hard', 'semihard', 'easy')


class Pairs(NamedTuple):
  """Anchor-positive and anchor-negative pairs, `[B, B]` bool each."""
  positive: jax.Array
  negative: jax.Array


class Triplets(NamedTuple):
  """`[B, B, B]` bool over (anchor, positive, negative)."""
  mask: jax.Array


Mined = Union[Pairs, Triplets]


def all_pairs(labels_B: jax.Array) -> Pairs:
  """Every positive pair (same label, not itself) and negative pair."""
  same = labels_B[:, None] == labels_B[None, :]
  itself = jnp.eye(labels_B.shape[0], dtype=bool)
  return Pairs(positive=same & ~itself, negative=~same)


def all_triplets(labels_B: jax.Array) -> Triplets:
  """Every valid triplet: a positive pair and a negative of the anchor."""
  pairs = all_pairs(labels_B)
  return Triplets(pairs.positive[:, :, None] & pairs.negative[:, None, :])


def as_pairs(mined: Mined | None, labels_B: jax.Array) -> Pairs:
  """The pairs of mined tuples (all pairs for None)."""
  if mined is None:
    return all_pairs(labels_B)
  if isinstance(mined, Pairs):
    return mined
  return Pairs(positive=jnp.any(mined.mask, axis=2),
               negative=jnp.any(mined.mask, axis=1))


def as_triplets(mined: Mined | None, labels_B: jax.Array) -> Triplets:
  """The triplets of mined tuples: mined pairs sharing their anchor."""
  if mined is None:
    return all_triplets(labels_B)
  if isinstance(mined, Triplets):
    return mined
  return Triplets(mined.positive[:, :, None] & mined.negative[:, None, :])


def batch_all_miner(embeddings_BxD: jax.Array, labels_B: jax.Array
                    ) -> Triplets:
  """All valid triplets (Hermans et al. 2017's batch-all, which averages the
  non-zero losses: the triplet loss's own reduction)."""
  del embeddings_BxD
  return all_triplets(labels_B)


def triplet_margin_miner(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                         margin: float = 0.2, kind: str = 'all',
                         distance: Distance = EUCLIDEAN) -> Triplets:
  """Triplets by how far the negative is beyond the positive (`TripletMarginMiner`).

  With `m = d(a, n) - d(a, p)` (similarities: `s(a, p) - s(a, n)`):
  'all' keeps `m <= margin` (the triplets that violate the margin), 'hard'
  those with also `m <= 0`, 'semihard' those with `0 < m <= margin` (FaceNet's
  semi-hard negatives), 'easy' those with `m > margin`.
  """
  if kind not in TRIPLET_KINDS:
    raise ValueError(f'Unknown triplet kind {kind!r}; known: {TRIPLET_KINDS}.')
  mat = distance.matrix(jax.lax.stop_gradient(embeddings_BxD))
  triplet_margin = distance.margin(mat[:, None, :], mat[:, :, None])
  if kind == 'easy':
    chosen = triplet_margin > margin
  else:
    chosen = triplet_margin <= margin
    if kind == 'hard':
      chosen &= triplet_margin <= 0
    elif kind == 'semihard':
      chosen &= triplet_margin > 0
  return Triplets(all_triplets(labels_B).mask & chosen)


def semihard_miner(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                   margin: float = 0.2, distance: Distance = EUCLIDEAN
                   ) -> Triplets:
  """`triplet_margin_miner(kind='semihard')`."""
  return triplet_margin_miner(embeddings_BxD, labels_B, margin=margin,
                              kind='semihard', distance=distance)


def batch_hard_miner(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                     distance: Distance = EUCLIDEAN) -> Triplets:
  """One triplet per anchor: its farthest positive and nearest negative.

  Hermans et al. 2017's batch-hard (`BatchHardMiner`); anchors without a
  positive or a negative give none.
  """
  pairs = all_pairs(labels_B)
  closeness = distance.closeness(
      distance.matrix(jax.lax.stop_gradient(embeddings_BxD)))
  hardest_positive = jnp.argmin(
      jnp.where(pairs.positive, closeness, jnp.inf), axis=1)
  hardest_negative = jnp.argmax(
      jnp.where(pairs.negative, closeness, -jnp.inf), axis=1)
  valid = jnp.any(pairs.positive, 1) & jnp.any(pairs.negative, 1)
  size = labels_B.shape[0]
  positive = jax.nn.one_hot(hardest_positive, size, dtype=bool)
  negative = jax.nn.one_hot(hardest_negative, size, dtype=bool)
  return Triplets(valid[:, None, None] & positive[:, :, None]
                  & negative[:, None, :])


def multi_similarity_miner(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                           epsilon: float = 0.1,
                           distance: Distance = COSINE) -> Pairs:
  """Wang et al. 2019's pair mining (`MultiSimilarityMiner`).

  A positive is kept if it is less close than the anchor's closest negative
  plus `epsilon`; a negative if it is closer than the anchor's least close
  positive minus `epsilon` (in the distance's own units).
  """
  pairs = all_pairs(labels_B)
  mat = distance.matrix(jax.lax.stop_gradient(embeddings_BxD))
  if distance.is_similarity:
    closest_negative = jnp.max(jnp.where(pairs.negative, mat, -jnp.inf), 1)
    farthest_positive = jnp.min(jnp.where(pairs.positive, mat, jnp.inf), 1)
    positive = mat - epsilon < closest_negative[:, None]
    negative = mat + epsilon > farthest_positive[:, None]
  else:
    closest_negative = jnp.min(jnp.where(pairs.negative, mat, jnp.inf), 1)
    farthest_positive = jnp.max(jnp.where(pairs.positive, mat, -jnp.inf), 1)
    positive = mat + epsilon > closest_negative[:, None]
    negative = mat - epsilon < farthest_positive[:, None]
  return Pairs(positive=pairs.positive & positive,
               negative=pairs.negative & negative)


MINERS = {
    'batch_all': batch_all_miner,
    'batch_hard': batch_hard_miner,
    'semihard': semihard_miner,
    'triplet_margin': triplet_margin_miner,
    'multi_similarity': multi_similarity_miner,
}

__all__ = ['MINERS', 'Mined', 'Pairs', 'TRIPLET_KINDS', 'Triplets',
           'all_pairs', 'all_triplets', 'as_pairs', 'as_triplets',
           'batch_all_miner', 'batch_hard_miner', 'multi_similarity_miner',
           'semihard_miner', 'triplet_margin_miner']
