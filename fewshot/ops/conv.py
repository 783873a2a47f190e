"""Stride-1 2-D convolution with gradients that are fast on XLA:CPU.

XLA:CPU runs `lax.conv_general_dilated` reasonably for the forward pass but
the weight gradient JAX derives from it (a convolution whose "kernel" is the
whole output gradient) is several times slower than a matmul of the same
size. Here the gradients are written out explicitly:

* input gradient = forward convolution of the output gradient with the
  spatially flipped, in/out-transposed kernel;
* weight gradient = `_wgrad`, computed on CPU as matmuls over shifted views
  of the input (see `_wgrad_cpu`).

Both are again `custom_vjp` functions whose own gradients are expressed with
`conv2d` and `_wgrad`, so the set is closed under differentiation: second
order reverse mode (MAML) gets the same fast kernels, and everything is
ordinary JAX, so `jit` and `vmap` (including per-example kernels) work.

On backends other than CPU the plain `lax.conv_general_dilated` is used.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

Padding = Union[str, Sequence[tuple[int, int]]]
_Pads = tuple[tuple[int, int], tuple[int, int]]
_DIMS = ('NHWC', 'HWIO', 'NHWC')

# Which implementation `conv2d` uses: 'auto' (fast path on CPU only),
# 'cpu' (the fast path on any backend; for tests) or 'xla' (plain lax ops).
IMPLS = ('auto', 'cpu', 'xla')


def _normalize_padding(padding: Padding, kernel_hw: tuple[int, int]) -> _Pads:
  """'SAME' / 'VALID' / explicit pairs -> ((lo_h, hi_h), (lo_w, hi_w))."""
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == 'VALID':
      return ((0, 0), (0, 0))
    if mode == 'SAME':
      # Stride 1: total padding k - 1, the odd one out goes high (as XLA).
      return tuple((  # type: ignore[return-value]
          (k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)
    raise ValueError(f"padding must be 'SAME', 'VALID' or pairs, got {padding!r}")
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f'expected 2 (lo, hi) padding pairs, got {padding!r}')
  return pads  # type: ignore[return-value]


def _xla_conv(x: jax.Array, w: jax.Array, pads: _Pads) -> jax.Array:
  """Plain `[B,H,W,I] x [kh,kw,I,O] -> [B,Ho,Wo,O]` via lax."""
  return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_DIMS)


def _xla_wgrad(x: jax.Array, g: jax.Array, pads: _Pads) -> jax.Array:
  """Weight gradient as XLA would do it, `[B,H,W,I], [B,Ho,Wo,O] -> [kh,kw,I,O]`.

  The batch is the contraction ("feature") dimension and the channels of `x`
  are the "batch" dimension of a convolution with the whole `g` as kernel.
  """
  return lax.conv_general_dilated(
      x, g, (1, 1), pads, dimension_numbers=('CHWN', 'IHWO', 'HWNC'))


def _flip_kernel(w: jax.Array) -> jax.Array:
  """`[kh,kw,I,O] -> [kh,kw,O,I]`, spatially reversed (transposed conv)."""
  return jnp.flip(w, (0, 1)).swapaxes(2, 3)


def _transpose_pads(pads: _Pads, kernel_hw: tuple[int, int]) -> _Pads:
  """Padding of the conv that maps an output gradient to an input gradient."""
  return tuple(  # type: ignore[return-value]
      (k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(pads, kernel_hw))


# --- CPU implementations -----------------------------------------------------


def _pad_input(x: jax.Array, pads: _Pads) -> jax.Array:
  """Zero-pads the spatial dims; negative padding crops."""
  return lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), pads[0] + (0,), pads[1] + (0,), (0, 0, 0)))


def _patches(xp: jax.Array, kernel_hw: tuple[int, int]) -> jax.Array:
  """Padded `[B,Hp,Wp,C]` -> `[B,Ho,Wo,kh*kw*C]` in HWI order (im2col)."""
  kh, kw = kernel_hw
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  return jnp.concatenate(
      [xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
      axis=-1)


def _conv_cpu(x: jax.Array, w: jax.Array, pads: _Pads) -> jax.Array:
  """Forward conv on CPU: im2col matmul when the patch is short, else XLA."""
  kh, kw, cin, cout = w.shape
  if kh * kw * cin <= _IM2COL_MAX_PATCH:
    # XLA's conv is slow with few input channels (the first layer); the
    # patches are then small, so im2col + one matmul wins.
    xp = _pad_input(x, pads)
    p = _patches(xp, (kh, kw))
    return jnp.einsum('bhwk,ko->bhwo', p, w.reshape(kh * kw * cin, cout))
  return _xla_conv(x, w, pads)


def _wgrad_cpu(x: jax.Array, g: jax.Array, pads: _Pads,
               kernel_hw: tuple[int, int]) -> jax.Array:
  """Weight gradient on CPU, `[B,H,W,I], [B,Ho,Wo,O] -> [kh,kw,I,O]`."""
  kh, kw = kernel_hw
  xp = _pad_input(x, pads)
  if kh * kw * x.shape[-1] <= _IM2COL_MAX_PATCH:
    p = _patches(xp, kernel_hw)
    return jnp.einsum('bhwk,bhwo->ko', p, g).reshape(kh, kw, x.shape[-1], -1)
  mode = _EXPERIMENT.get('wgrad', 'xla')
  if mode == 'shifted':
    return _wgrad_shifted(xp, g, kernel_hw)
  split = _EXPERIMENT.get('split', 1)
  b = x.shape[0]
  if split > 1 and b % split == 0:
    xs = x.reshape(split, b // split, *x.shape[1:])
    gs = g.reshape(split, b // split, *g.shape[1:])
    return sum(_xla_wgrad(xs[i], gs[i], pads) for i in range(split))
  return _xla_wgrad(x, g, pads)


def _wgrad_shifted(xp: jax.Array, g: jax.Array,
                   kernel_hw: tuple[int, int]) -> jax.Array:
  """Weight gradient as kh*kw matmuls over shifted flat views of `xp`.

  With `xp` flattened to rows n = (b*Hp + h)*Wp + w, tap (i, j) reads row
  n + i*Wp + j, so every tap is a contiguous row range and no 9x im2col
  buffer is needed. `g` is zero-embedded into the padded grid so the rows
  that fall into padding contribute nothing.
  """
  kh, kw = kernel_hw
  b, hp, wp, cin = xp.shape
  _, ho, wo, cout = g.shape
  ge = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0)))
  xf = xp.reshape(b * hp * wp, cin)
  gf = ge.reshape(b * hp * wp, cout)
  span = (kh - 1) * wp + (kw - 1)
  rows = b * hp * wp - span
  gf = gf[:rows]
  taps = [jnp.einsum('nc,no->co', xf[i * wp + j:i * wp + j + rows], gf)
          for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kh, kw, cin, cout)


_EXPERIMENT: dict = {}

# Patches up to this length (kh*kw*I) use im2col; longer ones the XLA conv.
_IM2COL_MAX_PATCH = 32


# --- differentiable ops with custom gradients --------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, pads: _Pads) -> jax.Array:
  return _conv_cpu(x, w, pads)


def _conv_fwd(x, w, pads):
  return _conv_cpu(x, w, pads), (x, w)


def _conv_bwd(pads, res, g):
  x, w = res
  kernel_hw = w.shape[:2]
  dx = _conv(g, _flip_kernel(w), _transpose_pads(pads, kernel_hw))
  dw = _wgrad(x, g, pads, kernel_hw)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _wgrad(x: jax.Array, g: jax.Array, pads: _Pads,
           kernel_hw: tuple[int, int]) -> jax.Array:
  return _wgrad_cpu(x, g, pads, kernel_hw)


def _wgrad_fwd(x, g, pads, kernel_hw):
  return _wgrad_cpu(x, g, pads, kernel_hw), (x, g)


def _wgrad_bwd(pads, kernel_hw, res, v):
  # _wgrad is bilinear: <v, wgrad(x, g)> = <g, conv(x, v)> = <x, convT(g, v)>.
  x, g = res
  dx = _conv(g, _flip_kernel(v), _transpose_pads(pads, kernel_hw))
  dg = _conv(x, v, pads)
  return dx, dg


_wgrad.defvjp(_wgrad_fwd, _wgrad_bwd)


def _use_fast_path(impl: str) -> bool:
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    return jax.default_backend() == 'cpu'
  return impl == 'cpu'


def conv2d(images: jax.Array, kernel: jax.Array, *, padding: Padding = 'SAME',
           impl: str = 'auto') -> jax.Array:
  """Stride-1 convolution, `[B,H,W,I] x [kh,kw,I,O] -> [B,Ho,Wo,O]`.

  Same values as `lax.conv_general_dilated(images, kernel, (1, 1), padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` with gradients (of any order)
  that are fast on XLA:CPU.

  Args:
    images: `[B, H, W, I]` float array.
    kernel: `[kh, kw, I, O]`, same dtype.
    padding: 'SAME' (output H x W), 'VALID', or ((lo_h, hi_h), (lo_w, hi_w))
      with 0 <= lo, hi <= k - 1.
    impl: 'auto' (custom-gradient path on CPU, plain lax elsewhere), 'cpu'
      (custom path on any backend) or 'xla' (plain lax everywhere).
  """
  if images.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'conv2d expects [B,H,W,I] and [kh,kw,I,O], got '
                     f'{images.shape} and {kernel.shape}')
  if images.shape[-1] != kernel.shape[2]:
    raise ValueError(f'input channels differ: {images.shape} vs {kernel.shape}')
  pads = _normalize_padding(padding, kernel.shape[:2])
  if not _use_fast_path(impl):
    return _xla_conv(images, kernel, pads)
  for (lo, hi), k in zip(pads, kernel.shape[:2]):
    if not (0 <= lo <= k - 1 and 0 <= hi <= k - 1):
      raise ValueError(f'padding {pads} must lie in [0, k-1] for the fast path')
  return _conv(images, kernel, pads)
