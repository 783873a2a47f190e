"""Low-rank adaptation (Hu et al. 2021) of kernels of any rank.

A kernel `w` of shape `[..., out]` (flax Dense `[in, out]`, Conv
`[kh, kw, in, out]`, depthwise Conv `[kh, kw, 1, C]`) is read as a matrix
`[fan_in, out]` with `fan_in = prod(shape[:-1])` (row-major, as
`w.reshape(fan_in, out)`). Its update is `scale * a @ b` with factors
`a [fan_in, r]` and `b [r, out]`, reshaped back to `w.shape`; `b` starts at
zero, so the adapted kernel equals `w` at initialization.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Factors = dict[str, jax.Array]  # {'a': [fan_in, r], 'b': [r, out]}


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
  """`(fan_in, fan_out) = (prod(shape[:-1]), shape[-1])` of a kernel."""
  if len(shape) < 2:
    raise ValueError(f'LoRA needs a kernel with at least 2 dimensions '
                     f'[..., out], got shape {tuple(shape)}.')
  return math.prod(shape[:-1]), shape[-1]


def init_factors(key: jax.Array, kernel: jax.Array, rank: int) -> Factors:
  """Initial LoRA factors for `kernel [..., out]`.

  `a [fan_in, rank]` is uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`
  (PyTorch's default Linear init, i.e. kaiming-uniform with a = sqrt(5), as
  in the LoRA reference code); `b [rank, out]` is zeros. Both take the
  kernel's dtype.

  Args:
    key: a PRNG key.
    kernel: the frozen kernel (an array or `jax.ShapeDtypeStruct`).
    rank: the rank r, `1 <= r <= min(fan_in, out)`.

  Returns:
    `{'a': [fan_in, rank], 'b': [rank, out]}`.
  """
  fan_in, fan_out = fans(tuple(kernel.shape))
  if not 1 <= rank <= min(fan_in, fan_out):
    raise ValueError(f'LoRA rank must be in [1, {min(fan_in, fan_out)}] for '
                     f'a kernel of shape {tuple(kernel.shape)}, got {rank}.')
  bound = fan_in ** -0.5
  a = jax.random.uniform(key, (fan_in, rank), kernel.dtype, -bound, bound)
  return {'a': a, 'b': jnp.zeros((rank, fan_out), kernel.dtype)}


def delta(factors: Factors, shape: tuple[int, ...], scale: float) -> jax.Array:
  """The kernel update `scale * (a @ b)` reshaped to `shape [..., out]`,
  in the factors' dtype."""
  a, b = factors['a'], factors['b']
  return (scale * (a @ b)).reshape(shape)


def merge(kernel: jax.Array, factors: Factors, scale: float) -> jax.Array:
  """The adapted kernel `kernel + scale * (a @ b).reshape(kernel.shape)`.

  Computed in the kernel's dtype (the factors are cast to it first), so a
  bf16 model stays bf16.
  """
  cast = {name: factor.astype(kernel.dtype) for name, factor in factors.items()}
  return kernel + delta(cast, tuple(kernel.shape), scale).astype(kernel.dtype)


def num_parameters(shape: tuple[int, ...], rank: int) -> int:
  """`rank * (fan_in + fan_out)`: the LoRA parameters of a kernel."""
  fan_in, fan_out = fans(tuple(shape))
  return rank * (fan_in + fan_out)


__all__ = ['Factors', 'delta', 'fans', 'init_factors', 'merge',
           'num_parameters']
