"""Normalised-softmax losses: NormFace, CosFace, ArcFace and sub-center ArcFace.

A classifier over the training classes on L2-normalised embeddings and
weights: `{'kernel': [D, C]}` (sub-center: `[D, C * k]`, column `c * k + j`
the j-th center of class c), trained and checkpointed with the network.
Definitions and defaults follow pytorch-metric-learning's
`NormalizedSoftmaxLoss`, `CosFaceLoss`, `ArcFaceLoss` (margin in degrees)
and `SubCenterArcFaceLoss`. The loss is the mean cross-entropy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from fewshot.heads import l2_normalize
from fewshot.metric.distances import safe_sqrt


def init_class_weights(key: jax.Array, num_classes: int, embedding_dim: int,
                       sub_centers: int = 1) -> dict[str, jax.Array]:
  """`{'kernel': [D, C * sub_centers]}`, standard normal."""
  return {'kernel': jax.random.normal(
      key, (embedding_dim, num_classes * sub_centers))}


def _cosines(params, embeddings_BxD, sub_centers: int = 1) -> jax.Array:
  """`[B, C]` cosines to the classes (the nearest of each class's centers)."""
  cosines = jnp.matmul(l2_normalize(embeddings_BxD),
                       l2_normalize(params['kernel'], 0),
                       precision=jax.lax.Precision.HIGHEST)
  if sub_centers > 1:
    cosines = cosines.reshape(cosines.shape[0], -1, sub_centers).max(-1)
  return cosines


def _cross_entropy(logits_BxC, labels_B) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxC, labels_B).mean()


def _with_target(cosines_BxC, labels_B, target_B) -> jax.Array:
  """`cosines` with the label's entry of each row replaced by `target`."""
  is_target = jax.nn.one_hot(labels_B, cosines_BxC.shape[1], dtype=bool)
  return jnp.where(is_target, target_B[:, None], cosines_BxC)


def _target_cosines(cosines_BxC, labels_B) -> jax.Array:
  return jnp.take_along_axis(cosines_BxC, labels_B[:, None], 1)[:, 0]


def normface_loss(params: dict[str, jax.Array], embeddings_BxD: jax.Array,
                  labels_B: jax.Array, *, temperature: float = 0.05
                  ) -> jax.Array:
  """Wang et al. 2017 (`NormalizedSoftmaxLoss`): softmax of `cos / temperature`."""
  return _cross_entropy(_cosines(params, embeddings_BxD) / temperature,
                        labels_B)


def cosface_loss(params: dict[str, jax.Array], embeddings_BxD: jax.Array,
                 labels_B: jax.Array, *, margin: float = 0.35,
                 scale: float = 64.0) -> jax.Array:
  """Wang et al. 2018 (`CosFaceLoss`): `scale * (cos - margin)` at the label."""
  cosines = _cosines(params, embeddings_BxD)
  target = _target_cosines(cosines, labels_B) - margin
  return _cross_entropy(scale * _with_target(cosines, labels_B, target),
                        labels_B)


def _arcface_logits(cosines_BxC, labels_B, margin_degrees, scale):
  margin = math.radians(margin_degrees)
  cos = jnp.clip(_target_cosines(cosines_BxC, labels_B), -1.0, 1.0)
  # cos(theta + m) from cos(theta), avoiding arccos's infinite slope at +-1.
  sin = safe_sqrt(1.0 - jnp.square(cos))
  plus_margin = cos * math.cos(margin) - sin * math.sin(margin)
  # Past theta = pi - m, cos(theta + m) would grow again; keep it monotone.
  target = jnp.where(cos >= -math.cos(margin), plus_margin,
                     cos - margin * math.sin(margin))
  return scale * _with_target(cosines_BxC, labels_B, target)


def arcface_loss(params: dict[str, jax.Array], embeddings_BxD: jax.Array,
                 labels_B: jax.Array, *, margin: float = 28.6,
                 scale: float = 64.0) -> jax.Array:
  """Deng et al. 2019 (`ArcFaceLoss`): `scale * cos(theta + margin)` at the
  label, `margin` in degrees (28.6 = 0.5 rad)."""
  return _cross_entropy(
      _arcface_logits(_cosines(params, embeddings_BxD), labels_B, margin,
                      scale), labels_B)


def subcenter_arcface_loss(params: dict[str, jax.Array],
                           embeddings_BxD: jax.Array, labels_B: jax.Array, *,
                           margin: float = 28.6, scale: float = 64.0,
                           sub_centers: int = 3) -> jax.Array:
  """Deng et al. 2020 (`SubCenterArcFaceLoss`): ArcFace on the nearest of
  `sub_centers` centers per class."""
  cosines = _cosines(params, embeddings_BxD, sub_centers)
  return _cross_entropy(_arcface_logits(cosines, labels_B, margin, scale),
                        labels_B)


__all__ = ['arcface_loss', 'cosface_loss', 'init_class_weights',
           'normface_loss', 'subcenter_arcface_loss']
