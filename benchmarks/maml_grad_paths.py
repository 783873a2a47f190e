"""A/B of the two ways the MAML training step takes its meta-gradient.

  per_task  `fewshot.losses.meta_batch_value_and_grad` (CPU path: per-task
            gradients inside the vmap, averaged over tasks with a dot)
  mean      `jax.value_and_grad` of `fewshot.losses.meta_batch_loss`

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
from fewshot import train as train_lib
from fewshot.algorithms import maml
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.ops import tune_malloc
from fewshot.train import init_state, make_optimizer, make_train_step


def _mean_loss_value_and_grad(algorithm, meta_params, model_state, episodes,
                              key, train=True):
  return jax.value_and_grad(
      functools.partial(losses.meta_batch_loss, algorithm, train=train),
      has_aux=True)(meta_params, model_state, episodes, key)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--queries', type=int, default=15)
  parser.add_argument('--repeats', type=int, default=6)
  args = parser.parse_args()
  tune_malloc()
  splits = synthetic_splits(num_classes=(64, 5, 5), images_per_class=20,
                            image_size=28, channels=1)
  data = sampling.to_device(splits['train'])
  algorithm = maml(backbones.create('conv4', norm='batch'), num_ways=5,
                   inner_steps=1, inner_learning_rate=0.4)
  optimizer = make_optimizer(name='adam', learning_rate=1e-3)
  spec = sampling.EpisodeSpec(5, 1, args.queries)
  state = init_state(algorithm, optimizer, splits['train'].images[:2], 0)
  step = jax.jit(make_train_step(algorithm, optimizer, spec, 32))
  steps = {'per_task': step.lower(state, data).compile()}
  # The step looks the function up when traced: swap it in for compiling.
  original = train_lib.meta_batch_value_and_grad
  train_lib.meta_batch_value_and_grad = _mean_loss_value_and_grad
  try:
    step = jax.jit(make_train_step(algorithm, optimizer, spec, 32))
    steps['mean'] = step.lower(state, data).compile()
  finally:
    train_lib.meta_batch_value_and_grad = original
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
