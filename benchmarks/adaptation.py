"""DANN, CDAN+E, MCC and KD step times, each against its source-only step.

Prints one JSON line per figure. Run from the repo root, alone on the
machine:

  python benchmarks/adaptation.py              # JAX, then PyTorch if installed
  python benchmarks/adaptation.py --skip_torch

Adaptation: the digits setting (LeNet with BatchNorm on 28x28x1, 64 source
and 64 target images per step, SGD); the full compiled step (sampling,
forward of both domains, the method's loss, update), reported with its
ratio to source-only training (64 source images). Distillation: a Conv-4
student (64 filters) on 32x32x3 with a frozen ResNet-12 teacher (widths
16-160, the Tiny-ImageNet pretraining default) in the same step, against
the Conv-4 trained alone. PyTorch: the same LeNet source-only and DANN
steps (gradient reversal as an `autograd.Function`, TLlib's layout), eager
and `torch.compile`; the faster is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fewshot import backbones
from fewshot.data.batches import LabelledImages
from fewshot.objectives import adaptation, distillation, init_state
from fewshot.objectives import make_train_step, supervised
from fewshot.ops import tune_cpu

BATCH, IMAGES = 64, 2048
METHODS = ('source_only', 'dann', 'cdan_e', 'mcc')


def emit(benchmark: str, value: float, unit: str, **settings) -> None:
  print(json.dumps({'benchmark': benchmark, 'value': round(value, 4),
                    'unit': unit, **settings}), flush=True)


def step_seconds(objective, data, steps: int, repeats: int) -> float:
  optimizer = optax.sgd(0.01, momentum=0.9)
  state = init_state(objective, optimizer, data, 0)
  step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
  state, _ = step(state, data)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) / steps)
  return float(np.median(times))


def bench_adaptation(steps: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  images = lambda: rng.integers(0, 255, (IMAGES, 28, 28, 1)).astype(np.uint8)
  data = jax.device_put({
      'source': LabelledImages(images=images(), labels=rng.integers(
          0, 10, IMAGES).astype(np.int32)),
      'target': images()})
  backbone = backbones.create('lenet')
  baseline = None
  for method in METHODS + ('self_training',):
    objective = adaptation(
        backbone, num_classes=10, num_steps=1000, batch_size=BATCH,
        method='source_only' if method == 'self_training' else method,
        pseudo_labels=dict(threshold=0.95) if method == 'self_training'
        else None)
    used = data if method != 'source_only' else {'source': data['source']}
    seconds = step_seconds(objective, used, steps, repeats)
    baseline = baseline or seconds
    common = dict(method=method, batch=BATCH, backbone='lenet',
                  framework='jax ' + jax.__version__)
    emit('adaptation_step_ms', 1000 * seconds, 'ms', **common)
    emit('adaptation_step_vs_source_only', seconds / baseline, 'x', **common)


def bench_distillation(steps: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  data = jax.device_put(LabelledImages(
      images=rng.integers(0, 255, (IMAGES, 32, 32, 3)).astype(np.uint8),
      labels=rng.integers(0, 120, IMAGES).astype(np.int32)))
  student = backbones.create('conv4', filters=64, norm='batch_running')
  teacher = backbones.create('resnet12', widths=(16, 40, 80, 160),
                             norm='batch_running')
  params, state = teacher.init(jax.random.key(1), data.images[:2])
  head = {'kernel': jnp.zeros((160, 120)), 'bias': jnp.zeros(120)}
  variables = {'params': params, 'state': state, 'head': head}
  alone = step_seconds(supervised(student, num_classes=120, batch_size=BATCH),
                       data, steps, repeats)
  common = dict(batch=BATCH, student='conv4', teacher='resnet12',
                framework='jax ' + jax.__version__)
  emit('distillation_step_ms', 1000 * alone, 'ms', method='alone', **common)
  for method, hint in (('kd', None),
                       ('kd+fitnets', dict(student='conv3',
                                           teacher='layer3'))):
    objective = distillation(student, teacher=teacher,
                             teacher_variables=variables, num_classes=120,
                             batch_size=BATCH, hint=hint)
    seconds = step_seconds(objective, data, steps, repeats)
    emit('distillation_step_ms', 1000 * seconds, 'ms', method=method,
         **common)
    emit('distillation_step_vs_alone', seconds / alone, 'x', method=method,
         **common)


def bench_torch(steps: int, repeats: int, threads: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)

  class Reverse(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, coefficient):
      ctx.coefficient = coefficient
      return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
      return -ctx.coefficient * grad, None

  def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.BatchNorm2d(20), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(20, 50, 5), nn.BatchNorm2d(50), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(800, 500), nn.BatchNorm1d(500), nn.ReLU())

  source = torch.rand(BATCH, 1, 28, 28)
  target = torch.rand(BATCH, 1, 28, 28)
  labels = torch.randint(0, 10, (BATCH,))
  domains = torch.cat([torch.ones(BATCH), torch.zeros(BATCH)])
  results = {}
  for mode in ('eager', 'compile'):
    encoder, head = lenet(), nn.Linear(500, 10)
    discriminator = nn.Sequential(nn.Linear(500, 1024), nn.ReLU(),
                                  nn.Linear(1024, 1024), nn.ReLU(),
                                  nn.Linear(1024, 1))
    parameters = (list(encoder.parameters()) + list(head.parameters())
                  + list(discriminator.parameters()))
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)

    def source_only():
      return F.cross_entropy(head(encoder(source)), labels)

    def dann():
      features = encoder(torch.cat([source, target]))
      logits = head(features[:BATCH])
      domain = discriminator(Reverse.apply(features, 0.5)).squeeze(1)
      return (F.cross_entropy(logits, labels)
              + F.binary_cross_entropy_with_logits(domain, domains))

    for method, loss_fn in (('source_only', source_only), ('dann', dann)):
      fn = torch.compile(loss_fn) if mode == 'compile' else loss_fn

      def step():
        optimizer.zero_grad(set_to_none=True)
        fn().backward()
        optimizer.step()

      try:
        for _ in range(3):
          step()
      except Exception as error:  # pylint: disable=broad-except
        emit('torch_compile_failed', 0, '', method=method,
             error=str(error)[:200])
        continue
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
          step()
        times.append((time.perf_counter() - start) / steps)
      seconds = float(np.median(times))
      if method not in results or seconds < results[method][0]:
        results[method] = (seconds, mode)
  for method, (seconds, mode) in results.items():
    common = dict(method=method, batch=BATCH, backbone='lenet', mode=mode,
                  framework='torch ' + torch.__version__, threads=threads)
    emit('adaptation_step_ms', 1000 * seconds, 'ms', **common)
    emit('adaptation_step_vs_source_only',
         seconds / results['source_only'][0], 'x', **common)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--skip_torch', action='store_true')
  args = parser.parse_args()
  tune_cpu()
  emit('machine', 0, '', cpu=platform.processor() or platform.machine(),
       devices=str(jax.devices()))
  bench_adaptation(args.steps, args.repeats)
  bench_distillation(args.steps, args.repeats)
  if not args.skip_torch:
    try:
      bench_torch(args.steps, args.repeats, args.threads)
    except ImportError:
      emit('torch_missing', 0, '')


if __name__ == '__main__':
  main()
