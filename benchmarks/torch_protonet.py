"""PyTorch (CPU) reference: Conv-4 ProtoNet training and evaluation speed.

A straightforward PyTorch implementation to compare `fewshot`'s JAX step
against: Conv-4 (four [3x3 conv 64, BatchNorm (train mode), ReLU, 2x2
max-pool] blocks), squared-Euclidean prototypes, cross-entropy over the
queries, Adam. Random 28x28x1 episodes, so only speed is meaningful.

Prints one JSON line per figure. Needs torch (not a dependency of fewshot):
  pip install torch==2.13.0+cpu
  python benchmarks/torch_protonet.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.nn import functional as F

def conv4(in_channels: int = 1, filters: int = 64) -> nn.Module:
  """`[B, C, H, W] -> [B, filters * (H/16) * (W/16)]`."""
  blocks = []
  for i in range(4):
    blocks += [
        nn.Conv2d(in_channels if i == 0 else filters, filters, 3, padding=1),
        nn.BatchNorm2d(filters),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]
  return nn.Sequential(*blocks, nn.Flatten())


def protonet_logits(model: nn.Module, images: torch.Tensor, ways: int,
                    shots: int) -> torch.Tensor:
  """Support images first (class-major), then queries -> `[Q, ways]`."""
  feats = model(images)
  support, query = feats[:ways * shots], feats[ways * shots:]
  protos = support.reshape(ways, shots, -1).mean(dim=1)
  # Squared Euclidean distances via the expansion, as most ProtoNet code does.
  d2 = ((query[:, None, :] - protos[None, :, :]) ** 2).sum(dim=-1)
  return -d2


def time_calls(fn, warmup: int, reps: int, repeats: int) -> tuple[float, list]:
  """Median over `repeats` of calls/s, each measured over `reps` calls."""
  for _ in range(warmup):
    fn()
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(reps):
      fn()
    rates.append(reps / (time.perf_counter() - t))
  rates.sort()
  return rates[len(rates) // 2], rates


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--reps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--settings', default='5,1,15;20,1,15;60,5,5',
                      help='training settings, ways,shots,queries;...')
  args = parser.parse_args()
  settings = [tuple(map(int, s.split(','))) for s in args.settings.split(';')]
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  common = {'threads': args.threads, 'torch': torch.__version__}

  for ways, shots, queries in settings:
    model = conv4()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(ways * (shots + queries), 1, 28, 28)
    labels = torch.arange(ways).repeat_interleave(queries)

    def train_step():
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(protonet_logits(model, images, ways, shots),
                             labels)
      loss.backward()
      opt.step()

    rate, rates = time_calls(train_step, 3, args.reps, args.repeats)
    print(json.dumps({
        'benchmark': 'torch_protonet_train', 'value': round(rate, 2),
        'unit': 'episodes/s', 'ms_per_episode': round(1e3 / rate, 2),
        'min_ms': round(1e3 / max(rates), 2), 'ways': ways, 'shots': shots,
        'queries': queries, **common}), flush=True)

  ways, shots, queries = 5, 1, 15
  model = conv4()
  model.train()  # batch statistics, as in training (transductive eval)
  images = torch.randn(ways * (shots + queries), 1, 28, 28)

  def eval_step():
    with torch.no_grad():
      protonet_logits(model, images, ways, shots).argmax(dim=-1)

  rate, rates = time_calls(eval_step, 3, args.reps * 5, args.repeats)
  print(json.dumps({
      'benchmark': 'torch_protonet_eval', 'value': round(rate, 2),
      'unit': 'episodes/s', 'ms_per_episode': round(1e3 / rate, 2),
      'ways': ways, 'shots': shots, 'queries': queries, **common}),
        flush=True)

  n = 2048
  a, b = torch.randn(n, n), torch.randn(n, n)
  rate, _ = time_calls(lambda: torch.mm(a, b), 2, 5, args.repeats)
  print(json.dumps({
      'benchmark': 'torch_matmul_peak', 'value': round(2 * n ** 3 * rate / 1e9,
                                                       1),
      'unit': 'GFLOP/s', 'n': n, 'dtype': 'float32', **common}), flush=True)


if __name__ == '__main__':
  main()
