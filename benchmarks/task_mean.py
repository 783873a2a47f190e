"""Micro-benchmark: averaging per-task gradients over a leading task axis.

`jax.grad` of a vmapped meta-batch loss sums the tasks' parameter gradients
with a `reduce` over the leading axis. On XLA:CPU that reduce is far slower
than the same sum as a matrix-vector product, which is why
`fewshot.losses.meta_batch_value_and_grad` averages with a dot. For one
Conv-4 kernel gradient per task (`[T, 3, 3, 64, 64]`, T = 32 by default) it
prints ms per call (median of interleaved repetitions) of
  reduce    `jnp.mean(g, axis=0)`
  dot       `fewshot.losses._mean_over_tasks(g)` (`[T] x [T, ...]` dot)
  halving   pairwise sums of halves
one JSON line each, and checks that they agree.

  python benchmarks/task_mean.py [--tasks 32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.losses import _mean_over_tasks  # pylint: disable=protected-access


def halving_mean(leaf: jax.Array) -> jax.Array:
  total, count = leaf, leaf.shape[0]
  while total.shape[0] > 1:
    half = total.shape[0] // 2
    summed = total[:half] + total[half:2 * half]
    total = (jnp.concatenate([summed, total[2 * half:]])
             if total.shape[0] % 2 else summed)
  return total[0] / count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=30)
  args = parser.parse_args()
  grads = jnp.asarray(np.random.default_rng(0).normal(
      size=(args.tasks, 3, 3, 64, 64)), jnp.float32)
  fns = {'reduce': jax.jit(lambda g: jnp.mean(g, axis=0)),
         'dot': jax.jit(_mean_over_tasks),
         'halving': jax.jit(halving_mean)}
  reference = fns['reduce'](grads)
  for name, fn in fns.items():
    np.testing.assert_allclose(fn(grads), reference, rtol=1e-5, atol=1e-6)
    fn(grads).block_until_ready()
  seconds = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(grads).block_until_ready()
      seconds[name].append(time.perf_counter() - start)
  for name, values in seconds.items():
    print(json.dumps({'benchmark': 'task_mean', 'method': name,
                      'value': round(1e3 * float(np.median(values)), 3),
                      'unit': 'ms', 'best_ms': round(1e3 * min(values), 3),
                      'shape': list(grads.shape),
                      'backend': jax.default_backend()}))


if __name__ == '__main__':
  main()
