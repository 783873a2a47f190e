"""Stride-1 2-D convolution with gradients that are fast on XLA:CPU.

On XLA:CPU the forward `lax.conv_general_dilated` runs near matmul speed,
but the weight gradient JAX derives from it (a convolution whose "kernel" is
the whole output gradient) falls off a cliff once that operand outgrows the
cache: 14x14x64 maps, 80 images: 67 GFLOP/s, 320 images: 11 GFLOP/s. So the
gradients are written out here:

* input gradient: a forward conv of the output gradient with the spatially
  flipped, in/out-transposed kernel (what XLA does too);
* weight gradient (`_wgrad`): XLA's weight-gradient conv, written in the
  canonical layout and summed over chunks of a few images (~75 GFLOP/s at
  any batch), or, for few input channels (the first layer), im2col + one
  matmul (2-3x faster than XLA there);
* forward with at most 3 input channels (the first layer): a sum of shifted
  broadcasts in one elementwise loop (`_shifted_conv`).

Both are `custom_vjp` functions whose own gradients are again written with
`_conv` and `_wgrad`, so the set is closed under differentiation: second
order reverse mode (MAML) gets the same kernels, and everything is ordinary
JAX, so `jit` and `vmap` (including per-task kernels) work. On backends
other than CPU `conv2d` is the plain `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from fewshot.ops.paths import cpu_paths

Padding = Union[str, Sequence[tuple[int, int]]]
_Pads = tuple[tuple[int, int], tuple[int, int]]
_DIMS = ('NHWC', 'HWIO', 'NHWC')

# Which implementation `conv2d` uses: 'auto' (the fast path where
# `fewshot.ops.paths` selects the CPU paths: on CPU unless forced), 'cpu' (the
# fast path on any backend; for tests) or 'xla' (plain lax ops).
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
  """Weight gradient as a conv, `[B,H,W,I], [B,Ho,Wo,O] -> [kh,kw,I,O]`.

  The channels of `x` are the batch of a convolution whose kernel is the
  whole `g`, contracting over the images. The transposes are explicit so the
  conv is in the canonical NHWC/HWIO layout: left to XLA's layout passes, a
  weight-gradient conv inside a loop body (MAML's inner loop) stayed in its
  raw layout and ran on XLA:CPU's naive emitter at ~1 GFLOP/s.
  """
  y = lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), pads,
      dimension_numbers=_DIMS)                  # [I, kh, kw, O]
  return y.transpose(1, 2, 0, 3)


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


def _taps(xp: jax.Array, kernel_hw: tuple[int, int]):
  """Yields `((i, j, c), xp[:, i:i+Ho, j:j+Wo, c])` for every kernel tap and
  input channel of padded `[B,Hp,Wp,I]`, in HWI order."""
  kh, kw = kernel_hw
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  for i in range(kh):
    for j in range(kw):
      for c in range(xp.shape[-1]):
        yield (i, j, c), xp[:, i:i + ho, j:j + wo, c]


def _shifted_conv(x: jax.Array, w: jax.Array, pads: _Pads) -> jax.Array:
  """Forward conv for few input channels as a sum of shifted broadcasts.

  With I = 1 (grayscale) the conv is kh*kw multiply-adds per output element;
  as one elementwise loop that writes the output once it ran 2x faster than
  XLA's conv in isolation, and far faster inside a training step, where
  XLA:CPU's conv with one input channel took 3-13 ms for 75 28x28 images.
  """
  out = None
  for (i, j, c), tap in _taps(_pad_input(x, pads), w.shape[:2]):
    term = tap[..., None] * w[i, j, c][None, None, None, :]
    out = term if out is None else out + term
  return out


def _wgrad_cpu(x: jax.Array, g: jax.Array, pads: _Pads,
               kernel_hw: tuple[int, int]) -> jax.Array:
  """Weight gradient on CPU, `[B,H,W,I], [B,Ho,Wo,O] -> [kh,kw,I,O]`."""
  kh, kw = kernel_hw
  cin, cout = x.shape[-1], g.shape[-1]
  if kh * kw * cin <= _IM2COL_MAX_PATCH:
    # im2col, built directly as [kh*kw*I, B*Ho*Wo] for one matmul.
    patches = jnp.stack([tap.reshape(-1) for _, tap in
                         _taps(_pad_input(x, pads), kernel_hw)])
    return (patches @ g.reshape(-1, cout)).reshape(kh, kw, cin, cout)
  # XLA:CPU's weight-gradient conv slows down sharply once an operand
  # outgrows the cache (46 -> 12 GFLOP/s going from 80 to 320 images of
  # 14x14x64); summing it over chunks of a few images keeps ~73 GFLOP/s.
  b, h, w = x.shape[:3]
  per_image = h * w * max(cin, cout) * x.dtype.itemsize
  chunk = max(1, _WGRAD_CHUNK_BYTES // per_image)
  if chunk >= b:
    return _xla_wgrad(x, g, pads)
  out = None
  for start in range(0, b, chunk):
    part = _xla_wgrad(x[start:start + chunk], g[start:start + chunk], pads)
    out = part if out is None else out + part
  return out


# Weight gradients with patches up to this length (kh*kw*I) use im2col + one
# matmul, longer ones the XLA conv. (The first Conv-4 layer, I = 1 or 3, is
# 2-3x faster as im2col; at I = 64 building the 9x larger patch buffer costs
# more than the matmul gains.)
_IM2COL_MAX_PATCH = 32
# Forward convs with at most this many input channels use `_shifted_conv`
# (timed with 1 channel; 3 channels, 27 taps, is the same loop, not timed).
_SHIFTED_MAX_CHANNELS = 3
# Bytes of one weight-gradient operand chunk (see `_wgrad_cpu`).
_WGRAD_CHUNK_BYTES = 512 * 1024


# --- batching: per-task kernels --------------------------------------------
#
# Under `vmap` with a batched kernel (MAML's per-task weights) JAX turns a
# conv into one grouped conv, which XLA:CPU runs ~3x slower than separate
# convs; the rules below unroll over the vmapped axis instead, and fold it
# into the image batch when the kernel is shared (and into the output
# channels of a weight gradient whose activations are shared).


def _unrolled(fn, axis_size, in_batched, *args):
  """Stacks `fn` applied to each vmapped slice (unbatched args shared)."""
  outs = [fn(*(a[i] if b else a for a, b in zip(args, in_batched)))
          for i in range(axis_size)]
  return jnp.stack(outs), True


@functools.lru_cache(maxsize=None)
def _conv_impl(pads: _Pads):
  """`(x, w) -> y` for fixed padding, with the batching rule above."""

  @jax.custom_batching.custom_vmap
  def impl(x, w):
    if x.shape[-1] <= _SHIFTED_MAX_CHANNELS:
      return _shifted_conv(x, w, pads)
    return _xla_conv(x, w, pads)

  @impl.def_vmap
  def _(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if w_batched:
      return _unrolled(impl, axis_size, in_batched, x, w)
    if not x_batched:
      return impl(x, w), False
    y = impl(x.reshape(-1, *x.shape[2:]), w)
    return y.reshape(axis_size, -1, *y.shape[1:]), True

  return impl


@functools.lru_cache(maxsize=None)
def _wgrad_impl(pads: _Pads, kernel_hw: tuple[int, int]):
  """`(x, g) -> dw` for fixed padding and kernel size, unrolled under vmap."""

  @jax.custom_batching.custom_vmap
  def impl(x, g):
    return _wgrad_cpu(x, g, pads, kernel_hw)

  @impl.def_vmap
  def _(axis_size, in_batched, x, g):
    if not any(in_batched):
      return impl(x, g), False
    if in_batched == [False, True]:
      # Shared activations, one output gradient per vmapped slice (per-task
      # gradients of a multi-task loss): one weight gradient with the slices
      # side by side in the output channels, a T-times wider matmul.
      folded = jnp.moveaxis(g, 0, -2).reshape(*g.shape[1:-1], -1)
      dw = impl(x, folded)
      dw = dw.reshape(*dw.shape[:-1], axis_size, g.shape[-1])
      return jnp.moveaxis(dw, -2, 0), True
    return _unrolled(impl, axis_size, in_batched, x, g)

  return impl


# --- differentiable ops with custom gradients --------------------------------
#
# The fwd rules call the custom_vjp functions themselves (not the impls), so
# that when an outer differentiation (second order) goes through a fwd rule
# it meets these custom gradients again rather than JAX's default ones.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, pads: _Pads) -> jax.Array:
  # XLA's own forward conv runs near matmul speed on CPU except with very
  # few input channels (`_shifted_conv` then).
  return _conv_impl(pads)(x, w)


def _conv_fwd(x, w, pads):
  return _conv(x, w, pads), (x, w)


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
  return _wgrad_impl(pads, kernel_hw)(x, g)


def _wgrad_fwd(x, g, pads, kernel_hw):
  return _wgrad(x, g, pads, kernel_hw), (x, g)


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
    return cpu_paths()
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
    impl: 'auto' (custom-gradient path on CPU, plain lax elsewhere, unless
      `fewshot.ops.paths.force_paths` says otherwise), 'cpu' (custom path on
      any backend) or 'xla' (plain lax everywhere).
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
