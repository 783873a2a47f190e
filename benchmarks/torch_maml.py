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

Variants, each a way a PyTorch user could write it:
  loop                   the above, channels-first (NCHW) tensors
  loop_channels_last     the same with channels-last images and kernels
  vmap                   `torch.func`: the tasks of the meta-batch vmapped,
                         inner gradients by `torch.func.grad` (second order
                         by composing it), one meta-gradient call; BatchNorm
                         from mean/var ops (`explicit_batch_norm`: under vmap
                         `F.batch_norm`'s second order is wrong)
  compile                `loop` with the forward pass `torch.compile`d
                         (AOTAutograd compiles its backward; double backward
                         through it is not supported, so second order reports
                         the error instead of a time)

Random episodes (5-way 1-shot 15-query, fixed tensors), so only speed and
memory are meaningful; `check` compares every variant's meta-loss and
meta-gradient with numbers given to it (benchmarks/maml.py gives JAX's). Each setting runs in a fresh process (the script
starts itself once per setting when several are asked for), so `peak_rss_mb`,
the increase of the process's peak RSS (VmHWM, or `ru_maxrss` without /proc;
see `peak_rss_mb()`) over its value just before the first meta-batch, is
that setting's alone.

Prints one JSON line per setting and variant. Needs torch (not a dependency
of fewshot):
  python benchmarks/torch_maml.py [--threads 2] [--steps 3] [--warmup 1]
      [--settings so,fo] [--inner_steps 1,5,10] [--variants loop,vmap]
With `--serve` it answers one JSON request per stdin line (benchmarks/
maml.py --torch drives it from each JAX setting's process, alternating):
  {"cmd": "variants"}               the variants' names
  {"cmd": "check", "npz": path}      meta-loss / gradient errors per variant
  {"cmd": "step", "variant": v, "setting": "so5"}   seconds of one meta-batch
  {"cmd": "rss"}                     this process's peak RSS so far (MiB)

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

import numpy as np
import torch
from torch.nn import functional as F

WAYS, SHOTS, QUERIES = 5, 1, 15
META_BATCH = 32
INNER_LEARNING_RATE = 0.4
OUTER_LEARNING_RATE = 1e-3
IMAGE_SIZE, CHANNELS, FILTERS, BLOCKS = 28, 1, 64, 4
SETTING_PATTERN = re.compile(r'^(so|fo)(\d+)?$')
VARIANTS = ('loop', 'loop_channels_last', 'vmap', 'compile')
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


def explicit_batch_norm(x: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
  """BatchNorm with the batch's statistics, from mean and variance ops.

  `F.batch_norm(training=True)` gives wrong second-order gradients under
  `torch.func.vmap` (torch 2.14.1: 2% off in float64 against the loop, in
  the conv and norm parameters; with BatchNorm replaced by an affine map the
  two agree to 1e-14), so the `vmap` variant normalises with this.
  """
  mean = x.mean(dim=(0, 2, 3), keepdim=True)
  var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
  return ((x - mean) * torch.rsqrt(var + eps) * scale[:, None, None]
          + shift[:, None, None])


def forward(params: list[torch.Tensor], images: torch.Tensor,
            explicit_norm: bool = False) -> torch.Tensor:
  """`images [B, 1, 28, 28]` -> logits `[B, WAYS]` with the given parameters."""
  x = images
  for block in range(BLOCKS):
    kernel, scale, shift = params[3 * block:3 * block + 3]
    x = F.conv2d(x, kernel, padding=1)
    if explicit_norm:
      x = explicit_batch_norm(x, scale, shift)
    else:
      x = F.batch_norm(x, None, None, scale, shift, training=True)
    x = F.relu(x)
    x = F.max_pool2d(x, 2)
  head_weight, head_bias = params[-2:]
  return F.linear(x.flatten(1), head_weight, head_bias)


def adapt(params: list[torch.Tensor], images: torch.Tensor,
          labels: torch.Tensor, inner_steps: int, first_order: bool,
          forward_fn=forward) -> list[torch.Tensor]:
  """Inner-loop SGD on the support set; differentiable unless first order."""
  fast = params
  for _ in range(inner_steps):
    loss = F.cross_entropy(forward_fn(fast, images), labels)
    grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
    fast = [p - INNER_LEARNING_RATE * g for p, g in zip(fast, grads)]
  return fast


def functional_task_loss(params, support, support_labels, query, query_labels,
                         inner_steps: int, first_order: bool) -> torch.Tensor:
  """One task's query loss after adaptation, in `torch.func` form."""
  support_loss = lambda p: F.cross_entropy(
      forward(p, support, explicit_norm=True), support_labels)
  fast = list(params)
  for _ in range(inner_steps):
    grads = torch.func.grad(support_loss)(fast)
    if first_order:
      grads = [g.detach() for g in grads]
    fast = [p - INNER_LEARNING_RATE * g for p, g in zip(fast, grads)]
  return F.cross_entropy(forward(fast, query, explicit_norm=True),
                         query_labels)


def adam(params) -> torch.optim.Optimizer:
  try:
    return torch.optim.Adam(params, lr=OUTER_LEARNING_RATE, fused=True)
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.Adam(params, lr=OUTER_LEARNING_RATE, foreach=True)


def random_meta_batch(num_tasks: int = META_BATCH, seed: int = 0):
  """`(support, support_labels, query, query_labels)`, images `[T,B,1,28,28]`."""
  generator = torch.Generator().manual_seed(seed)
  shape = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
  return (torch.rand(num_tasks, WAYS * SHOTS, *shape, generator=generator),
          torch.arange(WAYS).repeat_interleave(SHOTS),
          torch.rand(num_tasks, WAYS * QUERIES, *shape, generator=generator),
          torch.arange(WAYS).repeat_interleave(QUERIES))


class MetaLearner:
  """One variant's parameters, optimizer and meta-gradient for one setting."""

  def __init__(self, variant: str, setting: str,
               params: list[torch.Tensor] | None = None):
    if variant not in VARIANTS:
      raise ValueError(f'unknown variant {variant!r}; known: {VARIANTS}')
    match = SETTING_PATTERN.match(setting)
    if not match or not match.group(2):
      raise ValueError(f'setting {setting!r}: so or fo and the inner steps')
    self.variant = variant
    self.first_order = match.group(1) == 'fo'
    self.inner_steps = int(match.group(2))
    self.channels_last = variant == 'loop_channels_last'
    params = init_params() if params is None else params
    if self.channels_last:
      params = [p.detach().to(memory_format=torch.channels_last)
                .requires_grad_() if p.ndim == 4 else p for p in params]
    self.params = params
    self.forward = torch.compile(forward) if variant == 'compile' else forward
    self.optimizer = adam(self.params)

  def layout(self, batch):
    support, support_labels, query, query_labels = batch
    if self.channels_last:  # per task: channels_last is a 4-D format
      support = [x.contiguous(memory_format=torch.channels_last)
                 for x in support]
      query = [x.contiguous(memory_format=torch.channels_last) for x in query]
    return support, support_labels, query, query_labels

  def meta_gradient(self, batch) -> float:
    """Sets each parameter's `.grad` to the meta-gradient; the meta-loss."""
    support, support_labels, query, query_labels = batch
    num_tasks = len(support)
    if self.variant == 'vmap':
      def meta_loss(params):
        return torch.func.vmap(
            functional_task_loss, in_dims=(None, 0, None, 0, None, None, None))(
                params, support, support_labels, query, query_labels,
                self.inner_steps, self.first_order).mean()
      grads, loss = torch.func.grad_and_value(meta_loss)(
          tuple(p.detach() for p in self.params))
      for p, g in zip(self.params, grads):
        p.grad = g
      return float(loss)
    total = 0.0
    for task in range(num_tasks):
      fast = adapt(self.params, support[task], support_labels,
                   self.inner_steps, self.first_order, self.forward)
      query_loss = F.cross_entropy(self.forward(fast, query[task]),
                                   query_labels)
      (query_loss / num_tasks).backward()
      total += query_loss.item()
    return total / num_tasks

  def step(self, batch) -> float:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.meta_gradient(batch)
    self.optimizer.step()
    return loss


def params_from_jax(arrays: dict) -> list[torch.Tensor]:
  """`init_params`' list from `fewshot`'s Conv-4 + head layout (npz keys
  `conv<i>/kernel` HWIO, `norm<i>/scale|bias`, `head/kernel` [D, ways])."""
  params = []
  for block in range(BLOCKS):
    params += [torch.from_numpy(arrays[f'conv{block}/kernel']).permute(
        3, 2, 0, 1).contiguous(),
               torch.from_numpy(arrays[f'norm{block}/scale']),
               torch.from_numpy(arrays[f'norm{block}/bias'])]
  params += [torch.from_numpy(arrays['head/kernel']).T.contiguous(),
             torch.from_numpy(arrays['head/bias'])]
  return [p.clone().requires_grad_() for p in params]


def grads_to_jax_layout(params: list[torch.Tensor]) -> dict:
  grads = {}
  for block in range(BLOCKS):
    kernel, scale, shift = params[3 * block:3 * block + 3]
    grads[f'conv{block}/kernel'] = kernel.grad.permute(2, 3, 1, 0)
    grads[f'norm{block}/scale'] = scale.grad
    grads[f'norm{block}/bias'] = shift.grad
  grads['head/kernel'] = params[-2].grad.T
  grads['head/bias'] = params[-1].grad
  return grads


def check(npz_path: str) -> dict:
  """Every variant's meta-loss and meta-gradient against the stored ones.

  The npz holds the weights (`params_from_jax`' keys), `support` and
  `query` images `[T, B, H, W, C]`, `setting` ('so5'), the meta-`loss` and
  `grad/<key>`. Per variant: the relative loss error and the largest
  gradient error relative to that leaf's largest magnitude (or the error
  message where the variant cannot run the setting).
  """
  arrays = dict(np.load(npz_path))
  to_tasks = lambda x: torch.from_numpy(x).permute(0, 1, 4, 2, 3).contiguous()
  batch = (to_tasks(arrays['support']),
           torch.arange(WAYS).repeat_interleave(SHOTS),
           to_tasks(arrays['query']),
           torch.arange(WAYS).repeat_interleave(QUERIES))
  errors = {}
  for variant in VARIANTS:
    learner = MetaLearner(variant, str(arrays['setting']),
                          params_from_jax(arrays))
    try:
      loss = learner.meta_gradient(learner.layout(batch))
    except Exception as e:  # pylint: disable=broad-except
      errors[variant] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
      continue
    grads = grads_to_jax_layout(learner.params)
    errors[variant] = {
        'loss_error': abs(loss - float(arrays['loss'])) /
                      abs(float(arrays['loss'])),
        'gradient_error': max(
            float(np.abs(g.detach().numpy() - arrays[f'grad/{k}']).max() /
                  max(np.abs(arrays[f'grad/{k}']).max(), 1e-12))
            for k, g in grads.items())}
  return errors


class Server:
  """One warm `MetaLearner` per (variant, setting)."""

  def __init__(self):
    self.learners = {}
    self.batch = random_meta_batch()

  def step(self, variant: str, setting: str) -> float:
    key = (variant, setting)
    if key not in self.learners:
      learner = MetaLearner(variant, setting)
      batch = learner.layout(self.batch)
      learner.step(batch)  # compile (torch.compile) and warm up
      self.learners[key] = (learner, batch)
    learner, batch = self.learners[key]
    start = time.perf_counter()
    loss = learner.step(batch)
    seconds = time.perf_counter() - start
    if not math.isfinite(loss):
      raise FloatingPointError(f'{variant} {setting}: meta-loss {loss}')
    return seconds


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
      elif cmd == 'step':
        reply = {'seconds': server.step(**request)}
      elif cmd == 'rss':
        reply = {'peak_rss_mb': peak_rss_mb()}
      else:
        reply = {'error': f'unknown command {cmd!r}'}
    except Exception as e:  # pylint: disable=broad-except
      reply = {'error': f'{type(e).__name__}: {str(e)[:500]}'}
    print(json.dumps(reply), flush=True)


def run_setting(setting: str, variant: str, args: argparse.Namespace) -> None:
  order_code, inner_steps = SETTING_PATTERN.match(setting).groups()
  torch.manual_seed(0)
  learner = MetaLearner(variant, setting)
  batch = learner.layout(random_meta_batch())
  baseline_mb = peak_rss_mb()
  for _ in range(args.warmup):
    learner.step(batch)
  seconds = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = learner.step(batch)
    seconds.append(time.perf_counter() - start)
  if not math.isfinite(loss):
    print(f'warning: {setting}: non-finite meta-loss {loss}', file=sys.stderr)
  seconds.sort()
  median = seconds[len(seconds) // 2]
  peak_mb = peak_rss_mb()
  print(json.dumps({
      'benchmark': 'torch_maml_train', 'variant': variant,
      'value': round(META_BATCH / median, 3), 'unit': 'tasks/s',
      'inner_steps': int(inner_steps), 'order': ORDERS[order_code],
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
  parser.add_argument('--serve', action='store_true')
  parser.add_argument('--steps', type=int, default=3,
                      help='timed meta-batches per setting')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed meta-batches before timing')
  parser.add_argument('--settings', default='so,fo',
                      help="comma-separated: 'so'/'fo', optionally with the "
                      "inner steps appended ('so5')")
  parser.add_argument('--inner_steps', default='1,5,10',
                      help='inner steps for settings given without them')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  if args.serve:
    serve()
    return
  if args.steps < 1:
    parser.error('--steps must be >= 1.')
  inner_steps = [int(s) for s in args.inner_steps.split(',') if s]
  settings = expand_settings(args.settings, inner_steps)
  variants = [v for v in args.variants.split(',') if v]

  if len(settings) == 1 and len(variants) == 1:
    run_setting(settings[0], variants[0], args)
    return
  failed = []
  for setting in settings:  # a fresh process each: separate RSS high-water marks
    for variant in variants:
      command = [sys.executable, __file__, '--settings', setting,
                 '--variants', variant, '--threads', str(args.threads),
                 '--steps', str(args.steps), '--warmup', str(args.warmup)]
      result = subprocess.run(command, capture_output=True, text=True)
      for line in result.stdout.splitlines():
        if line.startswith('{'):
          print(line, flush=True)
      if result.returncode != 0:
        failed.append(f'{setting}/{variant}')
        print(f'{setting} {variant} failed (exit {result.returncode}):\n'
              f'{result.stderr[-2000:]}', file=sys.stderr, flush=True)
  if failed:
    sys.exit(f'Failed settings: {failed}')


if __name__ == '__main__':
  main()
