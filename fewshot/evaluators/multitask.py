"""Per-task evaluation of a multi-task model, and Delta-p against baselines."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.backbones.base import Backbone, ModelState, Params
from fewshot.data.augment import rotate_quarter_turns
from fewshot.data.batches import MultiLabelImages
from fewshot.features import extract_features
from fewshot.multitask.improvement import delta_p
from fewshot.objectives.multitask import (ROTATION, Stream, Task,
                                          head_outputs, label_name)
from fewshot.stats import mean_confidence_interval

Evaluator = Callable[[Params, ModelState], dict[str, Any]]

# The metric each task kind is scored by, and whether higher is better.
TASK_METRICS = {'classify': ('accuracy', True), 'regress': ('mse', False),
                'episodes': ('accuracy', True)}


def evaluation_images(stream: Stream, data: MultiLabelImages
                      ) -> MultiLabelImages:
  """A stream's evaluation images: a rotating stream turns image `i` by
  `i mod 4` quarter turns (every rotation equally often, no randomness)."""
  if not stream.rotate:
    return data
  turns = np.arange(data.num_images) % 4
  images = np.asarray(rotate_quarter_turns(jnp.asarray(data.images),
                                           jnp.asarray(turns)))
  return MultiLabelImages(images=images,
                          labels={**data.labels,
                                  ROTATION: turns.astype(np.int32)})


def multitask_evaluator(backbone: Backbone, tasks: Mapping[str, Task],
                        streams: Mapping[str, Stream],
                        data: Mapping[str, Any], *, batch_size: int = 1000,
                        episodic: Mapping[str, Evaluator] | None = None,
                        baselines: Mapping[str, Mapping[str, float]] | None
                        = None) -> Evaluator:
  """`evaluate(params, model_state) -> metrics` of every task's head.

  Each minibatch stream's images (`data[stream]`, `MultiLabelImages`) are
  embedded once in evaluation mode; a classifier reports `<task>_accuracy`
  and `<task>_ci95` (the 95% CI over images), a regressor `<task>_mse` and
  `<task>_mse_ci95`. An episode task is scored by `episodic[task]`, an
  evaluator of the backbone (`<task>_accuracy`, `<task>_ci95` over
  episodes). With `baselines` (`{task: {metric: value}}` of single-task
  runs) the result has `delta_p` (`fewshot.multitask.delta_p`, percent).
  """
  episodic = dict(episodic or {})
  images = {name: evaluation_images(streams[name], data[name])
            for name in streams if streams[name].episodes is None}
  for name, task in tasks.items():
    if task.kind == 'episodes' and name not in episodic:
      raise ValueError(f'Episode task {name!r} needs an episodic evaluator.')
  embed = jax.jit(lambda params, state, x: extract_features(
      backbone, params, state, x, batch_size=batch_size))

  def run(params: Params, model_state: ModelState) -> dict[str, Any]:
    start = time.time()
    features = {name: embed(params['backbone'], model_state['backbone'],
                            item.images) for name, item in images.items()}
    result, scores = {}, {}
    for name, task in tasks.items():
      metric, _ = TASK_METRICS[task.kind]
      if task.kind == 'episodes':
        summary = episodic[name](params, model_state)
        value, ci95 = summary['accuracy'], summary['ci95']
        result[f'{name}_ci95'] = ci95
      else:
        outputs = np.asarray(head_outputs(task, params['heads'][name],
                                          features[task.stream]))
        targets = np.asarray(images[task.stream].labels[label_name(name,
                                                                   task)])
        if task.kind == 'classify':
          per_image = (outputs.argmax(-1) == targets).astype(np.float64)
          value, ci95 = mean_confidence_interval(per_image)
          result[f'{name}_ci95'] = ci95
        else:
          per_image = np.mean((outputs - targets.reshape(outputs.shape)) ** 2,
                              axis=-1)
          value, ci95 = mean_confidence_interval(per_image)
          result[f'{name}_mse_ci95'] = ci95
      result[f'{name}_{metric}'] = value
      scores[name] = {metric: value}
    if baselines:
      result['delta_p'] = delta_p(
          scores, {name: baselines[name] for name in scores},
          {name: {TASK_METRICS[tasks[name].kind][0]:
                  TASK_METRICS[tasks[name].kind][1]} for name in scores})
    result['seconds'] = round(time.time() - start, 2)
    return result

  return run


__all__ = ['TASK_METRICS', 'evaluation_images', 'multitask_evaluator']
