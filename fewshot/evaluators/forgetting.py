"""Forgetting: what adapting to a target costs on the source task.

The source task is scored by a classifier kept fixed on the backbone's
features: a pretrained backbone's own head (EfficientNet-Lite0's 1000-way
ImageNet classifier on Tiny-ImageNet images, whose classes ImageNet
contains), or a probe fitted on the source before adaptation. The backbone
is then fine-tuned on the target's labelled examples (`fine_tune`: a new
head initialised at the prototypes, full-batch steps, evaluation-mode
BatchNorm), fully, with a parameter-efficient method (`fewshot.peft`), or
not at all (a frozen probe); the row reports the target test accuracy, the
source accuracy before and after, and their difference (the forgetting).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fewshot._utils import tree_size
from fewshot.algorithms.baselines import fine_tune
from fewshot.backbones.base import Backbone
from fewshot.data.dataset import ClassDataset
from fewshot.episodes import Episode
from fewshot.features import embed_inputs
from fewshot.heads import linear_logits
from fewshot.peft import FROZEN, count_parameters


class ForgettingRow(NamedTuple):
  """One adaptation method's trade-off (accuracies in [0, 1])."""
  method: str
  trainable_parameters: int
  total_parameters: int
  target_accuracy: float
  target_ci95: float
  source_before: float
  source_after: float

  @property
  def forgetting(self) -> float:
    """Source accuracy lost by adapting (positive: forgotten)."""
    return self.source_before - self.source_after


def _binomial_ci(accuracy: float, n: int) -> float:
  return 1.96 * math.sqrt(accuracy * (1 - accuracy) / n)


def _accuracy(logits: jax.Array, labels: np.ndarray) -> float:
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def forgetting_report(
    backbone: Backbone, source_head: Mapping[str, jax.Array],
    source_inputs: np.ndarray, source_labels: np.ndarray,
    labelled: ClassDataset, test: ClassDataset,
    methods: Mapping[str, Callable[[Backbone], Backbone] | None], *,
    steps: int = 30, learning_rate: float = 1e-4,
    peft_learning_rate: float = 1e-3, head_learning_rate: float = 1e-2,
    batch_size: int = 128, seed: int = 0) -> list[ForgettingRow]:
  """Target accuracy and source forgetting of each adaptation method.

  Args:
    backbone: the pretrained backbone (its `init` returns its weights).
    source_head: `{'kernel': [D, S], 'bias': [S]}`, the fixed source
      classifier on `backbone`'s features.
    source_inputs, source_labels: source examples `[M, ...]` and their
      labels in `[0, S)`.
    labelled: the target's labelled examples (the same number per class).
    test: the target's test examples, `labelled`'s classes.
    methods: name -> backbone transform: None trains the head alone (the
      frozen probe), the identity fine-tunes everything, a
      `fewshot.peft.peft_backbone` partial trains what it makes trainable.
    steps, head_learning_rate: `fine_tune`'s full-batch Adam steps and its
      head's rate.
    learning_rate: the backbone's rate for full fine-tuning;
      `peft_learning_rate` for a backbone with frozen leaves.
    batch_size: examples per evaluation batch.
    seed: the PEFT initialisation's key.

  Returns:
    One `ForgettingRow` per method, in order.
  """
  counts = labelled.class_counts()
  if counts.min() != counts.max():
    raise ValueError('The labelled target split needs the same number of '
                     'examples per class.')
  order = np.argsort(labelled.labels, kind='stable')
  support = jnp.asarray(labelled.images[order])
  episode = Episode(support_images=support,
                    support_labels=jnp.asarray(labelled.labels[order]),
                    query_images=support[:1],
                    query_labels=jnp.asarray(labelled.labels[order][:1]),
                    class_ids=jnp.arange(labelled.num_classes),
                    num_ways=labelled.num_classes)
  base_params, base_state = backbone.init(jax.random.key(seed), support[:2])

  def source_accuracy(wrapped, params, state):
    features = embed_inputs(wrapped, params, state, source_inputs,
                            batch_size=batch_size)
    return _accuracy(linear_logits(features, dict(source_head)),
                     source_labels)

  before = source_accuracy(backbone, base_params, base_state)
  rows = []
  for name, transform in methods.items():
    wrapped = backbone if transform is None else transform(backbone)
    params, state = wrapped.init(jax.random.key(seed), support[:2])
    has_frozen = isinstance(state, dict) and FROZEN in state
    if has_frozen:
      count = count_parameters(params, state)
      trainable, total = count.trainable, count.total
    else:
      total = tree_size(params)
      trainable = 0 if transform is None else total
    algorithm = fine_tune(
        wrapped, steps=steps, head_learning_rate=head_learning_rate,
        learning_rate=peft_learning_rate if has_frozen else learning_rate,
        trainable=('head',) if transform is None else ('.*',))
    task, _ = jax.jit(algorithm.adapt, static_argnums=4)(
        {'backbone': params}, state, episode, jax.random.key(seed), False)
    predict = jax.jit(lambda x: algorithm.predict(
        {'backbone': params}, state, task, x, False)[0])
    predictions = np.concatenate([
        np.asarray(jnp.argmax(predict(jnp.asarray(test.images[i:i + batch_size])),
                              -1))
        for i in range(0, len(test.labels), batch_size)])
    target = float(np.mean(predictions == test.labels))
    after = source_accuracy(wrapped, task['backbone'], state)
    rows.append(ForgettingRow(
        method=name, trainable_parameters=int(trainable),
        total_parameters=int(total), target_accuracy=target,
        target_ci95=_binomial_ci(target, len(test.labels)),
        source_before=before, source_after=after))
  return rows


def rows_as_dicts(rows: Sequence[ForgettingRow]) -> list[dict[str, Any]]:
  """JSON-ready rows, with the forgetting."""
  return [dict(row._asdict(), forgetting=row.forgetting) for row in rows]


__all__ = ['ForgettingRow', 'forgetting_report', 'rows_as_dicts']
