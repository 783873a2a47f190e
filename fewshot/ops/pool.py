"""2x2 / stride-2 max-pool with a gradient that is cheap on XLA:CPU.

JAX differentiates `lax.reduce_window` max through a variadic reduce-window
that carries four full-size int32 iota arrays (the argmax coordinates) plus
a scatter; on XLA:CPU that costs more than the convolutions of a Conv-4 step.
Here the window is a reshape to `[B, H/2, 2, W/2, 2, C]`, and the gradient
goes to the first maximum of each window (row-major), the same element
`select_and_scatter` picks, via elementwise compares that XLA fuses into one
loop. The backward is plain JAX (linear in the cotangent), so higher-order
gradients work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _windows(x: jax.Array) -> jax.Array:
  """`[B,H,W,C]` -> `[B,H//2,2,W//2,2,C]`, dropping an odd last row/column."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2, :]
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _first_max_mask(xw: jax.Array, y: jax.Array) -> list[jax.Array]:
  """One-hot (as bools) of the first window maximum, in order 00, 01, 10, 11."""
  yb = y[:, :, None, :, None, :]
  hit = xw == yb
  taken = jnp.zeros_like(y, dtype=bool)
  masks = []
  for i in range(2):
    for j in range(2):
      h = hit[:, :, i, :, j, :]
      masks.append(h & ~taken)
      taken = taken | h
  return masks


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, spatial: tuple[int, int]) -> jax.Array:
  del spatial  # (H, W) of `x`, static, for the backward pass
  return jnp.max(_windows(x), axis=(2, 4))


def _max_pool_fwd(x, spatial):
  del spatial
  xw = _windows(x)
  y = jnp.max(xw, axis=(2, 4))
  # The residual is which window element won (0..3, int8), computed here
  # from the same values that gave `y`. Comparing a saved `y` with `x` in
  # the backward pass is fragile: XLA may recompute `x` with a different
  # fusion (it did under SPMD sharding), so `x == y` missed ties.
  winner = jnp.zeros(y.shape, jnp.int8)
  for index, mask in enumerate(_first_max_mask(xw, y)):
    winner = jnp.where(mask, jnp.int8(index), winner)
  return y, winner


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
