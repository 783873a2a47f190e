"""Conv-4 ProtoNet throughput: training and evaluation episodes/s, FLOP/s.

Prints one JSON line per figure. Run from the repo root:

  python benchmarks/protonet.py                 # JAX figures
  python benchmarks/protonet.py --torch         # also every PyTorch variant
                                                # (benchmarks/torch_protonet.py)
                                                # and the ratios to the fastest

With `--torch` the PyTorch peer runs in a second process that waits on a
pipe while JAX runs (and JAX is idle while it runs): first every variant's
loss and gradients are checked against JAX's on the same weights and images
(`protonet_torch_check` records; the run stops if any differs by more than
1e-3 relative), then `--rounds` rounds alternate a JAX block and a block of
every PyTorch variant for each setting, so that the machine's drift falls on
both alike. Figures are medians over the rounds; `*_vs_torch` ratios are
JAX against the fastest variant (`torch_variant`). The `machine` record
names the CPU, its cores and both libraries' measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fewshot import backbones
from fewshot.algorithms import protonet
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.episodes import Episode
from fewshot.evaluators import episode_accuracies
from fewshot.losses import episode_loss
from fewshot.objectives import episodic, init_state, make_train_step
from fewshot.ops import tune_cpu
from fewshot.optimizers import make_optimizer
from torch_peer import TorchPeer, cpu_model  # benchmarks/torch_peer.py

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


def _loss_one_batch(backbone, params, model_state, episode: Episode):
  """ProtoNet's loss with support and query embedded as one batch."""
  images = jnp.concatenate([episode.support_images, episode.query_images])
  features, _ = backbone.apply(params['backbone'], model_state['backbone']
                               if 'backbone' in model_state else model_state,
                               images, True)
  support = features[:episode.support_images.shape[0]]
  prototypes = support.reshape(episode.num_ways, -1, support.shape[-1]).mean(1)
  query = features[episode.support_images.shape[0]:]
  logits = -jnp.sum((query[:, None] - prototypes[None]) ** 2, -1)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, episode.query_labels).mean()


def write_check_file(path: str, backbone, algorithm) -> None:
  """JAX's loss and gradients on one 5-way 1-shot 15-query episode of random
  float images, for `torch_protonet.py`'s `check`, in its npz layout."""
  ways, shots, queries = 5, 1, 15
  keys = jax.random.split(jax.random.key(3), 3)
  support = jax.random.uniform(keys[0], (ways * shots, 28, 28, 1))
  query = jax.random.uniform(keys[1], (ways * queries, 28, 28, 1))
  episode = Episode(support, jnp.repeat(jnp.arange(ways), shots), query,
                    jnp.repeat(jnp.arange(ways), queries), jnp.arange(ways),
                    num_ways=ways)
  params, model_state = algorithm.init(keys[2], support)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: episode_loss(
      algorithm, p, model_state, episode, keys[2])[0]))(params)
  one_loss, one_grads = jax.jit(jax.value_and_grad(
      lambda p: _loss_one_batch(backbone, p, model_state, episode)))(params)
  arrays = dict(support=support, query=query, ways=ways,
                query_labels=episode.query_labels, loss=loss,
                **{'one_batch/loss': one_loss})
  for prefix, tree in (('', params), ('grad/', grads),
                       ('one_batch/grad/', one_grads)):
    for layer, leaves in tree['backbone'].items():
      for name, value in leaves.items():
        arrays[f'{prefix}{layer}/{name}'] = value
  np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=30,
                      help='timed training steps per setting (per round '
                      'with --torch)')
  parser.add_argument('--torch', action='store_true',
                      help='also time every variant of '
                      'benchmarks/torch_protonet.py, alternating with JAX')
  parser.add_argument('--rounds', type=int, default=5,
                      help='with --torch: JAX / PyTorch alternations')
  parser.add_argument('--torch_variants', default='',
                      help='comma-separated (default: every variant of '
                      'benchmarks/torch_protonet.py)')
  parser.add_argument('--torch_threads', type=int, default=2)
  args = parser.parse_args()
  tune_cpu()
  machine = dict(backend=jax.default_backend(),
                 device=jax.devices()[0].device_kind,
                 cpus=os.cpu_count(), host=platform.machine(),
                 xla_flags=os.environ.get('XLA_FLAGS', ''))

  splits = synthetic_splits(num_classes=(100, 2, 100), images_per_class=20)
  train_data = sampling.to_device(splits['train'])
  test_data = sampling.to_device(splits['test'])
  backbone = backbones.create('conv4', norm='batch_running')
  algorithm = protonet(backbone)
  optimizer = make_optimizer(learning_rate=1e-3)

  peer = (TorchPeer('torch_protonet.py', args.torch_threads) if args.torch
          else None)
  variants = []
  if peer:
    variants = ([v for v in args.torch_variants.split(',') if v]
                or peer('variants')['variants'])
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'check.npz')
      write_check_file(path, backbone, algorithm)
      errors = peer('check', npz=path)['errors']
    for variant, error in errors.items():
      emit('protonet_torch_check', max(error.values()), 'relative error',
           variant=variant, **{k: float(f'{v:.3g}') for k, v in error.items()})
    bad = {v: e for v, e in errors.items() if max(e.values()) > 1e-3}
    if bad:
      sys.exit(f'PyTorch and JAX compute different losses or gradients: {bad}')

  peak = peak_matmul_flops()
  emit('machine', os.cpu_count(), 'cpus', cpu=cpu_model(),
       jax_matmul_gflops=round(peak / 1e9, 1),
       torch_matmul_gflops=(round(peer('matmul')['gflops'], 1) if peer
                            else None), **machine)
  emit('peak_matmul_fp32', peak / 1e9, 'GFLOP/s', **machine)
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
    setting = dict(ways=ways, shots=shots, queries=queries)
    jax_times, torch_times = [], {v: [] for v in variants}
    for _ in range(args.rounds if peer else 3):
      jax_times.append(median_seconds(run, 1) / args.steps)
      for variant in variants:
        torch_times[variant].append(peer('train', variant=variant,
                                         steps=args.steps, **setting)['seconds'])
    seconds = float(np.median(jax_times))
    state = holder[0]
    settings = dict(**setting, **machine)
    emit('protonet_train', 1 / seconds, 'episodes/s', **settings)
    emit('protonet_train_step', 1e3 * seconds, 'ms',
         fastest_ms=round(1e3 * min(jax_times), 2), **settings)
    emit('protonet_train_fraction_of_peak', flops / seconds / peak, 'fraction',
         step_gflop=round(flops / 1e9, 3), **settings)
    if peer:
      medians = {v: float(np.median(t)) for v, t in torch_times.items()}
      for variant, median in medians.items():
        emit('torch_protonet_train_step', 1e3 * median, 'ms', variant=variant,
             fastest_ms=round(1e3 * min(torch_times[variant]), 2), **setting)
      fastest = min(medians, key=medians.get)
      emit('protonet_train_vs_torch', medians[fastest] / seconds, 'x',
           torch_variant=fastest, torch_ms=round(1e3 * medians[fastest], 2),
           jax_ms=round(1e3 * seconds, 2), **setting)

  num_episodes = 600
  evaluate = jax.jit(episode_accuracies(
      algorithm, sampling.EpisodeSpec(5, 1, 15), num_episodes))
  key = jax.random.key(0)
  jax.block_until_ready(evaluate(state.params, state.model_state, test_data,
                                 key))
  eval_times, torch_eval = [], {v: [] for v in variants}
  for _ in range(args.rounds if peer else 3):
    eval_times.append(median_seconds(
        lambda: evaluate(state.params, state.model_state, test_data, key), 1)
        / num_episodes)
    for variant in variants:
      torch_eval[variant].append(peer('eval', variant=variant,
                                      episodes=100)['seconds'])
  eval_seconds = float(np.median(eval_times))
  emit('protonet_eval', 1 / eval_seconds, 'episodes/s', ways=5, shots=1,
       queries=15, episodes=num_episodes, **machine)
  if peer:
    medians = {v: float(np.median(t)) for v, t in torch_eval.items()}
    for variant, median in medians.items():
      emit('torch_protonet_eval', 1 / median, 'episodes/s', variant=variant,
           ways=5, shots=1, queries=15)
    fastest = min(medians, key=medians.get)
    emit('protonet_eval_vs_torch', medians[fastest] / eval_seconds, 'x',
         torch_variant=fastest, ways=5, shots=1, queries=15)
    peer.close()


if __name__ == '__main__':
  main()
