"""Proxy losses: ProxyNCA and Proxy-Anchor, one learned proxy per class.

The proxies `{'proxies': [C, D]}` are parameters of the loss, trained and
checkpointed with the network. Definitions and defaults follow
pytorch-metric-learning's `ProxyNCALoss` and `ProxyAnchorLoss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewshot.metric.distances import COSINE, SQUARED, Distance
from fewshot.metric.reductions import log1p_sum_exp


def init_proxies(key: jax.Array, num_classes: int, embedding_dim: int
                 ) -> dict[str, jax.Array]:
  """`{'proxies': [C, D]}`, standard normal (the losses normalise them)."""
  return {'proxies': jax.random.normal(key, (num_classes, embedding_dim))}


def proxy_nca_loss(params: dict[str, jax.Array], embeddings_BxD: jax.Array,
                   labels_B: jax.Array, *, softmax_scale: float = 1.0,
                   distance: Distance = SQUARED) -> jax.Array:
  """Movshovitz-Attias et al. 2017 (`ProxyNCALoss`): mean over the batch of
  `-log softmax(-scale * d(x, proxies))[label]`.

  As in pytorch-metric-learning the own proxy is in the denominator, and
  the default distance is the squared distance of L2-normalised vectors.
  Computed as a log-softmax, where pytorch-metric-learning drops terms whose
  probability underflows to 0.
  """
  mat = distance.matrix(embeddings_BxD, params['proxies'])
  log_probs = jax.nn.log_softmax(softmax_scale * distance.closeness(mat), -1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels_B[:, None], 1))


def proxy_anchor_loss(params: dict[str, jax.Array], embeddings_BxD: jax.Array,
                      labels_B: jax.Array, *, margin: float = 0.1,
                      alpha: float = 32.0, distance: Distance = COSINE
                      ) -> jax.Array:
  """Kim et al. 2020 (`ProxyAnchorLoss`).

  Each proxy is an anchor: over the proxies with a positive in the batch,
  the mean of `log(1 + sum_pos exp(-alpha (s - margin)))`, plus over all
  proxies the mean of `log(1 + sum_neg exp(alpha (s + margin)))`.
  """
  mat = distance.matrix(embeddings_BxD, params['proxies'])       # [B, C]
  num_classes = params['proxies'].shape[0]
  positive = jax.nn.one_hot(labels_B, num_classes, dtype=bool)
  pos_term = log1p_sum_exp(alpha * distance.margin(mat, margin), positive, 0)
  neg_term = log1p_sum_exp(alpha * distance.margin(-margin, mat), ~positive, 0)
  with_positives = jnp.sum(jnp.any(positive, axis=0))
  return (jnp.sum(pos_term) / jnp.maximum(with_positives, 1)
          + jnp.sum(neg_term) / num_classes)


__all__ = ['init_proxies', 'proxy_anchor_loss', 'proxy_nca_loss']
