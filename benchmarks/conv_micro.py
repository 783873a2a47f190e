"""Micro-benchmark: `fewshot.ops` conv / max-pool vs the plain lax ops.

For the Conv-4 layer shapes of 28x28 inputs (28x28x1->64, then 14x14, 7x7
and 3x3 at 64->64), at batch 80 (5-way 1-shot 15-query) and 320 (20-way),
prints GFLOP/s of the forward pass, the weight gradient and the input
gradient for the plain `lax.conv_general_dilated` (JAX's own gradients) and
for `fewshot.ops.conv2d`, the 2x2 max-pool forward+backward time, and the
peak fp32 matmul GFLOP/s. With `--torch`, PyTorch's channels-last
convolution (the op its eager and compiled Conv-4 steps call, forward and
`aten.convolution_backward` for each gradient) on the same shapes, in the
same rounds. One JSON line per figure; `value` is the median over
interleaved repetitions (so load from other processes hits every
implementation alike), `best` the fastest repetition.

  python benchmarks/conv_micro.py [--batches 80,320] [--tune_malloc 1]
      [--torch] [--torch_threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fewshot.ops import conv2d, max_pool_2x2, tune_malloc, tune_xla_cpu

# (H=W, in channels, out channels) of the four Conv-4 convs at 28x28.
LAYERS = ((28, 1, 64), (14, 64, 64), (7, 64, 64), (3, 64, 64))


def _plain_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _fast_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return conv2d(x, w, impl='cpu')


def _variants(conv: Callable) -> dict[str, Callable]:
  """forward / weight-grad / input-grad functions of `conv`."""
  def wgrad(x, w, g):
    return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

  def igrad(x, w, g):
    return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

  return {'forward': lambda x, w, g: conv(x, w), 'weight_grad': wgrad,
          'input_grad': igrad}


def _jax_runner(f: Callable, args: tuple) -> Callable[[], object]:
  """A synchronous call of jitted `f` on `args`."""
  jitted = jax.jit(f)
  return lambda: jax.block_until_ready(jitted(*args))


def _torch_runners(x: np.ndarray, w: np.ndarray,
                   g: np.ndarray) -> dict[str, Callable[[], object]]:
  """PyTorch channels-last forward / weight-grad / input-grad (NHWC, HWIO)."""
  import torch  # pylint: disable=import-outside-toplevel
  to = lambda a, perm: torch.from_numpy(np.array(
      a.transpose(perm), order='C')).contiguous(
          memory_format=torch.channels_last)
  tx, tg = to(x, (0, 3, 1, 2)), to(g, (0, 3, 1, 2))
  tw = to(w, (3, 2, 0, 1))
  conv = torch.ops.aten.convolution_backward

  def backward(mask):
    return lambda: conv(tg, tx, tw, None, [1, 1], [1, 1], [1, 1], False,
                        [0, 0], 1, mask)

  forward = lambda: torch.nn.functional.conv2d(tx, tw, padding=1)
  reference = np.asarray(_plain_conv(x, w))
  with torch.no_grad():
    error = np.abs(forward().permute(0, 2, 3, 1).numpy() - reference).max()
  if error > 1e-4 * np.abs(reference).max():
    raise SystemExit(f'PyTorch conv differs from lax by {error}')
  return {'forward': forward, 'weight_grad': backward([False, True, False]),
          'input_grad': backward([True, False, False])}


def _time_interleaved(runners: dict[str, Callable[[], object]], repeats: int,
                      inner: int) -> dict[str, np.ndarray]:
  """Seconds per call of each synchronous runner, `repeats` rounds, in turn."""
  for run in runners.values():
    for _ in range(2):
      run()
  times = {k: [] for k in runners}
  for _ in range(repeats):
    for k, run in runners.items():
      t = time.perf_counter()
      for _ in range(inner):
        run()
      times[k].append((time.perf_counter() - t) / inner)
  return {k: np.array(v) for k, v in times.items()}


def _emit(**fields) -> None:
  print(json.dumps(fields), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', default='80,320')
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--tune_malloc', type=int, default=1)
  parser.add_argument('--torch', action='store_true',
                      help="also PyTorch's channels-last convolution")
  parser.add_argument('--torch_threads', type=int, default=2)
  args = parser.parse_args()
  if args.torch:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.torch_threads)
  malloc = bool(args.tune_malloc) and tune_malloc()
  tune_xla_cpu()  # before any JAX computation (acts on $FEWSHOT_TUNE_XLA_CPU=1)
  common = {'backend': jax.default_backend(), 'tune_malloc': malloc,
            'xla_flags': os.environ.get('XLA_FLAGS', '')}
  rng = np.random.default_rng(0)

  n = 2048
  a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  t = _time_interleaved({'mm': _jax_runner(lambda a: a @ a, (a,))},
                        args.repeats, 2)['mm']
  _emit(benchmark='jax_matmul_peak', value=round(2 * n**3 / np.median(t) / 1e9,
                                                 1),
        best=round(2 * n**3 / t.min() / 1e9, 1), unit='GFLOP/s', n=n,
        dtype='float32', **common)

  for batch in map(int, args.batches.split(',')):
    for size, cin, cout in LAYERS:
      x = jnp.asarray(rng.standard_normal((batch, size, size, cin)),
                      jnp.float32)
      w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1,
                      jnp.float32)
      g = jnp.asarray(rng.standard_normal((batch, size, size, cout)),
                      jnp.float32)
      flops = 2 * batch * size * size * 9 * cin * cout
      runners = {}
      for impl, conv in (('plain', _plain_conv), ('fast', _fast_conv)):
        for kind, f in _variants(conv).items():
          runners[(impl, kind)] = _jax_runner(f, (x, w, g))
      if args.torch:
        for kind, run in _torch_runners(*map(np.asarray, (x, w, g))).items():
          runners[('torch_channels_last', kind)] = run
      inner = max(1, int(2e8 // flops))
      times = _time_interleaved(runners, args.repeats, inner)
      for (impl, kind), t in times.items():
        _emit(benchmark=f'conv_{kind}', impl=impl,
              value=round(flops / np.median(t) / 1e9, 1),
              best=round(flops / t.min() / 1e9, 1), unit='GFLOP/s',
              ms=round(float(np.median(t)) * 1e3, 3), batch=batch, hw=size,
              cin=cin, cout=cout, **common)

    # Max-pool forward + backward at the first block's output size.
    x = jnp.asarray(rng.standard_normal((batch, 28, 28, 64)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, 14, 14, 64)), jnp.float32)

    def pool_fb(pool):
      return lambda x, g: jax.vjp(pool, x)[1](g)[0]

    times = _time_interleaved(
        {'plain': _jax_runner(pool_fb(
            lambda x: nn.max_pool(x, (2, 2), (2, 2), 'VALID')), (x, g)),
         'fast': _jax_runner(pool_fb(max_pool_2x2), (x, g))}, args.repeats, 2)
    for impl, t in times.items():
      _emit(benchmark='max_pool_2x2_fwd_bwd', impl=impl,
            value=round(float(np.median(t)) * 1e3, 3),
            best=round(float(t.min()) * 1e3, 3), unit='ms', batch=batch,
            hw=28, channels=64, **common)


if __name__ == '__main__':
  main()
