"""PyTorch (CPU) peer: Conv-4 ProtoNet training and evaluation, every variant.

The same computation as `fewshot`'s step (benchmarks/protonet.py): Conv-4
(four [3x3 conv 64 without bias, BatchNorm in training mode, ReLU, 2x2
max-pool] blocks), the support and the query images embedded by two calls
(two BatchNorm batches, as `fewshot.algorithms.protonet`), squared-Euclidean
prototypes, cross-entropy over the queries, Adam. Each variant a PyTorch
user could pick is timed:

  eager                 channels-first (NCHW) tensors, eager autograd
  channels_last         `model.to(memory_format=torch.channels_last)` and
                        channels-last inputs
  compile               `torch.compile` of the loss (forward and, through
                        AOTAutograd, backward), channels-first
  compile_channels_last both
  <any>_one_batch       the same, with support and query embedded as one
                        batch of ways * (shots + queries) images (one
                        BatchNorm batch, as most PyTorch ProtoNet code does:
                        the same FLOPs, slightly different statistics)

Adam is `fused=True` where this torch has it on CPU, else `foreach`.
Random 28x28x1 episodes, so only speed is meaningful; `check` compares the
loss and gradients of every variant with numbers given to it.

Standalone it prints one JSON line per variant and figure and the fastest:
  python benchmarks/torch_protonet.py [--threads 2] [--variants eager,compile]
With `--serve` it answers one JSON request per stdin line (benchmarks/
protonet.py --torch drives it, alternating with JAX in one sitting):
  {"cmd": "variants"}               the variants' names
  {"cmd": "check", "npz": path}    loss/gradient errors of every variant
  {"cmd": "train", "variant": v, "ways": w, "shots": s, "queries": q,
   "steps": n}                     seconds per step over n steps
  {"cmd": "eval", "variant": v, "episodes": n}   seconds per 5w1s15q episode
  {"cmd": "matmul"}                fp32 2048^2 matmul GFLOP/s
Needs torch (not a dependency of fewshot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

BASE_VARIANTS = ('eager', 'channels_last', 'compile', 'compile_channels_last')
VARIANTS = BASE_VARIANTS + tuple(f'{v}_one_batch' for v in BASE_VARIANTS)
IMAGE_SIZE = 28


def conv4(in_channels: int = 1, filters: int = 64) -> nn.Module:
  """`[B, C, H, W] -> [B, filters * (H/16) * (W/16)]`."""
  blocks = []
  for i in range(4):
    blocks += [
        nn.Conv2d(in_channels if i == 0 else filters, filters, 3, padding=1,
                  bias=False),
        nn.BatchNorm2d(filters),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]
  return nn.Sequential(*blocks, nn.Flatten())


def protonet_loss(model: nn.Module, support: torch.Tensor,
                  query: torch.Tensor, query_labels: torch.Tensor,
                  ways: int) -> torch.Tensor:
  """Support images class-major (`[ways * shots, C, H, W]`), then the loss."""
  return _loss_from_features(model(support), model(query), query_labels, ways)


def protonet_loss_one_batch(model: nn.Module, support: torch.Tensor,
                            query: torch.Tensor, query_labels: torch.Tensor,
                            ways: int) -> torch.Tensor:
  """`protonet_loss` with support and query through the model as one batch."""
  features = model(torch.cat([support, query]))
  return _loss_from_features(features[:support.shape[0]],
                             features[support.shape[0]:], query_labels, ways)


def _loss_from_features(support_features, query_features, query_labels,
                        ways):
  prototypes = support_features.reshape(ways, -1,
                                        support_features.shape[-1]).mean(1)
  distances = ((query_features[:, None, :] - prototypes[None]) ** 2).sum(-1)
  return F.cross_entropy(-distances, query_labels)


def adam(params) -> torch.optim.Optimizer:
  try:
    return torch.optim.Adam(params, lr=1e-3, fused=True)
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.Adam(params, lr=1e-3, foreach=True)


class Variant:
  """One implementation choice: the model, its inputs' layout, the loss."""

  def __init__(self, name: str):
    if name not in VARIANTS:
      raise ValueError(f'unknown variant {name!r}; known: {VARIANTS}')
    self.name = name
    self.one_batch = name.endswith('_one_batch')
    base = name[:-len('_one_batch')] if self.one_batch else name
    self.channels_last = base.endswith('channels_last')
    loss = protonet_loss_one_batch if self.one_batch else protonet_loss
    self.loss = torch.compile(loss) if base.startswith('compile') else loss
    self.model = conv4()
    if self.channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    self.model.train()
    self.optimizer = adam(self.model.parameters())

  def layout(self, images: torch.Tensor) -> torch.Tensor:
    if self.channels_last:
      return images.contiguous(memory_format=torch.channels_last)
    return images.contiguous()

  def episode(self, ways: int, shots: int, queries: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    support = torch.rand(ways * shots, *shape, generator=generator)
    query = torch.rand(ways * queries, *shape, generator=generator)
    labels = torch.arange(ways).repeat_interleave(queries)
    return self.layout(support), self.layout(query), labels

  def train_step(self, support, query, labels, ways) -> None:
    self.optimizer.zero_grad(set_to_none=True)
    self.loss(self.model, support, query, labels, ways).backward()
    self.optimizer.step()


def load_jax_weights(model: nn.Module, arrays: dict) -> None:
  """Conv-4 weights from `fewshot`'s layout (HWIO kernels, `norm<i>`)."""
  convs = [m for m in model if isinstance(m, nn.Conv2d)]
  norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for i, (conv, norm) in enumerate(zip(convs, norms)):
      kernel = torch.from_numpy(arrays[f'conv{i}/kernel'])
      conv.weight.copy_(kernel.permute(3, 2, 0, 1))
      norm.weight.copy_(torch.from_numpy(arrays[f'norm{i}/scale']))
      norm.bias.copy_(torch.from_numpy(arrays[f'norm{i}/bias']))


def check(npz_path: str) -> dict:
  """Every variant's loss and gradients against the stored JAX ones.

  The npz holds `fewshot`'s weights (`conv<i>/kernel`, `norm<i>/scale|bias`),
  NHWC float images `support`, `query`, `query_labels`, `ways`, and the JAX
  `loss` and gradients (`grad/<name>`); `one_batch/loss` and
  `one_batch/grad/<name>` for the one-batch form. Returns, per variant, the relative
  loss error and the largest gradient error relative to that leaf's largest
  magnitude.
  """
  arrays = dict(np.load(npz_path))
  to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  errors = {}
  for name in VARIANTS:
    variant = Variant(name)
    load_jax_weights(variant.model, arrays)
    loss = variant.loss(variant.model, variant.layout(to_nchw(arrays['support'])),
                        variant.layout(to_nchw(arrays['query'])),
                        torch.from_numpy(arrays['query_labels']).long(),
                        int(arrays['ways']))
    loss.backward()
    convs = [m for m in variant.model if isinstance(m, nn.Conv2d)]
    norms = [m for m in variant.model if isinstance(m, nn.BatchNorm2d)]
    grads = {}
    for i, (conv, norm) in enumerate(zip(convs, norms)):
      grads[f'conv{i}/kernel'] = conv.weight.grad.permute(2, 3, 1, 0)
      grads[f'norm{i}/scale'] = norm.weight.grad
      grads[f'norm{i}/bias'] = norm.bias.grad
    prefix = 'one_batch/' if variant.one_batch else ''
    reference = lambda k: arrays[f'{prefix}grad/{k}']
    gradient_error = max(
        float(np.abs(g.numpy() - reference(k)).max() /
              max(np.abs(reference(k)).max(), 1e-12))
        for k, g in grads.items())
    errors[name] = {
        'loss_error': abs(float(loss) - float(arrays[f'{prefix}loss'])) /
                      abs(float(arrays[f'{prefix}loss'])),
        'gradient_error': gradient_error}
  return errors


class Server:
  """Keeps one `Variant` per (variant, setting), compiled once, warm."""

  def __init__(self):
    self.trainers = {}
    self.evaluators = {}

  def train(self, variant: str, ways: int, shots: int, queries: int,
            steps: int) -> float:
    key = (variant, ways, shots, queries)
    if key not in self.trainers:
      trainer = Variant(variant)
      batch = trainer.episode(ways, shots, queries)
      for _ in range(3):  # compile (torch.compile) and warm up
        trainer.train_step(*batch, ways)
      self.trainers[key] = (trainer, batch)
    trainer, batch = self.trainers[key]
    start = time.perf_counter()
    for _ in range(steps):
      trainer.train_step(*batch, ways)
    return (time.perf_counter() - start) / steps

  def eval(self, variant: str, episodes: int) -> float:
    ways, shots, queries = 5, 1, 15
    if variant not in self.evaluators:
      evaluator = Variant(variant)  # batch statistics, as the JAX figure
      batch = evaluator.episode(ways, shots, queries)
      self.evaluators[variant] = (evaluator, batch)
      self._eval(evaluator, batch, 3)
    evaluator, batch = self.evaluators[variant]
    start = time.perf_counter()
    self._eval(evaluator, batch, episodes)
    return (time.perf_counter() - start) / episodes

  @staticmethod
  def _eval(evaluator: Variant, batch, episodes: int) -> None:
    support, query, labels = batch
    with torch.no_grad():
      for _ in range(episodes):
        evaluator.loss(evaluator.model, support, query, labels, 5)


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
  a, b = torch.randn(size, size), torch.randn(size, size)
  torch.mm(a, b)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / float(np.median(times)) / 1e9


def serve() -> None:
  server = Server()
  for line in sys.stdin:
    request = json.loads(line)
    cmd = request.pop('cmd')
    if cmd == 'quit':
      break
    try:
      if cmd == 'variants':
        reply = {'variants': list(VARIANTS)}
      elif cmd == 'check':
        reply = {'errors': check(request['npz'])}
      elif cmd == 'train':
        reply = {'seconds': server.train(**request)}
      elif cmd == 'eval':
        reply = {'seconds': server.eval(**request)}
      elif cmd == 'matmul':
        reply = {'gflops': matmul_gflops()}
      else:
        reply = {'error': f'unknown command {cmd!r}'}
    except Exception as e:  # pylint: disable=broad-except
      reply = {'error': f'{type(e).__name__}: {e}'}
    print(json.dumps(reply), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--serve', action='store_true')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--settings', default='5,1,15;20,1,15;60,5,5',
                      help='training settings, ways,shots,queries;...')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  if args.serve:
    serve()
    return
  common = {'threads': args.threads, 'torch': torch.__version__}
  server = Server()
  variants = args.variants.split(',')
  for setting in args.settings.split(';'):
    ways, shots, queries = map(int, setting.split(','))
    best = None
    for variant in variants:
      seconds = float(np.median([
          server.train(variant, ways, shots, queries, args.steps)
          for _ in range(args.repeats)]))
      best = min(best or (seconds, variant), (seconds, variant))
      print(json.dumps({
          'benchmark': 'torch_protonet_train', 'variant': variant,
          'value': round(1 / seconds, 2), 'unit': 'episodes/s',
          'ms_per_episode': round(1e3 * seconds, 2), 'ways': ways,
          'shots': shots, 'queries': queries, **common}), flush=True)
    print(json.dumps({
        'benchmark': 'torch_protonet_train_fastest', 'variant': best[1],
        'value': round(1 / best[0], 2), 'unit': 'episodes/s', 'ways': ways,
        'shots': shots, 'queries': queries, **common}), flush=True)
  for variant in variants:
    seconds = float(np.median([server.eval(variant, 5 * args.steps)
                               for _ in range(args.repeats)]))
    print(json.dumps({
        'benchmark': 'torch_protonet_eval', 'variant': variant,
        'value': round(1 / seconds, 2), 'unit': 'episodes/s', 'ways': 5,
        'shots': 1, 'queries': 15, **common}), flush=True)
  print(json.dumps({'benchmark': 'torch_matmul_peak',
                    'value': round(matmul_gflops(), 1), 'unit': 'GFLOP/s',
                    'n': 2048, 'dtype': 'float32', **common}), flush=True)


if __name__ == '__main__':
  main()
