"""Few-label evaluation: fit once on a labelled set, test on a whole split.

The standard protocol of few-label text classification (banking77 with 10
or 30 labelled texts per intent, tested on all of `test.csv`): the labelled
split is one N-way K-shot support set, the learner adapts to it once, and
every example of the test split is a query. The CI is the binomial one over
test examples (`1.96 sqrt(p (1 - p) / n)`); spread over labelled draws is
measured by re-running with other data seeds.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.backbones.base import ModelState, Params
from fewshot.data.dataset import ClassDataset
from fewshot.episodes import Episode
from fewshot.evaluators.episodes import Evaluator, FeatureCache, FewShotLearner
from fewshot.features import embed_inputs


def _check_balanced(labelled: ClassDataset) -> int:
  counts = labelled.class_counts()
  if counts.min() != counts.max() or counts.min() == 0:
    raise ValueError(f'The labelled split needs the same number of examples '
                     f'in every class; it has {counts.min()} to '
                     f'{counts.max()}.')
  return int(counts[0])


def few_label_evaluator(learner: FewShotLearner, labelled: ClassDataset,
                        test: ClassDataset, *, batch_size: int = 256,
                        features: FeatureCache | None = None) -> Evaluator:
  """`evaluate(params, model_state) -> summary` of one fit on `labelled`.

  Args:
    learner: how the trained state adapts and predicts.
    labelled: the labelled examples, the same number per class.
    test: every example is tested; its classes are `labelled`'s.
    batch_size: test examples predicted (and embedded) per batch.
    features: embed both splits once with a frozen backbone first.

  Returns:
    An evaluator whose summary has `accuracy`, `ci95` (binomial, over test
    examples), `examples`, `ways`, `shots` and `seconds`.
  """
  if tuple(test.class_names) != tuple(labelled.class_names):
    raise ValueError('The test split must have the labelled split\'s classes, '
                     'in the same order.')
  shots = _check_balanced(labelled)
  algorithm = learner.algorithm if features is None else features.algorithm
  order = np.argsort(labelled.labels, kind='stable')  # class-major
  support_labels = labelled.labels[order]

  @jax.jit
  def evaluate(meta_params, model_state, support, test_images, test_labels):
    episode = Episode(
        support_images=support, support_labels=jnp.asarray(support_labels),
        query_images=test_images[:1], query_labels=test_labels[:1],
        class_ids=jnp.arange(labelled.num_classes, dtype=jnp.int32),
        num_ways=labelled.num_classes)
    task_params, _ = algorithm.adapt(meta_params, model_state, episode,
                                     jax.random.key(0), False)
    size = test_images.shape[0]
    batches = -(-size // batch_size)
    padded = jnp.concatenate([test_images, jnp.zeros(
        (batches * batch_size - size, *test_images.shape[1:]),
        test_images.dtype)]).reshape(batches, batch_size,
                                     *test_images.shape[1:])

    def predict(batch):
      logits, _ = algorithm.predict(meta_params, model_state, task_params,
                                    batch, False)
      return jnp.argmax(logits, axis=-1)

    predicted = jax.lax.map(predict, padded).reshape(-1)[:size]
    return jnp.sum(predicted == test_labels)

  def run(params: Params, model_state: ModelState) -> dict[str, Any]:
    start = time.time()
    meta_params = learner.meta_params(params)
    model_state = learner.model_state(model_state)
    support = jnp.asarray(labelled.images[order])
    test_images = jnp.asarray(test.images)
    extra = {}
    if features is not None:
      def embed(inputs):
        return embed_inputs(features.backbone, meta_params['backbone'],
                            model_state, inputs,
                            batch_size=features.batch_size)
      support, test_images = embed(support), embed(test_images)
      jax.block_until_ready(test_images)
      meta_params, model_state = {**meta_params, 'backbone': {}}, {}
      extra = dict(precomputed_features=True,
                   feature_seconds=round(time.time() - start, 2))
    correct = int(evaluate(meta_params, model_state, support, test_images,
                           jnp.asarray(test.labels)))
    examples = len(test.labels)
    accuracy = correct / examples
    return dict(protocol='few_label', accuracy=accuracy,
                ci95=1.96 * math.sqrt(accuracy * (1 - accuracy) / examples),
                examples=examples, ways=labelled.num_classes,
                shots=shots,
                seconds=round(time.time() - start, 2), **extra)

  return run


__all__ = ['few_label_evaluator']
