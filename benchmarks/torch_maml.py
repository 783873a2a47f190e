"""PyTorch (CPU) reference: Conv-4 MAML meta-training speed and peak memory.

A straightforward PyTorch MAML, written the way a user would write it, to
compare `fewshot`'s JAX step (benchmarks/maml.py) against:

* Conv-4: four [3x3 conv 64 (no bias, as BatchNorm follows; like fewshot's
  Conv-4 with norm='batch'), BatchNorm with the batch's statistics
  (transductive, no running averages), ReLU, 2x2 max-pool] blocks and a
  linear head, on 28x28x1 images;
* a functional forward pass over an explicit parameter list (F.conv2d,
  F.batch_norm(training=True), F.linear), so adapted parameters are plain
  tensors;
* the inner loop is plain SGD with
  `torch.autograd.grad(loss, params, create_graph=not first_order)`; the
  outer loop visits the tasks of a meta-batch one after the other,
  back-propagates each task's query loss / meta_batch (freeing its graph
  before the next task) and takes one Adam(1e-3) step per meta-batch.

Random episodes (5-way 1-shot 15-query, fixed tensors), so only speed and
memory are meaningful. Each setting runs in a fresh process (the script
starts itself once per setting when several are asked for), so `peak_rss_mb`,
the increase of the process's peak RSS (VmHWM, or `ru_maxrss` without /proc;
see `peak_rss_mb()`) over its value just before the first meta-batch, is
that setting's alone.

Prints one JSON line per setting. Needs torch (not a dependency of fewshot):
  pip install torch==2.13.0+cpu
  python benchmarks/torch_maml.py [--threads 2] [--steps 3] [--warmup 1]
      [--settings so,fo] [--inner_steps 1,5,10]

Settings: 'so' (second order) or 'fo' (first order), optionally with the
number of inner steps appended ('so5'); a bare 'so'/'fo' runs every
`--inner_steps` value.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

WAYS, SHOTS, QUERIES = 5, 1, 15
META_BATCH = 32
INNER_LEARNING_RATE = 0.4
OUTER_LEARNING_RATE = 1e-3
IMAGE_SIZE, CHANNELS, FILTERS, BLOCKS = 28, 1, 64, 4
SETTING_PATTERN = re.compile(r'^(so|fo)(\d+)?$')
ORDERS = {'so': 'second', 'fo': 'first'}


def expand_settings(settings: str, inner_steps: list[int]) -> list[str]:
  """'so,fo5' with inner steps [1, 5] -> ['so1', 'so5', 'fo5']."""
  expanded = []
  for token in filter(None, (t.strip() for t in settings.split(','))):
    match = SETTING_PATTERN.match(token)
    if not match:
      raise ValueError(f'Unknown setting {token!r}: so or fo, optionally '
                       'followed by the inner steps (so5).')
    order_code, steps = match.groups()
    for count in ([int(steps)] if steps else inner_steps):
      expanded.append(f'{order_code}{count}')
  return expanded


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


def init_params() -> list[torch.Tensor]:
  """Conv-4 + linear head parameters: per block [kernel, bn scale, bn shift]."""
  params = []
  in_channels = CHANNELS
  for _ in range(BLOCKS):
    kernel = torch.empty(FILTERS, in_channels, 3, 3)
    torch.nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))  # nn.Conv2d's init
    params += [kernel, torch.ones(FILTERS), torch.zeros(FILTERS)]
    in_channels = FILTERS
  feature_dim = FILTERS * (IMAGE_SIZE // 2 ** BLOCKS) ** 2
  bound = 1 / math.sqrt(feature_dim)
  params += [torch.empty(WAYS, feature_dim).uniform_(-bound, bound),
             torch.empty(WAYS).uniform_(-bound, bound)]
  return [p.requires_grad_() for p in params]


def forward(params: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
  """`images [B, 1, 28, 28]` -> logits `[B, WAYS]` with the given parameters."""
  x = images
  for block in range(BLOCKS):
    kernel, scale, shift = params[3 * block:3 * block + 3]
    x = F.conv2d(x, kernel, padding=1)
    x = F.batch_norm(x, None, None, scale, shift, training=True)
    x = F.relu(x)
    x = F.max_pool2d(x, 2)
  head_weight, head_bias = params[-2:]
  return F.linear(x.flatten(1), head_weight, head_bias)


def adapt(params: list[torch.Tensor], images: torch.Tensor,
          labels: torch.Tensor, inner_steps: int,
          first_order: bool) -> list[torch.Tensor]:
  """Inner-loop SGD on the support set; differentiable unless first order."""
  fast = params
  for _ in range(inner_steps):
    loss = F.cross_entropy(forward(fast, images), labels)
    grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
    fast = [p - INNER_LEARNING_RATE * g for p, g in zip(fast, grads)]
  return fast


def run_setting(setting: str, args: argparse.Namespace) -> None:
  order_code, inner_steps = SETTING_PATTERN.match(setting).groups()
  inner_steps = int(inner_steps)
  first_order = order_code == 'fo'
  torch.manual_seed(0)
  params = init_params()
  optimizer = torch.optim.Adam(params, lr=OUTER_LEARNING_RATE)
  support_images = torch.rand(META_BATCH, WAYS * SHOTS, CHANNELS, IMAGE_SIZE,
                              IMAGE_SIZE)
  query_images = torch.rand(META_BATCH, WAYS * QUERIES, CHANNELS, IMAGE_SIZE,
                            IMAGE_SIZE)
  support_labels = torch.arange(WAYS).repeat_interleave(SHOTS)
  query_labels = torch.arange(WAYS).repeat_interleave(QUERIES)

  def meta_step() -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for task in range(META_BATCH):
      fast = adapt(params, support_images[task], support_labels, inner_steps,
                   first_order)
      query_loss = F.cross_entropy(forward(fast, query_images[task]),
                                   query_labels)
      (query_loss / META_BATCH).backward()
      total += query_loss.item()
    optimizer.step()
    return total / META_BATCH

  baseline_mb = peak_rss_mb()
  for _ in range(args.warmup):
    meta_step()
  seconds = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = meta_step()
    seconds.append(time.perf_counter() - start)
  if not math.isfinite(loss):
    print(f'warning: {setting}: non-finite meta-loss {loss}', file=sys.stderr)
  seconds.sort()
  median = seconds[len(seconds) // 2]
  peak_mb = peak_rss_mb()
  print(json.dumps({
      'benchmark': 'torch_maml_train',
      'value': round(META_BATCH / median, 3), 'unit': 'tasks/s',
      'inner_steps': inner_steps, 'order': ORDERS[order_code],
      'meta_batch': META_BATCH, 'threads': args.threads,
      'ms_per_meta_batch': round(1e3 * median, 1),
      'min_ms_per_meta_batch': round(1e3 * seconds[0], 1),
      'peak_rss_mb': round(peak_mb - baseline_mb, 1),
      'baseline_rss_mb': round(baseline_mb, 1),
      'ways': WAYS, 'shots': SHOTS, 'queries': QUERIES,
      'inner_learning_rate': INNER_LEARNING_RATE, 'steps': args.steps,
      'torch': torch.__version__}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3,
                      help='timed meta-batches per setting')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed meta-batches before timing')
  parser.add_argument('--settings', default='so,fo',
                      help="comma-separated: 'so'/'fo', optionally with the "
                      "inner steps appended ('so5')")
  parser.add_argument('--inner_steps', default='1,5,10',
                      help='inner steps for settings given without them')
  args = parser.parse_args()
  if args.steps < 1:
    parser.error('--steps must be >= 1.')
  inner_steps = [int(s) for s in args.inner_steps.split(',') if s]
  settings = expand_settings(args.settings, inner_steps)
  torch.set_num_threads(args.threads)

  if len(settings) == 1:
    run_setting(settings[0], args)
    return
  failed = []
  for setting in settings:  # a fresh process each: separate RSS high-water marks
    command = [sys.executable, __file__, '--settings', setting,
               '--threads', str(args.threads), '--steps', str(args.steps),
               '--warmup', str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
      if line.startswith('{'):
        print(line, flush=True)
    if result.returncode != 0:
      failed.append(setting)
      print(f'{setting} failed (exit {result.returncode}):\n'
            f'{result.stderr[-2000:]}', file=sys.stderr, flush=True)
  if failed:
    sys.exit(f'Failed settings: {failed}')


if __name__ == '__main__':
  main()
