"""Micro-benchmark: `fewshot.ops` conv / max-pool vs the plain lax ops.

For the Conv-4 layer shapes of 28x28 inputs (28x28x1->64, then 14x14, 7x7
and 3x3 at 64->64), at batch 80 (5-way 1-shot 15-query) and 320 (20-way),
prints GFLOP/s of the forward pass, the weight gradient and the input
gradient for the plain `lax.conv_general_dilated` (JAX's own gradients) and
for `fewshot.ops.conv2d`, the 2x2 max-pool forward+backward time, and the
peak fp32 matmul GFLOP/s. One JSON line per figure; `value` is the median
over interleaved repetitions (so load from other processes hits both
implementations alike), `best` the fastest repetition.

  python benchmarks/conv_micro.py [--batches 80,320] [--tune_malloc 1]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fewshot.ops import conv2d, max_pool_2x2, tune_malloc

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


def _time_interleaved(fns: dict[str, Callable], args: tuple, repeats: int,
                      inner: int) -> dict[str, np.ndarray]:
  """Seconds per call of each jitted fn, `repeats` rounds, interleaved."""
  jitted = {k: jax.jit(f) for k, f in fns.items()}
  for f in jitted.values():
    for _ in range(2):
      jax.block_until_ready(f(*args))
  times = {k: [] for k in jitted}
  for _ in range(repeats):
    for k, f in jitted.items():
      t = time.perf_counter()
      for _ in range(inner):
        out = f(*args)
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t) / inner)
  return {k: np.array(v) for k, v in times.items()}


def _emit(**fields) -> None:
  print(json.dumps(fields), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', default='80,320')
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--tune_malloc', type=int, default=1)
  args = parser.parse_args()
  malloc = bool(args.tune_malloc) and tune_malloc()
  common = {'backend': jax.default_backend(), 'tune_malloc': malloc}
  rng = np.random.default_rng(0)

  n = 2048
  a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  t = _time_interleaved({'mm': lambda a: a @ a}, (a,), args.repeats, 2)['mm']
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
      fns = {}
      for impl, conv in (('plain', _plain_conv), ('fast', _fast_conv)):
        for kind, f in _variants(conv).items():
          fns[(impl, kind)] = f
      inner = max(1, int(2e8 // flops))
      times = _time_interleaved(fns, (x, w, g), args.repeats, inner)
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
        {'plain': pool_fb(lambda x: nn.max_pool(x, (2, 2), (2, 2), 'VALID')),
         'fast': pool_fb(max_pool_2x2)}, (x, g), args.repeats, 2)
    for impl, t in times.items():
      _emit(benchmark='max_pool_2x2_fwd_bwd', impl=impl,
            value=round(float(np.median(t)) * 1e3, 3),
            best=round(float(t.min()) * 1e3, 3), unit='ms', batch=batch,
            hw=28, channels=64, **common)


if __name__ == '__main__':
  main()
