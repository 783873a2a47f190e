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

Run from the repo root:
  python benchmarks/maml.py                      # all JAX settings
  python benchmarks/maml.py --torch              # also benchmarks/torch_maml.py
                                                 # and the JAX/PyTorch ratios
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
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewshot import backbones
from fewshot.algorithms import maml
from fewshot.algorithms.base import Algorithm
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.losses import episode_loss
from fewshot.ops import tune_malloc
from fewshot.objectives import (Objective, episodic, init_state,
                                make_train_step)
from fewshot.optimizers import make_optimizer

WAYS, SHOTS, QUERIES = 5, 1, 15
META_BATCH = 32
INNER_LEARNING_RATE = 0.4
SETTING_PATTERN = re.compile(r'^(so|fo)(_remat)?(_map)?(\d+)?$')
ORDERS = {'so': 'second', 'fo': 'first'}
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
  algorithm = maml(backbones.create('conv4', norm='batch'), num_ways=WAYS,
                   inner_steps=fields['inner_steps'],
                   inner_learning_rate=INNER_LEARNING_RATE,
                   first_order=fields['order'] == 'first',
                   remat=fields['remat'])
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
  seconds = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, train_data)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - start)
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
  return records


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
               '--steps', str(args.steps), '--warmup', str(args.warmup)]
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


def run_torch(jax_records: list[dict], args: argparse.Namespace) -> None:
  """benchmarks/torch_maml.py for the same orders and steps, and the ratios."""
  wanted = sorted({(r['order'], r['inner_steps']) for r in jax_records
                   if r['benchmark'] == 'maml_train'})
  if not wanted:
    return
  codes = {order: code for code, order in ORDERS.items()}
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'torch_maml.py')
  command = [sys.executable, script,
             '--settings', ','.join(f'{codes[o]}{s}' for o, s in wanted),
             '--threads', str(args.torch_threads),
             '--steps', str(args.torch_steps or args.steps),
             '--warmup', str(args.warmup)]
  result = subprocess.run(command, capture_output=True, text=True)
  torch_rates = {}
  for line in result.stdout.splitlines():
    if not line.startswith('{'):
      continue
    print(line, flush=True)
    record = json.loads(line)
    if record['benchmark'] == 'torch_maml_train':
      torch_rates[(record['order'], record['inner_steps'])] = record
  if result.returncode != 0:
    print(f'torch_maml.py failed (exit {result.returncode}):\n'
          f'{result.stderr[-2000:]}', file=sys.stderr, flush=True)
  for record in jax_records:
    if record['benchmark'] != 'maml_train':
      continue
    torch_record = torch_rates.get((record['order'], record['inner_steps']))
    if torch_record is None:
      continue
    emit('maml_vs_torch', record['value'] / torch_record['value'], 'x',
         setting=record['setting'], inner_steps=record['inner_steps'],
         order=record['order'], remat=record['remat'],
         task_batching=record['task_batching'], meta_batch=META_BATCH,
         jax_tasks_per_s=record['value'],
         torch_tasks_per_s=torch_record['value'],
         torch_threads=torch_record['threads'], cpus=record['cpus'])


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
                      help='also run benchmarks/torch_maml.py and print the '
                      'JAX/PyTorch tasks/s ratios')
  parser.add_argument('--torch_threads', type=int, default=2)
  parser.add_argument('--torch_steps', type=int, default=0,
                      help='timed meta-batches for PyTorch (default --steps)')
  args = parser.parse_args()
  if args.steps < 1:
    parser.error('--steps must be >= 1.')
  inner_steps = [int(s) for s in args.inner_steps.split(',') if s]
  settings = expand_settings(args.settings, inner_steps)

  if len(settings) == 1:
    tune_malloc()  # before any JAX computation
    machine = dict(backend=jax.default_backend(),
                   device=jax.devices()[0].device_kind,
                   cpus=os.cpu_count(), host=platform.machine(),
                   xla_flags=os.environ.get('XLA_FLAGS', ''))
    records = run_setting(settings[0], args, machine)
  else:
    records = run_in_subprocesses(settings, args)
  if args.torch:
    run_torch(records, args)


if __name__ == '__main__':
  main()
