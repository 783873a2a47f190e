"""Classifier heads and L2 normalisation, each defined once.

Every function takes the features first: `linear_logits(features, head)`.
Heads are plain dicts of arrays, so they are parameters like any other:

* linear: `{'kernel': [D, N], 'bias': [N]}`, logits `features @ kernel + bias`;
* cosine (Baseline++): `{'kernel': [D, N], 'log_scale': []}`, logits
  `exp(log_scale) * cos(features, kernel[:, n])`;
* prototypes: `prototypes(features, labels, N)` gives the `[N, D]` class
  means; `prototype_head` turns them into the linear head with the same
  softmax as negative squared distances to them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

HEAD_KINDS = ('linear', 'cosine')


def l2_normalize(x: jax.Array, axis: int = -1,
                 epsilon: float = 1e-12) -> jax.Array:
  """`x` scaled to unit Euclidean norm along `axis` (`epsilon` under the root)."""
  return x * jax.lax.rsqrt(
      jnp.sum(jnp.square(x), axis=axis, keepdims=True) + epsilon)


def linear_logits(features_BxD: jax.Array,
                  head: dict[str, jax.Array]) -> jax.Array:
  """`[B, N]` logits of a linear head `{'kernel': [D, N], 'bias': [N]}`."""
  return features_BxD @ head['kernel'] + head['bias'][None, :]


def cosine_logits(features_BxD: jax.Array, kernel_DxN: jax.Array,
                  scale: float | jax.Array) -> jax.Array:
  """`[B, N]` `scale * cos(features[b], kernel[:, n])`."""
  return scale * (l2_normalize(features_BxD) @ l2_normalize(kernel_DxN, 0))


def classifier_logits(features_BxD: jax.Array,
                      head: dict[str, jax.Array]) -> jax.Array:
  """`[B, N]` logits of a head from `init_head`, linear or cosine.

  The kind is told apart by the parameters: a cosine head has `log_scale`.
  """
  if 'log_scale' in head:
    return cosine_logits(features_BxD, head['kernel'],
                         jnp.exp(head['log_scale']))
  return linear_logits(features_BxD, head)


def init_head(key: jax.Array, feature_dim: int, num_classes: int, *,
              kind: str = 'linear', init_scale: float = 10.0
              ) -> dict[str, jax.Array]:
  """A classifier: `kernel [D, C]` and `bias [C]` (linear) or `log_scale []`.

  The kernel and bias are uniform in `+-1/sqrt(D)`, PyTorch's `nn.Linear`
  initialisation.

  Args:
    kind: 'linear' or 'cosine' (Baseline++; see `classifier_logits`).
    init_scale: the cosine head's initial scale; unused for 'linear'.
  """
  if kind not in HEAD_KINDS:
    raise ValueError(f'head kind must be one of {HEAD_KINDS}, got {kind!r}.')
  bound = feature_dim ** -0.5
  kernel_key, bias_key = jax.random.split(key)
  kernel = jax.random.uniform(kernel_key, (feature_dim, num_classes),
                              minval=-bound, maxval=bound)
  if kind == 'cosine':
    return {'kernel': kernel,
            'log_scale': jnp.log(jnp.asarray(init_scale, jnp.float32))}
  return {'kernel': kernel,
          'bias': jax.random.uniform(bias_key, (num_classes,), minval=-bound,
                                     maxval=bound)}


def zeros_head(dim: int, num_ways: int, dtype: Any = jnp.float32
               ) -> dict[str, jax.Array]:
  """A zero linear head `{'kernel': [D, N], 'bias': [N]}`."""
  return {'kernel': jnp.zeros((dim, num_ways), dtype),
          'bias': jnp.zeros((num_ways,), dtype)}


def prototypes(embeddings_BxD: jax.Array, labels_B: jax.Array,
               num_ways: int) -> jax.Array:
  """`[N, D]` mean embedding of each class (as a one-hot matmul)."""
  onehot_BxN = jax.nn.one_hot(labels_B, num_ways, dtype=embeddings_BxD.dtype)
  counts_N = onehot_BxN.sum(axis=0)
  return (onehot_BxN.T @ embeddings_BxD) / jnp.maximum(counts_N, 1.0)[:, None]


def prototype_head(prototypes_NxD: jax.Array) -> dict[str, jax.Array]:
  """The linear head equal to nearest-prototype squared-Euclidean logits.

  `-||f - p||^2 = 2 f.p - ||p||^2 - ||f||^2`, and the last term is the same
  for every class, so kernel `2 p^T` and bias `-||p||^2` give the same
  softmax as ProtoNet (Triantafillou et al. 2020's Proto-MAML head).
  """
  return {'kernel': 2.0 * prototypes_NxD.T,
          'bias': -jnp.sum(jnp.square(prototypes_NxD), axis=-1)}


def squared_distances(queries_BxD: jax.Array,
                      prototypes_NxD: jax.Array) -> jax.Array:
  """`[B, N]` squared Euclidean distances, one matmul, clipped at 0."""
  cross_BxN = queries_BxD @ prototypes_NxD.T
  query_sq_B = jnp.sum(jnp.square(queries_BxD), axis=-1)
  proto_sq_N = jnp.sum(jnp.square(prototypes_NxD), axis=-1)
  return jnp.maximum(query_sq_B[:, None] - 2.0 * cross_BxN + proto_sq_N[None, :],
                     0.0)


def cosine_similarities(queries_BxD: jax.Array,
                        prototypes_NxD: jax.Array) -> jax.Array:
  """`[B, N]` cosine similarities."""
  return l2_normalize(queries_BxD) @ l2_normalize(prototypes_NxD).T


__all__ = ['HEAD_KINDS', 'classifier_logits', 'cosine_logits',
           'cosine_similarities', 'init_head', 'l2_normalize', 'linear_logits',
           'prototype_head', 'prototypes', 'squared_distances', 'zeros_head']
