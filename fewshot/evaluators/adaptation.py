"""Source and target accuracy of an adapted classifier (and AdaBN's target)."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from fewshot.adaptation import adapt_batch_norm
from fewshot.backbones.base import Backbone, ModelState, Params
from fewshot.data.dataset import ClassDataset
from fewshot.features import extract_features
from fewshot.objectives.adaptation import class_logits
from fewshot.stats import mean_confidence_interval

Evaluator = Callable[[Params, ModelState], dict[str, Any]]


def adaptation_evaluator(backbone: Backbone,
                         datasets: Mapping[str, ClassDataset], *,
                         batch_size: int = 1000,
                         adabn_images: np.ndarray | None = None,
                         adabn_batch_size: int = 256) -> Evaluator:
  """`evaluate(params, model_state) -> metrics` on labelled test sets.

  For each `{domain: dataset}` (e.g. 'source', 'target') the result has
  `<domain>_accuracy` and `<domain>_ci95` (95% interval over images) of
  the classifier in evaluation mode. With `adabn_images` (the unlabelled
  target training images) the 'target' set is scored with BatchNorm
  statistics re-estimated on them (AdaBN) and the others with the trained
  ones.
  """
  images = {name: jax.numpy.asarray(d.images) for name, d in datasets.items()}
  labels = {name: np.asarray(d.labels) for name, d in datasets.items()}
  adabn = None if adabn_images is None else jax.numpy.asarray(adabn_images)

  @jax.jit
  def predict(params, backbone_state, x):
    features = extract_features(backbone, params['backbone'], backbone_state,
                                x, batch_size=batch_size)
    return jax.numpy.argmax(class_logits(params, features), axis=-1)

  adapt = jax.jit(lambda params, state, x: adapt_batch_norm(
      backbone, params['backbone'], state, x, batch_size=adabn_batch_size))

  def run(params: Params, model_state: ModelState) -> dict[str, Any]:
    start = time.time()
    trained = model_state['backbone']
    adapted = None if adabn is None else adapt(params, trained, adabn)
    result = {}
    for name in images:
      state = adapted if (adapted is not None and name == 'target') else trained
      correct = np.asarray(predict(params, state, images[name])) == labels[name]
      accuracy, ci95 = mean_confidence_interval(correct.astype(np.float64))
      result[f'{name}_accuracy'] = accuracy
      result[f'{name}_ci95'] = ci95
    result['seconds'] = time.time() - start
    return result

  return run


__all__ = ['adaptation_evaluator']
