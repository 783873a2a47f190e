"""2x2 / stride-2 max-pool with a gradient that is cheap on XLA:CPU.

JAX differentiates `lax.reduce_window` max through a variadic reduce-window
that carries four full-size int32 iota arrays (the argmax coordinates) plus
a scatter; on XLA:CPU that costs more than the convolutions of a Conv-4 step.
Here the four window elements are strided slices, the maximum and the index
of the first maximum of each window (row-major, the element
`select_and_scatter` picks) are elementwise ops that XLA computes in one
loop, and the gradient is routed by that index. The backward is plain JAX
(linear in the cotangent), so higher-order gradients work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _window_elements(x: jax.Array) -> list[jax.Array]:
  """The four elements of every 2x2 window, `[B,H//2,W//2,C]` each, in order
  00, 01, 10, 11 (row-major); an odd last row/column is dropped."""
  h2, w2 = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return [x[:, i:h2:2, j:w2:2, :] for i in range(2) for j in range(2)]


def _max_and_winner(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Window maxima and which element (0..3, int8) is the first maximum.

  Written as elementwise ops on four strided slices, so XLA computes both
  outputs in one loop over `x` (a reshape + reduce would be a second pass).
  The winner comes from pairwise strict comparisons, never from `x == max`:
  XLA may recompute `x` in two fusions with different rounding (it did
  under SPMD sharding, with an elementwise conv feeding the pool), and an
  equality test against the other fusion's maximum can then miss every
  element.
  """
  e00, e01, e10, e11 = _window_elements(x)
  top_row, bottom_row = jnp.maximum(e00, e01), jnp.maximum(e10, e11)
  top_index = jnp.where(e01 > e00, jnp.int8(1), jnp.int8(0))
  bottom_index = jnp.where(e11 > e10, jnp.int8(3), jnp.int8(2))
  winner = jnp.where(bottom_row > top_row, bottom_index, top_index)
  return jnp.maximum(top_row, bottom_row), winner


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, spatial: tuple[int, int]) -> jax.Array:
  del spatial  # (H, W) of `x`, static, for the backward pass
  return _max_and_winner(x)[0]  # XLA drops the unused winner


def _max_pool_fwd(x, spatial):
  del spatial
  # The residual is which window element won (see `_max_and_winner`).
  return _max_and_winner(x)


def _max_pool_bwd(spatial, winner, g):
  h, w = spatial
  b, c = g.shape[0], g.shape[-1]
  zero = jnp.zeros((), g.dtype)
  parts = [jnp.where(winner == index, g, zero) for index in range(4)]
  # [B,H2,W2,C] x 4 -> [B,H2,2,W2,2,C] -> [B,2*H2,2*W2,C].
  dx = jnp.stack([jnp.stack(parts[0:2], axis=3), jnp.stack(parts[2:4], axis=3)],
                 axis=2).reshape(b, h // 2 * 2, w // 2 * 2, c)
  if dx.shape[1:3] != (h, w):
    dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]),
                      (0, 0)))
  return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_2x2(images: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, `[B,H,W,C] -> [B,H//2,W//2,C]`.

  Matches `flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')`
  in value and gradient (ties: the first maximum in row-major order).
  """
  if images.ndim != 4:
    raise ValueError(f'max_pool_2x2 expects [B,H,W,C], got {images.shape}')
  if images.shape[1] < 2 or images.shape[2] < 2:
    raise ValueError(f'spatial size must be at least 2x2, got {images.shape}')
  return _max_pool(images, tuple(images.shape[1:3]))


def affine_relu_max_pool(images: jax.Array, multiplier: jax.Array,
                         offset: jax.Array) -> jax.Array:
  """`max_pool_2x2(relu(images * multiplier + offset))`, pooling first.

  The per-channel map `v -> relu(m * v + b)` is monotone in `v` (increasing
  for m >= 0, decreasing for m < 0), so it commutes with a max over the
  window once the sign of `m` is folded into the input:
  `max(relu(m*v + b)) = relu(|m| * max(sign(m) * v) + b)`. The affine map,
  ReLU and their gradients then run on the 4x smaller pooled tensor, and the
  full-size tensor is read once for the pool, never written: this is the
  BatchNorm + ReLU + pool of a Conv-4 block (a BatchNorm in any mode is a
  per-channel affine map once its statistics are known). The gradient goes
  to the first maximum of each window of `sign(m) * v`, which is the first
  maximum of `m * v + b` where `m != 0`. (At exactly `m == 0`, where the
  function has a kink in `m`, the gradient for `m` is the one-sided
  derivative `max(v)` rather than the plain order's first window element.)

  Args:
    images: `[B, H, W, C]`.
    multiplier: `[C]`, per-channel scale `m`.
    offset: `[C]`, per-channel shift `b`.

  Returns:
    `[B, H // 2, W // 2, C]`.
  """
  channels = images.shape[-1]
  if multiplier.shape != (channels,) or offset.shape != (channels,):
    raise ValueError(f'multiplier {multiplier.shape} and offset {offset.shape} '
                     f'must be [C] = [{channels}] for images {images.shape}')
  sign = jax.lax.stop_gradient(
      jnp.where(multiplier < 0, -1.0, 1.0).astype(images.dtype))
  per_channel = lambda v: v.reshape(1, 1, 1, channels)
  pooled = max_pool_2x2(images * per_channel(sign))
  return jax.nn.relu(pooled * per_channel(multiplier * sign) +
                     per_channel(offset))
