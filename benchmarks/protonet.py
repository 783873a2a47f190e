"""Conv-4 ProtoNet throughput: training and evaluation episodes/s, FLOP/s.

Prints one JSON line per figure. Run from the repo root:

  python benchmarks/protonet.py                 # JAX figures
  python benchmarks/protonet.py --torch         # also the PyTorch reference
                                                # (benchmarks/torch_protonet.py)
                                                # and the JAX/PyTorch ratios
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewshot import backbones
from fewshot.algorithms import protonet
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.evaluators import episode_accuracies
from fewshot.objectives import episodic, init_state, make_train_step
from fewshot.ops import tune_malloc
from fewshot.optimizers import make_optimizer

TRAIN_SETTINGS = ((5, 1, 15), (20, 1, 15), (60, 5, 5))


def emit(benchmark: str, value: float, unit: str, **settings) -> None:
  print(json.dumps({'benchmark': benchmark, 'value': round(value, 3),
                    'unit': unit, **settings}), flush=True)


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def peak_matmul_flops(size: int = 2048) -> float:
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  return 2 * size ** 3 / median_seconds(lambda: matmul(a), 10)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=30,
                      help='timed training steps per setting')
  parser.add_argument('--torch', action='store_true',
                      help='also run benchmarks/torch_protonet.py')
  args = parser.parse_args()
  tune_malloc()
  machine = dict(backend=jax.default_backend(),
                 device=jax.devices()[0].device_kind,
                 cpus=os.cpu_count(), host=platform.machine())

  splits = synthetic_splits(num_classes=(100, 2, 100), images_per_class=20)
  train_data = sampling.to_device(splits['train'])
  test_data = sampling.to_device(splits['test'])
  algorithm = protonet(backbones.create('conv4', norm='batch_running'))
  optimizer = make_optimizer(learning_rate=1e-3)

  peak = peak_matmul_flops()
  emit('peak_matmul_fp32', peak / 1e9, 'GFLOP/s', **machine)
  jax_rates = {}
  for ways, shots, queries in TRAIN_SETTINGS:
    objective = episodic(algorithm, ways=ways, shots=shots, queries=queries)
    state = init_state(objective, optimizer, train_data, 0)
    step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
    flops = step.lower(state, train_data).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get('flops', 0.)
    for _ in range(3):  # compile and warm up
      state, metrics = step(state, train_data)
    jax.block_until_ready(state)

    holder = [state]  # the step donates its input: always pass the newest

    def run():
      for _ in range(args.steps):
        holder[0], _ = step(holder[0], train_data)
      return holder[0]
    seconds = median_seconds(run, 3) / args.steps
    state = holder[0]
    settings = dict(ways=ways, shots=shots, queries=queries, **machine)
    jax_rates[(ways, shots, queries)] = 1 / seconds
    emit('protonet_train', 1 / seconds, 'episodes/s', **settings)
    emit('protonet_train_step', 1e3 * seconds, 'ms', **settings)
    emit('protonet_train_fraction_of_peak', flops / seconds / peak, 'fraction',
         step_gflop=round(flops / 1e9, 3), **settings)

  num_episodes = 600
  evaluate = jax.jit(episode_accuracies(
      algorithm, sampling.EpisodeSpec(5, 1, 15), num_episodes))
  key = jax.random.key(0)
  jax.block_until_ready(evaluate(state.params, state.model_state, test_data,
                                 key))
  seconds = median_seconds(
      lambda: evaluate(state.params, state.model_state, test_data, key), 3)
  eval_rate = num_episodes / seconds
  emit('protonet_eval', eval_rate, 'episodes/s', ways=5, shots=1, queries=15,
       episodes=num_episodes, **machine)

  if args.torch:
    script = os.path.join(os.path.dirname(__file__), 'torch_protonet.py')
    out = subprocess.run([sys.executable, script], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
      if not line.startswith('{'):
        continue
      record = json.loads(line)
      print(line, flush=True)
      if record['benchmark'] == 'torch_protonet_train':
        setting = (record['ways'], record['shots'], record['queries'])
        if setting in jax_rates:
          emit('protonet_train_speedup_vs_torch',
               jax_rates[setting] / record['value'], 'x',
               ways=setting[0], shots=setting[1], queries=setting[2])
      elif record['benchmark'] == 'torch_protonet_eval':
        emit('protonet_eval_speedup_vs_torch', eval_rate / record['value'],
             'x', ways=5, shots=1, queries=15)


if __name__ == '__main__':
  main()
