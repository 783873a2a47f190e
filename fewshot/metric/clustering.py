"""NMI of k-means clusters: the clustering figure of metric-learning papers.

pytorch-metric-learning's `AccuracyCalculator` clusters the embeddings with
faiss's k-means into as many clusters as there are classes and reports
scikit-learn's `normalized_mutual_info_score` of the clusters against the
classes. Here k-means is Lloyd's algorithm on the device (k-means++ seeding,
a fixed number of iterations in one compiled loop, the best of a few
restarts by inertia) and NMI is computed from the contingency table with
scikit-learn's default normalisation (the arithmetic mean of the two
entropies).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _squared_distances(x_MxD: jax.Array, c_KxD: jax.Array) -> jax.Array:
  dots = jnp.einsum('md,kd->mk', x_MxD, c_KxD,
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(x_MxD * x_MxD, -1)[:, None] - 2.0 * dots
                     + jnp.sum(c_KxD * c_KxD, -1)[None, :], 0.0)


def _plus_plus_seeds(key: jax.Array, x_MxD: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding: each next centre drawn with probability
  proportional to the squared distance to the nearest chosen one."""
  first_key, rest_key = jax.random.split(key)
  first = x_MxD[jax.random.randint(first_key, (), 0, x_MxD.shape[0])]
  centres = jnp.zeros((k, x_MxD.shape[1]), x_MxD.dtype).at[0].set(first)
  nearest = _squared_distances(x_MxD, first[None])[:, 0]

  def add(i, carry):
    centres, nearest = carry
    logits = jnp.log(jnp.maximum(nearest, 1e-30))
    pick = jax.random.categorical(jax.random.fold_in(rest_key, i), logits)
    centre = x_MxD[pick]
    nearest = jnp.minimum(nearest,
                          _squared_distances(x_MxD, centre[None])[:, 0])
    return centres.at[i].set(centre), nearest

  return jax.lax.fori_loop(1, k, add, (centres, nearest))[0]


@functools.partial(jax.jit, static_argnames=('k', 'iterations', 'restarts'))
def kmeans(x_MxD: jax.Array, k: int, key: jax.Array, *,
           iterations: int = 50, restarts: int = 3
           ) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means: `(assignments [M] int32, inertia)`, best of restarts.

  Each restart seeds with k-means++ and runs `iterations` steps (an empty
  cluster keeps its centre). Inertia is the sum of squared distances to the
  assigned centres.
  """
  if not 1 <= k <= x_MxD.shape[0]:
    raise ValueError(f'k-means needs 1 <= k <= {x_MxD.shape[0]} points, got '
                     f'k={k}.')
  x_MxD = x_MxD.astype(jnp.float32)

  def one_restart(restart_key):
    def step(_, centres):
      assign = jnp.argmin(_squared_distances(x_MxD, centres), axis=1)
      one_hot = jax.nn.one_hot(assign, k, dtype=x_MxD.dtype)
      counts = one_hot.sum(0)
      sums = jnp.einsum('mk,md->kd', one_hot, x_MxD,
                        precision=jax.lax.Precision.HIGHEST)
      return jnp.where(counts[:, None] > 0,
                       sums / jnp.maximum(counts, 1.0)[:, None], centres)

    centres = jax.lax.fori_loop(0, iterations, step,
                                _plus_plus_seeds(restart_key, x_MxD, k))
    distances = _squared_distances(x_MxD, centres)
    assign = jnp.argmin(distances, axis=1)
    return assign.astype(jnp.int32), jnp.take_along_axis(
        distances, assign[:, None], 1).sum()

  assigns, inertias = jax.lax.map(one_restart, jax.random.split(key, restarts))
  best = jnp.argmin(inertias)
  return assigns[best], inertias[best]


def normalized_mutual_information(labels_a: np.ndarray,
                                  labels_b: np.ndarray) -> float:
  """NMI of two labelings of the same items, `I(a; b) / mean(H(a), H(b))`.

  scikit-learn's `normalized_mutual_info_score` with its default
  (arithmetic) normalisation; 1.0 when both labelings have a single class.
  """
  labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
  if labels_a.shape != labels_b.shape or labels_a.ndim != 1:
    raise ValueError(f'NMI needs two labelings of the same items, got shapes '
                     f'{labels_a.shape} and {labels_b.shape}.')
  _, a = np.unique(labels_a, return_inverse=True)
  _, b = np.unique(labels_b, return_inverse=True)
  if a.max(initial=0) == 0 and b.max(initial=0) == 0:
    return 1.0
  joint = np.zeros((a.max() + 1, b.max() + 1))
  np.add.at(joint, (a, b), 1.0)
  joint /= joint.sum()
  pa, pb = joint.sum(1), joint.sum(0)
  nonzero = joint > 0
  mutual = float(np.sum(joint[nonzero] * np.log(
      joint[nonzero] / np.outer(pa, pb)[nonzero])))
  entropy = lambda p: float(-np.sum(p[p > 0] * np.log(p[p > 0])))
  mean_entropy = (entropy(pa) + entropy(pb)) / 2.0
  if mean_entropy <= 0:
    return 1.0
  return float(np.clip(mutual / mean_entropy, 0.0, 1.0))


def kmeans_nmi(embeddings_MxD: jax.Array, labels_M: np.ndarray, *,
               normalize: bool = True, seed: int = 0,
               iterations: int = 50, restarts: int = 3) -> float:
  """NMI of the k-means clusters of the embeddings (k = the number of
  classes) against their classes; embeddings L2-normalised first unless
  `normalize=False` (as the cosine retrieval ranks them)."""
  labels_M = np.asarray(labels_M)
  x = jnp.asarray(embeddings_MxD, jnp.float32)
  if normalize:
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  assign, _ = kmeans(x, len(np.unique(labels_M)), jax.random.key(seed),
                     iterations=iterations, restarts=restarts)
  return normalized_mutual_information(np.asarray(assign), labels_M)


__all__ = ['kmeans', 'kmeans_nmi', 'normalized_mutual_information']
