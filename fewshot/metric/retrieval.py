"""Retrieval metrics by exact nearest neighbours (no approximate index).

Every image of a split queries every other image of it, itself excluded
(pytorch-metric-learning's `AccuracyCalculator` with the query set as the
reference set, and Musgrave et al. 2020's protocol):

* precision@1: the nearest neighbour has the query's class;
* R-precision: the fraction of the query's class among its R nearest
  neighbours, R being the number of other images of that class;
* MAP@R: the mean over those R ranks of precision@i at the correct ones,
  divided by R;
* recall@K: some image of the query's class is among its K nearest (the
  Recall@K of the deep metric learning literature).

Queries whose class has no other image are left out, as there. The
neighbours come from chunked matrix products and `top_k` in one compiled
`lax.map`, so memory is one `[chunk, M]` similarity block at a time.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.metric.distances import Distance, as_distance

RECALL_KS = (1, 2, 4, 8)


def check_retrievable(labels_M: np.ndarray) -> int:
  """The largest class's image count; an error if no class has two images."""
  largest = int(np.unique(np.asarray(labels_M), return_counts=True)[1].max())
  if largest < 2:
    raise ValueError('Retrieval needs a class with at least two images; '
                     'every class of this split has one.')
  return largest


@functools.partial(jax.jit, static_argnames=('k', 'distance', 'chunk_size'))
def nearest_neighbours(embeddings_MxD: jax.Array, k: int, *,
                       distance: Distance = Distance('cosine'),
                       chunk_size: int = 1024) -> jax.Array:
  """`[M, k]` indices of each row's k nearest other rows, nearest first."""
  num = embeddings_MxD.shape[0]
  chunk_size = max(1, min(chunk_size, num))
  num_chunks = -(-num // chunk_size)
  query_index = jnp.arange(num_chunks * chunk_size).reshape(num_chunks,
                                                            chunk_size)

  def one_chunk(rows):
    queries = embeddings_MxD[jnp.minimum(rows, num - 1)]
    closeness = distance.closeness(distance.matrix(queries, embeddings_MxD))
    itself = rows[:, None] == jnp.arange(num)[None, :]
    return jax.lax.top_k(jnp.where(itself, -jnp.inf, closeness), k)[1]

  neighbours = jax.lax.map(one_chunk, query_index)
  return neighbours.reshape(-1, k)[:num]


def metrics_from_neighbours(neighbour_labels_MxK: np.ndarray,
                            labels_M: np.ndarray,
                            recall_ks: Sequence[int] = RECALL_KS
                            ) -> dict[str, float | dict[str, float]]:
  """The retrieval metrics of ranked neighbours' labels (see module doc).

  `neighbour_labels[m]` are the labels of query m's neighbours, nearest
  first, at least as many as the largest class minus one and max(recall_ks).
  """
  labels_M = np.asarray(labels_M)
  _, inverse, counts = np.unique(labels_M, return_inverse=True,
                                 return_counts=True)
  relevant = counts[inverse] - 1                              # R per query
  check_retrievable(labels_M)
  queries = relevant > 0
  k = neighbour_labels_MxK.shape[1]
  if k < max(relevant.max(), max(recall_ks)):
    raise ValueError(
        f'{k} neighbours per query, but R is up to {relevant.max()} and '
        f'recall@{max(recall_ks)} is asked: a split of {len(labels_M)} images '
        f'needs recall_ks of at most {len(labels_M) - 1}.')
  correct = (neighbour_labels_MxK == labels_M[:, None])[queries]
  r = relevant[queries]
  within_r = np.arange(k)[None, :] < r[:, None]
  hits_in_r = np.sum(correct & within_r, axis=1)
  precision_at_i = np.cumsum(correct, axis=1) / np.arange(1, k + 1)[None, :]
  average_precision = np.sum(precision_at_i * (correct & within_r),
                             axis=1) / r
  return dict(
      precision_at_1=float(np.mean(correct[:, 0])),
      r_precision=float(np.mean(hits_in_r / r)),
      map_at_r=float(np.mean(average_precision)),
      recall_at_k={str(kk): float(np.mean(np.any(correct[:, :kk], axis=1)))
                   for kk in recall_ks},
      queries=int(queries.sum()))


def retrieval_metrics(embeddings_MxD: jax.Array, labels_M: np.ndarray, *,
                      distance: Distance | str = 'cosine',
                      recall_ks: Sequence[int] = RECALL_KS,
                      chunk_size: int = 1024
                      ) -> dict[str, float | dict[str, float]]:
  """precision@1, R-precision, MAP@R and recall@K of embedded images.

  Args:
    embeddings_MxD: one embedding per image of the split.
    labels_M: their classes.
    distance: a `Distance` or a name of `DISTANCE_NAMES`: 'cosine' (the
      metric-learning convention; 'euclidean' and 'squared' normalise too,
      so rank alike), 'raw_euclidean' or 'raw_squared' (the embeddings as
      they are).
    recall_ks: the K of recall@K.
    chunk_size: queries per similarity block.
  """
  distance = as_distance(distance)
  labels_M = np.asarray(labels_M)
  if len(labels_M) != embeddings_MxD.shape[0]:
    raise ValueError(f'{embeddings_MxD.shape[0]} embeddings but '
                     f'{len(labels_M)} labels.')
  largest = check_retrievable(labels_M)
  k = min(max(largest - 1, max(recall_ks)), len(labels_M) - 1)
  neighbours = np.asarray(nearest_neighbours(
      jnp.asarray(embeddings_MxD, jnp.float32), k, distance=distance,
      chunk_size=chunk_size))
  return metrics_from_neighbours(labels_M[neighbours], labels_M, recall_ks)


__all__ = ['RECALL_KS', 'check_retrievable', 'metrics_from_neighbours', 'nearest_neighbours',
           'retrieval_metrics']
