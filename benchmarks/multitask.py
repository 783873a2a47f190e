"""Multi-task step time per weighting method, and the per-task gradients' memory.

Prints one JSON line per figure. Run from the repo root, alone on the
machine:

  python benchmarks/multitask.py              # JAX, then PyTorch if installed
  python benchmarks/multitask.py --skip_torch

The MultiMNIST setting: Conv-4 (32 filters, running BatchNorm) on 36x36x1
canvases, one stream of 256 images, 2 or 3 ten-way heads, Adam; the full
compiled step (sampling, forward, per-task gradients where the method
needs them, combination, update). Each method's median step time is
reported with its ratio to equal weighting; the methods that read the
task gradients' Gram matrix (GradNorm, PCGrad, CAGrad, MGDA) are timed in
each mode of `--gradients` (the shared parameters' exact task gradients,
or the features' with one backbone backward pass). Memory: the bytes of the `[T,
...]` per-task gradients of the shared parameters, and XLA's temporary
buffer size of the compiled step. PyTorch: the same network and batch,
equal weighting (one backward of the summed loss) and PCGrad as LibMTL
computes it (one `backward(retain_graph=True)` per task, flattened
gradients, the projection loop), eager and `channels_last`; the faster is
reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np
import optax

from fewshot import backbones
from fewshot.data.batches import MultiLabelImages
from fewshot.multitask import make_weighting
from fewshot.objectives import init_state, make_train_step
from fewshot.objectives.multitask import Stream, Task, multitask
from fewshot.ops import tune_cpu

BATCH, IMAGES, FILTERS, SIZE = 256, 4096, 32, 36
FEATURES = FILTERS * (SIZE // 16) ** 2  # Conv-4's output width
METHODS = {'equal': {}, 'fixed': None, 'uncertainty': {},
           'dwa': {'period': 10}, 'gradnorm': {'period': 10}, 'pcgrad': {},
           'cagrad': {}, 'mgda': {}}
NAMES = ('left', 'right', 'third')


def emit(benchmark: str, value: float, unit: str, **settings) -> None:
  print(json.dumps({'benchmark': benchmark, 'value': round(value, 4),
                    'unit': unit, **settings}), flush=True)


def _data(num_tasks):
  rng = np.random.default_rng(0)
  return {'images': MultiLabelImages(
      images=rng.integers(0, 255, (IMAGES, SIZE, SIZE, 1)).astype(np.uint8),
      labels={n: rng.integers(0, 10, IMAGES).astype(np.int32)
              for n in NAMES[:num_tasks]})}


def _runs(num_tasks, modes):
  """`(method, options, gradients)` to time: every mode for Gram methods."""
  for method, options in METHODS.items():
    if options is None:
      options = {'weights': tuple(range(1, num_tasks + 1))}
    needs_gram = make_weighting(method, **options).needs_gram
    for gradients in (modes if needs_gram else ('parameters',)):
      yield method, options, gradients


def bench_jax(num_tasks: int, steps: int, repeats: int,
              modes: tuple[str, ...]) -> None:
  data = jax.device_put(_data(num_tasks))
  tasks = {n: Task('images', outputs=10) for n in NAMES[:num_tasks]}
  backbone = backbones.create('conv4', filters=FILTERS, norm='batch_running')
  baseline = None
  for method, options, gradients in _runs(num_tasks, modes):
    objective = multitask(backbone, tasks=tasks,
                          streams={'images': Stream(batch_size=BATCH)},
                          weighting=make_weighting(method, **options),
                          gradients=gradients)
    optimizer = optax.adam(1e-3)
    state = init_state(objective, optimizer, data, 0)
    step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
    compiled = step.lower(state, data).compile()
    state, _ = step(state, data)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = step(state, data)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / steps)
    seconds = float(np.median(times))
    baseline = seconds if method == 'equal' else baseline
    needs_gram = make_weighting(method, **options).needs_gram
    if not needs_gram:
      per_task = 0
    elif gradients == 'parameters':
      per_task = num_tasks * sum(
          x.size * x.dtype.itemsize
          for x in jax.tree.leaves(state.params['backbone']))
    else:  # [T, B, D] feature gradients
      per_task = num_tasks * BATCH * FEATURES * 4
    memory = compiled.memory_analysis()
    common = dict(method=method, tasks=num_tasks, batch=BATCH,
                  framework='jax ' + jax.__version__)
    if needs_gram:
      common['gradients'] = gradients
    emit('multitask_step_ms', 1000 * seconds, 'ms', **common)
    emit('multitask_step_vs_equal', seconds / baseline, 'x', **common)
    emit('multitask_task_gradient_bytes', per_task, 'bytes', **common)
    if memory is not None:
      emit('multitask_step_temp_bytes', memory.temp_size_in_bytes, 'bytes',
           **common)


def bench_torch(num_tasks: int, steps: int, repeats: int, threads: int
                ) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)

  def encoder():
    blocks = []
    for i in range(4):
      blocks += [nn.Conv2d(1 if i == 0 else FILTERS, FILTERS, 3, padding=1),
                 nn.BatchNorm2d(FILTERS), nn.ReLU(inplace=True),
                 nn.MaxPool2d(2)]
    return nn.Sequential(*blocks, nn.Flatten())

  images = torch.rand(BATCH, 1, SIZE, SIZE)
  labels = [torch.randint(0, 10, (BATCH,)) for _ in range(num_tasks)]
  results = {}
  for layout in ('contiguous', 'channels_last'):
    model = encoder()
    heads = nn.ModuleList(nn.Linear(FEATURES, 10)
                          for _ in range(num_tasks))
    x = images
    if layout == 'channels_last':
      model = model.to(memory_format=torch.channels_last)
      x = images.contiguous(memory_format=torch.channels_last)
    shared = list(model.parameters())
    optimizer = torch.optim.Adam(list(shared) + list(heads.parameters()),
                                 lr=1e-3)

    def losses():
      features = model(x)
      return [F.cross_entropy(head(features), y)
              for head, y in zip(heads, labels)]

    def equal_step():
      optimizer.zero_grad(set_to_none=True)
      sum(losses()).backward()
      optimizer.step()

    def pcgrad_step():
      optimizer.zero_grad(set_to_none=True)
      task_losses = losses()
      grads = []
      for t, loss in enumerate(task_losses):
        loss.backward(retain_graph=t < num_tasks - 1)
        grads.append(torch.cat([p.grad.reshape(-1) for p in shared]))
        for p in shared:
          p.grad = None
      grads = torch.stack(grads)
      projected = grads.clone()
      for i in range(num_tasks):
        for j in torch.randperm(num_tasks).tolist():
          dot = projected[i] @ grads[j]
          if dot < 0:
            projected[i] -= dot * grads[j] / grads[j].norm() ** 2
      combined = projected.sum(0)
      offset = 0
      for p in shared:
        p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
      optimizer.step()

    for method, fn in (('equal', equal_step), ('pcgrad', pcgrad_step)):
      fn()
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
          fn()
        times.append((time.perf_counter() - start) / steps)
      seconds = float(np.median(times))
      if method not in results or seconds < results[method][0]:
        results[method] = (seconds, layout)
  for method, (seconds, layout) in results.items():
    common = dict(method=method, tasks=num_tasks, batch=BATCH,
                  framework='torch ' + torch.__version__, layout=layout,
                  threads=threads)
    emit('multitask_step_ms', 1000 * seconds, 'ms', **common)
    emit('multitask_step_vs_equal', seconds / results['equal'][0], 'x',
         **common)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--tasks', default='2,3')
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--gradients', default='parameters,features',
                      help="modes for the Gram-reading methods: "
                      "',' of parameters, features, features_summed")
  args = parser.parse_args()
  tune_cpu()
  emit('machine', 0, '', cpu=platform.processor() or platform.machine(),
       devices=str(jax.devices()))
  for num_tasks in map(int, args.tasks.split(',')):
    bench_jax(num_tasks, args.steps, args.repeats,
              tuple(args.gradients.split(',')))
    if not args.skip_torch:
      try:
        bench_torch(num_tasks, args.steps, args.repeats, args.threads)
      except ImportError:
        emit('torch_missing', 0, '')


if __name__ == '__main__':
  main()
