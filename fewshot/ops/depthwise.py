"""Depthwise 2-D convolution that is fast on XLA:CPU.

XLA:CPU runs a depthwise convolution (`feature_group_count` = channels) as
a generic grouped convolution, far below what the arithmetic needs: measured
on this project's 2-core machine, 64 images of 32x32x144 with a 3x3 kernel
took 319 ms forward, against 21 ms as a sum of the k*k shifted input slices
times the per-channel weights, which XLA fuses into one elementwise loop
(6-28x across EfficientNet-Lite0's layers). The gradients are written out
the same way (`custom_vjp`):

* input gradient: the output gradient, dilated by the stride, correlated
  with the flipped kernel (again a sum of shifted slices);
* weight gradient: for each of the k*k taps, the sum over images and
  positions of the shifted input times the output gradient.

The rules are ordinary JAX, so higher-order gradients, `jit` and `vmap`
work. On other backends `depthwise_conv2d` is `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fewshot.ops.conv import IMPLS, _use_fast_path

_Pads = tuple[tuple[int, int], tuple[int, int]]


def _xla(x: jax.Array, w: jax.Array, strides: int, pads: _Pads) -> jax.Array:
  return lax.conv_general_dilated(
      x, w, (strides, strides), pads, dimension_numbers=('NHWC', 'HWIO',
                                                         'NHWC'),
      feature_group_count=x.shape[-1])


def _out_size(size: int, k: int, strides: int, pads: tuple[int, int]) -> int:
  return (size + pads[0] + pads[1] - k) // strides + 1


def _tap(xp: jax.Array, i: int, j: int, strides: int, out_hw) -> jax.Array:
  """`xp[:, i::s, j::s, :][:, :Ho, :Wo]`: the inputs tap (i, j) meets."""
  ho, wo = out_hw
  return lax.slice(xp, (0, i, j, 0),
                   (xp.shape[0], i + (ho - 1) * strides + 1,
                    j + (wo - 1) * strides + 1, xp.shape[3]),
                   (1, strides, strides, 1))


def _shift_sum(xp: jax.Array, w: jax.Array, strides: int, out_hw) -> jax.Array:
  """`sum_ij _tap(xp, i, j) * w[i, j, 0]` over the k*k taps."""
  kh, kw = w.shape[:2]
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(xp, i, j, strides, out_hw) * w[i, j, 0].reshape(1, 1, 1, -1)
      out = term if out is None else out + term
  return out


def _pad(x: jax.Array, pads: _Pads) -> jax.Array:
  return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, w: jax.Array, strides: int,
               pads: _Pads) -> jax.Array:
  kh, kw = w.shape[:2]
  out_hw = (_out_size(x.shape[1], kh, strides, pads[0]),
            _out_size(x.shape[2], kw, strides, pads[1]))
  return _shift_sum(_pad(x, pads), w, strides, out_hw)


def _depthwise_fwd(x, w, strides, pads):
  return _depthwise(x, w, strides, pads), (x, w)


def _depthwise_bwd(strides, pads, res, g):
  x, w = res
  kh, kw = w.shape[:2]
  # Materialise the operands once: otherwise XLA fuses whatever elementwise
  # work produced `g` (the BatchNorm and activation backward) into each of
  # the k*k tap reductions below and recomputes it k*k times.
  x, g = lax.optimization_barrier((x, g))
  xp = _pad(x, pads)
  ho, wo = g.shape[1:3]
  # Input gradient: scatter each output's gradient back to its k*k inputs,
  # i.e. correlate the stride-dilated gradient with the flipped kernel.
  dilated = lax.pad(g, jnp.zeros((), g.dtype),
                    ((0, 0, 0), (kh - 1, kh - 1, strides - 1),
                     (kw - 1, kw - 1, strides - 1), (0, 0, 0)))
  covered = ((ho - 1) * strides + kh, (wo - 1) * strides + kw)
  dxp = _shift_sum(dilated, w[::-1, ::-1], 1, covered)
  # Rows/columns of the padded input that no window reached get zeros;
  # then the padding itself is cut off.
  dxp = jnp.pad(dxp, ((0, 0), (0, xp.shape[1] - covered[0]),
                      (0, xp.shape[2] - covered[1]), (0, 0)))
  dx = dxp[:, pads[0][0]:pads[0][0] + x.shape[1],
           pads[1][0]:pads[1][0] + x.shape[2]]
  taps = []
  for i in range(kh):
    for j in range(kw):
      tap = _tap(xp, i, j, strides, (ho, wo))
      # The sum over images and positions as a [1, N] x [N, C] matmul:
      # 1.2-2.5x faster on XLA:CPU than a reduce over the major axes.
      products = (tap * g).reshape(-1, g.shape[-1])
      taps.append(jnp.ones((1, products.shape[0]), g.dtype) @ products)
  dw = jnp.concatenate(taps).reshape(kh, kw, 1, -1).astype(w.dtype)
  return dx.astype(x.dtype), dw


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(images: jax.Array, kernel: jax.Array, *,
                     strides: int = 1, padding: _Pads,
                     impl: str = 'auto') -> jax.Array:
  """Depthwise convolution, `[B,H,W,C] x [kh,kw,1,C] -> [B,Ho,Wo,C]`.

  Same values as `lax.conv_general_dilated(images, kernel, (s, s), padding,
  ('NHWC', 'HWIO', 'NHWC'), feature_group_count=C)`, with gradients of any
  order.

  Args:
    images: `[B, H, W, C]` float array.
    kernel: `[kh, kw, 1, C]`.
    strides: the same stride along H and W.
    padding: `((lo_h, hi_h), (lo_w, hi_w))`, non-negative.
    impl: 'auto' (shifted sums on CPU, lax elsewhere; see
      `fewshot.ops.paths`), 'cpu' or 'xla'.
  """
  if images.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1:
    raise ValueError(f'depthwise_conv2d expects [B,H,W,C] and [kh,kw,1,C], '
                     f'got {images.shape} and {kernel.shape}')
  if kernel.shape[3] != images.shape[3]:
    raise ValueError(f'channels differ: {images.shape} vs {kernel.shape}')
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in pads for p in pair):
    raise ValueError(f'padding must be non-negative, got {pads}')
  kernel = kernel.astype(images.dtype)
  if not _use_fast_path(impl):
    return _xla(images, kernel, strides, pads)
  return _depthwise(images, kernel, int(strides), pads)


__all__ = ['IMPLS', 'depthwise_conv2d']
