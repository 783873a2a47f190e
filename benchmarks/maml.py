"""Conv-4 MAML meta-training: tasks/s, compile time and peak memory.

5-way 1-shot 15-query episodes of 28x28x1 synthetic images, meta-batch 32,
Conv-4 with transductive BatchNorm (`norm='batch'`) and a linear head, inner
SGD at 0.4, outer Adam 1e-3: the library's own training step
(`fewshot.objectives.make_train_step` of the episodic objective around
`fewshot.algorithms.maml`), episodes
sampled on the device, jitted with the state donated.

Settings are named `<order>[_remat][_map][inner steps]`:
  so        second-order MAML          fo      first order (FOMAML)
  _remat    `remat=True`: each inner step is rematerialised in the backward
            pass (`jax.checkpoint`)
  _map      the tasks of the meta-batch run one after the other with
            `jax.lax.map` instead of the library's `jax.vmap` (a local copy
            of the train step; everything else is the same)
A name without a step count runs every `--inner_steps` value: the default
'so,fo,so_remat,so_map1' is second order, first order and second order with
remat at 1, 5 and 10 inner steps, plus vmap vs lax.map at 1 step.

Every setting runs in a fresh process (the script starts itself once per
setting when several are asked for), so memory figures are the setting's
alone. Per setting it prints, one JSON line each:
  maml_compile      seconds to lower and compile the step
  maml_xla_memory   MB: XLA's buffer assignment for the compiled step,
                    temp + arguments + outputs - aliased (donated) bytes; the
                    cleaner number for comparing settings (e.g. remat at 10
                    steps against no remat at 5)
  maml_train        tasks/s (median over `--steps` timed meta-batches, after
                    `--warmup` untimed ones; `ms_per_meta_batch` alongside)
  maml_train_step   ms per meta-batch
  maml_peak_rss     MB: increase of the process's peak RSS (VmHWM, or
                    ru_maxrss without /proc; see `peak_rss_mb`) over its
                    value just before compiling, so it includes the
                    compiler's own memory: `after_compile_mb` is the peak once
                    compiled, before any step ran, and `run_increase_mb` the
                    final peak minus the resident size after compiling (the
                    steps' own growth; `fewshot.ops.tune_malloc` keeps freed
                    heap pages resident, so it can under-count where the steps
                    reuse the compiler's freed memory).
`--compile_only` prints just the first two (no steps run): a cheap check of
what fits in memory before running.

With `--torch` each setting's process also starts benchmarks/torch_maml.py
--serve: `maml_torch_check` records compare every PyTorch variant's
meta-loss and meta-gradient with JAX's on the same weights and 4 tasks
(float64, the setting's order, at most 2 inner steps; the run stops if one
differs by more than 1e-6), then the `--steps` timed meta-batches alternate JAX and each
variant, one meta-batch each, so drift falls on both alike.
`torch_maml_train` gives each variant's tasks/s (or `unavailable` and why),
`maml_vs_torch` JAX against the fastest variant. The parent prints a
`machine` record first (CPU model, cores, measured fp32 matmul GFLOP/s).

Run from the repo root:
  python benchmarks/maml.py                      # all JAX settings
  python benchmarks/maml.py --torch              # also every variant of
                                                 # benchmarks/torch_maml.py
  python benchmarks/maml.py --settings so1 --steps 1     # one quick setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewshot import backbones
from fewshot.algorithms import maml
from fewshot.algorithms.base import Algorithm
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.losses import episode_loss, meta_batch_value_and_grad
from fewshot.ops import tune_cpu
from fewshot.objectives import (Objective, episodic, init_state,
                                make_train_step)
from fewshot.optimizers import make_optimizer
from torch_peer import PeerExited, TorchPeer, cpu_model  # benchmarks/ (sys.path)

WAYS, SHOTS, QUERIES = 5, 1, 15
META_BATCH = 32
INNER_LEARNING_RATE = 0.4
SETTING_PATTERN = re.compile(r'^(so|fo)(_remat)?(_map)?(\d+)?$')
ORDERS = {'so': 'second', 'fo': 'first'}
CODES = {order: code for code, order in ORDERS.items()}
MEGABYTE = 1024 * 1024


def emit(benchmark: str, value: float, unit: str, **settings) -> dict:
  record = {'benchmark': benchmark, 'value': round(value, 3), 'unit': unit,
            **settings}
  print(json.dumps(record), flush=True)
  return record


def expand_settings(settings: str, inner_steps: list[int]) -> list[str]:
  """'so,fo_remat5' with inner steps [1, 5] -> ['so1', 'so5', 'fo_remat5']."""
  expanded = []
  for token in filter(None, (t.strip() for t in settings.split(','))):
    match = SETTING_PATTERN.match(token)
    if not match:
      raise ValueError(f'Unknown setting {token!r}: so or fo, then optionally '
                       '_remat, _map and the inner steps (so_remat10).')
    steps = match.group(4)
    stem = token[:len(token) - len(steps)] if steps else token
    for count in ([int(steps)] if steps else inner_steps):
      expanded.append(f'{stem}{count}')
  return expanded


def describe(setting: str) -> dict:
  """The JSON fields that describe a setting."""
  order_code, remat, lax_map, steps = SETTING_PATTERN.match(setting).groups()
  return dict(setting=setting, inner_steps=int(steps),
              order=ORDERS[order_code], remat=bool(remat),
              task_batching='lax.map' if lax_map else 'vmap',
              meta_batch=META_BATCH, ways=WAYS, shots=SHOTS, queries=QUERIES)


def peak_rss_mb() -> float:
  """The process's peak resident set size so far, in MiB.

  `ru_maxrss` (KiB on Linux) of a process started by fork + exec also holds
  its parent's high-water mark (the kernel carries the old address space's
  peak across exec), so where /proc has it this reads VmHWM, the peak of the
  process's own address space, and falls back to ru_maxrss elsewhere.
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except (OSError, IndexError, ValueError):
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float | None:
  """The process's resident set size now, or None without /proc."""
  try:
    with open('/proc/self/statm') as f:
      resident_pages = int(f.read().split()[1])
  except (OSError, IndexError, ValueError):
    return None
  return resident_pages * os.sysconf('SC_PAGE_SIZE') / MEGABYTE


def lax_map_meta_batch_loss(algorithm: Algorithm, meta_params, model_state,
                            episodes, key, train: bool = True):
  """`fewshot.losses.meta_batch_loss` with `lax.map` over tasks, not vmap."""
  num_tasks = episodes.support_labels.shape[0]
  keys = jax.random.split(key, num_tasks)

  def one_task(episode_and_key):
    episode, task_key = episode_and_key
    return episode_loss(algorithm, meta_params, model_state, episode,
                        task_key, train)

  losses, (metrics, states) = jax.lax.map(one_task, (episodes, keys))
  metrics = jax.tree.map(jnp.mean, metrics)
  states = jax.tree.map(lambda s: jnp.mean(s, axis=0), states)
  return jnp.mean(losses), (metrics, states)


def lax_map_objective(algorithm: Algorithm, spec: sampling.EpisodeSpec,
                      meta_batch_size: int) -> Objective:
  """The episodic objective with the lax.map meta-batch loss."""
  objective = episodic(algorithm, ways=spec.num_ways, shots=spec.num_shots,
                       queries=spec.num_queries,
                       meta_batch_size=meta_batch_size)

  def loss(params, model_state, episodes, key):
    return lax_map_meta_batch_loss(algorithm, params, model_state, episodes,
                                   jax.random.split(key)[1])

  return objective._replace(loss=loss, value_and_grad=None)


def run_setting(setting: str, args: argparse.Namespace,
                machine: dict) -> list[dict]:
  """Compiles, times and measures one setting in this process; its records."""
  fields = {**describe(setting), **machine}
  splits = synthetic_splits(num_classes=(64, 5, 5), images_per_class=20,
                            image_size=28, channels=1)
  train_data = sampling.to_device(splits['train'])
  algorithm = algorithm_for(setting)
  optimizer = make_optimizer(name='adam', learning_rate=1e-3)
  spec = sampling.EpisodeSpec(WAYS, SHOTS, QUERIES)
  if fields['task_batching'] == 'lax.map':
    objective = lax_map_objective(algorithm, spec, META_BATCH)
  else:
    objective = episodic(algorithm, ways=WAYS, shots=SHOTS, queries=QUERIES,
                         meta_batch_size=META_BATCH)
  step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
  state = init_state(objective, optimizer, train_data, 0)
  jax.block_until_ready((state, train_data))

  baseline_mb = peak_rss_mb()
  start = time.perf_counter()
  compiled = step.lower(state, train_data).compile()
  compile_seconds = time.perf_counter() - start
  after_compile_mb = peak_rss_mb()
  resident_after_compile_mb = current_rss_mb()
  records = [emit('maml_compile', compile_seconds, 's',
                  library_fusions=library_fusions(compiled), **fields)]
  records += xla_memory_records(compiled, fields)
  if args.compile_only:
    return records

  for _ in range(args.warmup):
    state, metrics = compiled(state, train_data)
  jax.block_until_ready(state)
  peer = TorchPeer('torch_maml.py', args.torch_threads) if args.torch else None
  torch_seconds, torch_failed = {}, {}
  if peer:
    records += torch_check(peer, setting, fields)
    for variant in peer('variants')['variants']:
      torch_seconds[variant] = []
  seconds = []
  for _ in range(args.steps):  # with --torch: JAX and each variant in turn
    start = time.perf_counter()
    state, metrics = compiled(state, train_data)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - start)
    for variant in list(torch_seconds):
      try:
        torch_seconds[variant].append(peer('step', variant=variant,
                                           setting=torch_setting(setting))
                                      ['seconds'])
      except RuntimeError as error:  # compile's double backward; PeerExited
        torch_failed[variant] = str(error)
        del torch_seconds[variant]
        if isinstance(error, PeerExited):  # e.g. killed for memory
          peer.restart()
  peak_mb = peak_rss_mb()
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    print(f'warning: {setting}: non-finite meta-loss {loss}', file=sys.stderr)

  median = float(np.median(seconds))
  records.append(emit('maml_train', META_BATCH / median, 'tasks/s',
                      ms_per_meta_batch=round(1e3 * median, 1),
                      min_ms_per_meta_batch=round(1e3 * min(seconds), 1),
                      steps=args.steps, **fields))
  records.append(emit('maml_train_step', 1e3 * median, 'ms', **fields))
  run_increase_mb = (None if resident_after_compile_mb is None else
                     round(peak_mb - resident_after_compile_mb, 1))
  records.append(emit('maml_peak_rss', peak_mb - baseline_mb, 'MB',
                      baseline_mb=round(baseline_mb, 1),
                      after_compile_mb=round(after_compile_mb, 1),
                      run_increase_mb=run_increase_mb,
                      peak_mb=round(peak_mb, 1), **fields))
  if peer:
    records += torch_records(torch_seconds, torch_failed, median, fields,
                             peer('rss')['peak_rss_mb'])
    peer.close()
  return records


def algorithm_for(setting: str, inner_steps: int | None = None) -> Algorithm:
  """The setting's MAML (optionally with another number of inner steps)."""
  fields = describe(setting)
  return maml(backbones.create('conv4', norm='batch'), num_ways=WAYS,
              inner_steps=inner_steps or fields['inner_steps'],
              inner_learning_rate=INNER_LEARNING_RATE,
              first_order=fields['order'] == 'first', remat=fields['remat'])


def torch_setting(setting: str) -> str:
  """'so_remat10' -> torch_maml.py's 'so10' (remat and lax.map are JAX's)."""
  fields = describe(setting)
  return f"{CODES[fields['order']]}{fields['inner_steps']}"


def torch_check(peer: TorchPeer, setting: str, fields: dict) -> list[dict]:
  """Every PyTorch variant's meta-loss and meta-gradient against JAX's.

  In float64, on 4 tasks with the setting's order and (at most 2, to keep
  the float64 compile short) inner steps. In
  float32 the two differ by ~1e-2 relative in the first kernel's gradient
  (and JAX's own cpu and accelerator code paths differ from each other as
  much): inner steps at learning rate 0.4 take the support loss from 1.6 to
  4-5 and amplify rounding. In float64 all agree to ~1e-14, so a difference
  above 1e-6 is a real one and exits.
  """
  with jax.enable_x64(True):
    return _torch_check_x64(peer, setting, fields)


def _torch_check_x64(peer: TorchPeer, setting: str,
                     fields: dict) -> list[dict]:
  inner_steps = min(describe(setting)['inner_steps'], 2)
  algorithm = algorithm_for(setting, inner_steps)
  splits = synthetic_splits(num_classes=(16, 2, 2), images_per_class=20,
                            image_size=28, channels=1)
  data = sampling.to_device(splits['train'])
  spec = sampling.EpisodeSpec(WAYS, SHOTS, QUERIES)
  episodes = sampling.sample_meta_batch(jax.random.key(11), data, spec, 4)
  # Class-major episodes, as torch_maml.py's labels.
  order = jnp.argsort(episodes.support_labels, axis=1, stable=True)
  support = jnp.take_along_axis(episodes.support_images,
                                order[..., None, None, None], axis=1)
  query_order = jnp.argsort(episodes.query_labels, axis=1, stable=True)
  query = jnp.take_along_axis(episodes.query_images,
                              query_order[..., None, None, None], axis=1)
  support = support.astype(jnp.float64) / 255.0
  query = query.astype(jnp.float64) / 255.0
  episodes = episodes.replace(
      support_images=support, query_images=query,
      support_labels=jnp.sort(episodes.support_labels, axis=1),
      query_labels=jnp.sort(episodes.query_labels, axis=1))
  params, model_state = algorithm.init(jax.random.key(12), support[0])
  params, model_state = jax.tree.map(lambda x: x.astype(jnp.float64),
                                     (params, model_state))
  (loss, _), grads = jax.jit(lambda p: meta_batch_value_and_grad(
      algorithm, p, model_state, episodes, jax.random.key(13)))(params)
  arrays = {'support': support, 'query': query, 'loss': loss,
            'setting': np.array(f"{CODES[fields['order']]}{inner_steps}")}
  for prefix, tree in (('', params), ('grad/', grads)):
    for group in ('backbone', 'head'):
      if group == 'head':
        for name, value in tree['head'].items():
          arrays[f'{prefix}head/{name}'] = value
        continue
      for layer, leaves in tree['backbone'].items():
        for name, value in leaves.items():
          arrays[f'{prefix}{layer}/{name}'] = value
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'check.npz')
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    errors = peer('check', npz=path)['errors']
  records, bad = [], {}
  for variant, error in errors.items():
    if 'error' in error:
      records.append(emit('maml_torch_check', float('nan'), 'relative error',
                          variant=variant, unavailable=error['error'],
                          **fields))
      continue
    worst = max(error.values())
    records.append(emit('maml_torch_check', worst, 'relative error',
                        variant=variant,
                        **{k: float(f'{v:.3g}') for k, v in error.items()},
                        **fields))
    if worst > 1e-6:
      bad[variant] = error
  if bad:
    sys.exit(f'PyTorch and JAX compute different meta-gradients: {bad}')
  return records


def torch_records(torch_seconds: dict, torch_failed: dict, jax_median: float,
                  fields: dict, torch_peak_rss_mb: float) -> list[dict]:
  """Each variant's time (or why it has none) and JAX against the fastest."""
  records = []
  for variant, reason in torch_failed.items():
    records.append(emit('torch_maml_train', float('nan'), 'tasks/s',
                        variant=variant, unavailable=reason, **fields))
  medians = {v: float(np.median(t)) for v, t in torch_seconds.items() if t}
  for variant, median in medians.items():
    records.append(emit('torch_maml_train', META_BATCH / median, 'tasks/s',
                        variant=variant,
                        ms_per_meta_batch=round(1e3 * median, 1),
                        min_ms_per_meta_batch=round(
                            1e3 * min(torch_seconds[variant]), 1),
                        **fields))
  if medians:
    fastest = min(medians, key=medians.get)
    records.append(emit(
        'maml_vs_torch', medians[fastest] / jax_median, 'x',
        torch_variant=fastest, torch_ms=round(1e3 * medians[fastest], 1),
        jax_ms=round(1e3 * jax_median, 1),
        torch_peak_rss_mb=round(torch_peak_rss_mb, 1), **fields))
  return records


def peak_matmul_gflops(size: int = 2048) -> float:
  """Measured fp32 matmul rate (median of 10), the machine's yardstick."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  times = []
  for _ in range(10):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / float(np.median(times)) / 1e9


def library_fusions(compiled) -> dict[str, int]:
  """How many ops XLA:CPU handed to YNNPACK / XNNPACK / oneDNN fusions.

  jaxlib 0.10's XLA:CPU runs convolutions and dots as `__ynn_fusion`s by
  default (`--xla_cpu_experimental_ynn_fusion_type`); this shows whether a
  run used them (WORKSPACE.md, "XLA:CPU flags").
  """
  text = compiled.as_text() or ''
  return {name: text.count(f'"kind":"__{name}_fusion"')
          for name in ('ynn', 'xnn', 'onednn')}


def xla_memory_records(compiled, fields: dict) -> list[dict]:
  """The `maml_xla_memory` record of a compiled step, if the backend has one."""
  try:
    memory = compiled.memory_analysis()
  except Exception as error:  # pylint: disable=broad-except
    print(f'No XLA memory analysis on this backend: {error}', file=sys.stderr)
    return []
  if memory is None:
    return []
  temp = memory.temp_size_in_bytes
  arguments = memory.argument_size_in_bytes
  outputs = memory.output_size_in_bytes
  aliased = memory.alias_size_in_bytes
  return [emit('maml_xla_memory',
               (temp + arguments + outputs - aliased) / MEGABYTE, 'MB',
               temp_mb=round(temp / MEGABYTE, 1),
               argument_mb=round(arguments / MEGABYTE, 1),
               output_mb=round(outputs / MEGABYTE, 1),
               alias_mb=round(aliased / MEGABYTE, 1), **fields)]


def run_in_subprocesses(settings: list[str],
                        args: argparse.Namespace) -> list[dict]:
  """Each setting in a fresh process; prints and returns its JSON records."""
  records = []
  for setting in settings:
    command = [sys.executable, __file__, '--settings', setting,
               '--steps', str(args.steps), '--warmup', str(args.warmup),
               '--torch_threads', str(args.torch_threads)]
    if args.torch:
      command.append('--torch')
    if args.compile_only:
      command.append('--compile_only')
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
      if line.startswith('{'):
        print(line, flush=True)
        records.append(json.loads(line))
    if result.returncode != 0:
      print(f'{setting} failed (exit {result.returncode}):\n'
            f'{result.stderr[-2000:]}', file=sys.stderr, flush=True)
  return records


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=5,
                      help='timed meta-batches per setting')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed meta-batches after compiling')
  parser.add_argument('--settings', default='so,fo,so_remat,so_map1',
                      help="comma-separated <so|fo>[_remat][_map][steps]; "
                      "without steps, every --inner_steps value")
  parser.add_argument('--inner_steps', default='1,5,10',
                      help='inner steps for settings given without them')
  parser.add_argument('--compile_only', action='store_true',
                      help='only compile: compile time and XLA memory, no '
                      'steps run (to check what fits before running)')
  parser.add_argument('--torch', action='store_true',
                      help='also check and time every variant of '
                      'benchmarks/torch_maml.py, alternating with JAX, and '
                      'print the ratio to the fastest')
  parser.add_argument('--torch_threads', type=int, default=2)
  args = parser.parse_args()
  if args.steps < 1:
    parser.error('--steps must be >= 1.')
  inner_steps = [int(s) for s in args.inner_steps.split(',') if s]
  settings = expand_settings(args.settings, inner_steps)
  tune_cpu()  # before any JAX computation; subprocesses inherit XLA_FLAGS

  if len(settings) == 1:
    machine = dict(backend=jax.default_backend(),
                   device=jax.devices()[0].device_kind,
                   cpus=os.cpu_count(), host=platform.machine(),
                   xla_flags=os.environ.get('XLA_FLAGS', ''))
    run_setting(settings[0], args, machine)
  else:
    emit('machine', os.cpu_count(), 'cpus', cpu=cpu_model(),
         jax_matmul_gflops=round(peak_matmul_gflops(), 1),
         backend=jax.default_backend(),
         xla_flags=os.environ.get('XLA_FLAGS', ''))
    run_in_subprocesses(settings, args)


if __name__ == '__main__':
  main()
