"""A/B of the two ways the MAML training step takes its meta-gradient.

  per_task  `fewshot.losses.meta_batch_value_and_grad` (CPU path: per-task
            gradients inside the vmap, averaged over tasks with a dot)
  mean      `jax.value_and_grad` of `fewshot.losses.meta_batch_loss`
            (`per_task=False`, the path of other backends)

Both steps (second-order MAML, Conv-4, one inner step of 0.4, meta-batch 32,
5-way 1-shot, random 28x28 images) are compiled in one process and timed
alternately, so drifts of the machine's speed hit both alike. Prints one
JSON line per path: ms per meta-batch, median and fastest.

  python benchmarks/maml_grad_paths.py [--queries 15] [--repeats 6]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np

from fewshot import backbones, losses
from fewshot.algorithms import maml
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.ops import tune_cpu
from fewshot.objectives import episodic, init_state, make_train_step
from fewshot.optimizers import make_optimizer


def _value_and_grad(algorithm, meta_params, model_state, episodes, key, *,
                    per_task):
  """The episodic objective's gradient with the path chosen explicitly."""
  return losses.meta_batch_value_and_grad(
      algorithm, meta_params, model_state, episodes, jax.random.split(key)[1],
      per_task=per_task)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--queries', type=int, default=15)
  parser.add_argument('--repeats', type=int, default=6)
  args = parser.parse_args()
  tune_cpu()
  splits = synthetic_splits(num_classes=(64, 5, 5), images_per_class=20,
                            image_size=28, channels=1)
  data = sampling.to_device(splits['train'])
  algorithm = maml(backbones.create('conv4', norm='batch'), num_ways=5,
                   inner_steps=1, inner_learning_rate=0.4)
  optimizer = make_optimizer(name='adam', learning_rate=1e-3)
  objective = episodic(algorithm, ways=5, shots=1, queries=args.queries,
                       meta_batch_size=32)
  state = init_state(objective, optimizer, data, 0)
  steps = {}
  for name, per_task in (('per_task', True), ('mean', False)):
    value_and_grad = functools.partial(_value_and_grad, algorithm,
                                       per_task=per_task)
    step = jax.jit(make_train_step(
        objective._replace(value_and_grad=value_and_grad), optimizer))
    steps[name] = step.lower(state, data).compile()
  if steps['per_task'].as_text() == steps['mean'].as_text():
    raise RuntimeError('both paths compiled to the same program')
  for compiled in steps.values():  # warm up
    jax.block_until_ready(compiled(state, data))
  times = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, compiled in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(state, data))
      times[name].append(1000 * (time.perf_counter() - start))
  for name, values in times.items():
    print(json.dumps({
        'benchmark': 'maml_grad_path', 'path': name,
        'median_ms': round(float(np.median(values)), 1),
        'min_ms': round(min(values), 1), 'repeats': args.repeats,
        'queries': args.queries, 'backend': jax.default_backend()}))


if __name__ == '__main__':
  main()
