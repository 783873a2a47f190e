"""Retrieval evaluation of any model's embedding on a split's images."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from fewshot.backbones.base import Backbone, ModelState, Params
from fewshot.data.dataset import ClassDataset
from fewshot.features import extract_features
from fewshot.metric.clustering import kmeans_nmi
from fewshot.metric.distances import as_distance
from fewshot.metric.retrieval import (RECALL_KS, check_retrievable,
                                      retrieval_metrics)


class Embedder(NamedTuple):
  """How a trained state embeds images: `backbone` with `params(trained)`.

  For a metric-learning run, the backbone and its projection head; for any
  other run, its backbone. `model_state(state)` is the backbone's part of
  the trained model state.
  """
  backbone: Backbone
  params: Callable[[Params], Params]
  model_state: Callable[[ModelState], ModelState] = lambda state: state


def retrieval_evaluator(embedder: Embedder, dataset: ClassDataset, *,
                        distance: str = 'cosine', batch_size: int = 256,
                        recall_ks: tuple[int, ...] = RECALL_KS,
                        nmi: bool = False
                        ) -> Callable[[Params, ModelState], dict[str, Any]]:
  """`evaluate(params, model_state) -> metrics` over every image of `dataset`.

  Each image queries all the others (`fewshot.metric.retrieval`); the
  result has `precision_at_1`, `r_precision`, `map_at_r`, `recall_at_k`,
  `images`, `classes`, `distance` and `seconds`, and with `nmi` the NMI of
  the embeddings' k-means clusters (k = classes) against the classes
  (`fewshot.metric.clustering`; normalised first unless the distance is a
  raw one).
  """
  check_retrievable(dataset.labels)
  counts = dataset.class_counts()
  embed = jax.jit(lambda params, model_state, images: extract_features(
      embedder.backbone, embedder.params(params), model_state, images,
      batch_size=batch_size))
  measure = as_distance(distance)

  def run(params: Params, model_state: ModelState) -> dict[str, Any]:
    start = time.time()
    embeddings = embed(params, embedder.model_state(model_state),
                       dataset.images)
    result = retrieval_metrics(embeddings, np.asarray(dataset.labels),
                               distance=measure, recall_ks=recall_ks)
    if nmi:
      result['nmi'] = kmeans_nmi(
          embeddings, np.asarray(dataset.labels),
          normalize=measure.normalize or measure.is_similarity)
    return dict(result, images=int(len(dataset.labels)),
                classes=int(np.sum(counts > 0)), distance=distance,
                embedding_dim=int(embeddings.shape[-1]),
                seconds=round(time.time() - start, 2))

  return run


__all__ = ['Embedder', 'retrieval_evaluator']
