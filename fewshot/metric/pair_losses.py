"""Pair and triplet losses: contrastive, triplet margin, multi-similarity,
NT-Xent (N-pair) and SupCon.

Each is a pure function of `embeddings [B, D]` and `labels [B]` with the
definition, defaults and reduction of pytorch-metric-learning's loss of the
same name, so a ported recipe gets the same value; `mined` restricts it to
the pairs or triplets a miner chose (`fewshot.metric.miners`). Where a batch
gives nothing to learn from (no positive pair, one class) the loss is 0 with
a zero gradient, as there, including its rule that a batch with at most one
positive and one negative pair has loss 0. Deliberate differences: NT-Xent
and SupCon are computed in log space (no `+ tiny` inside the log; equal
wherever that term is negligible), and mined tuples are sets (see miners).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewshot.metric.distances import COSINE, EUCLIDEAN, Distance
from fewshot.metric.miners import Mined, as_pairs, as_triplets
from fewshot.metric.reductions import (log1p_sum_exp, masked_logsumexp,
                                       masked_mean, mean_of_positive)


def _too_few_pairs(pairs) -> jax.Array:
  """pytorch-metric-learning's pair losses are 0 for <= 1 pair of each kind."""
  return (jnp.sum(pairs.positive) <= 1) & (jnp.sum(pairs.negative) <= 1)


def contrastive_loss(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                     pos_margin: float = 0.0, neg_margin: float = 1.0,
                     distance: Distance = EUCLIDEAN,
                     mined: Mined | None = None) -> jax.Array:
  """Hadsell et al. 2006 with two margins (`ContrastiveLoss`).

  Positive pairs pay `[d - pos_margin]+`, negative pairs `[neg_margin - d]+`
  (similarities: `[pos_margin - s]+`, `[s - neg_margin]+`); each kind is
  averaged over its non-zero terms and the two means are added.
  """
  pairs = as_pairs(mined, labels_B)
  mat = distance.matrix(embeddings_BxD)
  positive = jax.nn.relu(distance.margin(mat, pos_margin))
  negative = jax.nn.relu(distance.margin(neg_margin, mat))
  loss = (mean_of_positive(positive, pairs.positive)
          + mean_of_positive(negative, pairs.negative))
  return jnp.where(_too_few_pairs(pairs), 0.0, loss)


def triplet_margin_loss(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                        margin: float = 0.05, smooth: bool = False,
                        swap: bool = False, distance: Distance = EUCLIDEAN,
                        mined: Mined | None = None) -> jax.Array:
  """`[d(a, p) - d(a, n) + margin]+` averaged over the non-zero triplets.

  `TripletMarginLoss`. Without `mined`, every valid triplet of the batch
  (batch-all); with a miner, its triplets (batch-hard, semi-hard, ...).
  `smooth` uses `softplus` instead of the hinge (with `margin=0`, the soft
  margin of Hermans et al. 2017); `swap` uses `d(p, n)` where it is
  smaller than `d(a, n)` (Balntas et al. 2016).
  """
  triplets = as_triplets(mined, labels_B).mask
  mat = distance.matrix(embeddings_BxD)
  anchor_positive = mat[:, :, None]
  anchor_negative = mat[:, None, :]
  if swap:
    positive_negative = mat[None, :, :]
    anchor_negative = (jnp.maximum if distance.is_similarity else jnp.minimum)(
        anchor_negative, positive_negative)
  violation = distance.margin(anchor_positive, anchor_negative) + margin
  losses = jax.nn.softplus(violation) if smooth else jax.nn.relu(violation)
  return mean_of_positive(losses, triplets)


def multi_similarity_loss(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                          alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, distance: Distance = COSINE,
                          mined: Mined | None = None) -> jax.Array:
  """Wang et al. 2019 (`MultiSimilarityLoss`), averaged over all anchors.

  Anchor `a` pays `log(1 + sum_p exp(-alpha (s_ap - base))) / alpha +
  log(1 + sum_n exp(beta (s_an - base))) / beta` over its (mined) pairs.
  """
  pairs = as_pairs(mined, labels_B)
  mat = distance.matrix(embeddings_BxD)
  positive = log1p_sum_exp(alpha * distance.margin(mat, base),
                           pairs.positive) / alpha
  negative = log1p_sum_exp(beta * distance.margin(base, mat),
                           pairs.negative) / beta
  loss = jnp.mean(positive + negative)
  return jnp.where(_too_few_pairs(pairs), 0.0, loss)


def ntxent_loss(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                temperature: float = 0.07, distance: Distance = COSINE,
                mined: Mined | None = None) -> jax.Array:
  """NT-Xent / InfoNCE / multi-class N-pair loss (`NTXentLoss`).

  Each positive pair `(a, p)` is a softmax over `{p} + negatives(a)` of
  `s / temperature` (distances: `-d / temperature`); the loss is its mean
  cross-entropy over positive pairs. With two views per label it is
  SimCLR's loss; with one positive per anchor, Sohn 2016's N-pair loss.
  """
  pairs = as_pairs(mined, labels_B)
  logits = distance.closeness(distance.matrix(embeddings_BxD)) / temperature
  negatives = masked_logsumexp(logits, pairs.negative, axis=1)   # [B]
  losses = jax.nn.softplus(negatives[:, None] - logits)          # [B, B]
  loss = masked_mean(losses, pairs.positive)
  empty = ~jnp.any(pairs.positive) | ~jnp.any(pairs.negative)
  return jnp.where(empty | _too_few_pairs(pairs), 0.0, loss)


def supcon_loss(embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                temperature: float = 0.1, distance: Distance = COSINE,
                mined: Mined | None = None) -> jax.Array:
  """Khosla et al. 2020's supervised contrastive loss (`SupConLoss`).

  Anchor `a` pays minus the mean over its positives of `log softmax` of
  `s / temperature` over every other (mined) image; averaged over the
  anchors with a non-zero loss.
  """
  pairs = as_pairs(mined, labels_B)
  logits = distance.closeness(distance.matrix(embeddings_BxD)) / temperature
  others = pairs.positive | pairs.negative
  denominator = masked_logsumexp(logits, others, axis=1)
  log_prob = logits - jnp.where(jnp.isfinite(denominator), denominator,
                                0.0)[:, None]
  per_anchor = -(jnp.sum(jnp.where(pairs.positive, log_prob, 0.0), axis=1)
                 / jnp.maximum(jnp.sum(pairs.positive, axis=1), 1))
  loss = mean_of_positive(per_anchor, jnp.ones_like(per_anchor, bool))
  empty = ~jnp.any(pairs.positive) | ~jnp.any(pairs.negative)
  return jnp.where(empty | _too_few_pairs(pairs), 0.0, loss)


__all__ = ['contrastive_loss', 'multi_similarity_loss', 'ntxent_loss',
           'supcon_loss', 'triplet_margin_loss']
