"""Flax layers built on the library's fast ops."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv2d(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 SAME convolution, `[B,H,W,I] x [kh,kw,I,O] -> [B,H,W,O]`."""
  return jax.lax.conv_general_dilated(
      images, kernel, (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def max_pool_2x2(images: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 (odd sizes are floored), `[B,H,W,C]`."""
  return nn.max_pool(images, (2, 2), strides=(2, 2), padding='VALID')


class Conv(nn.Module):
  """Stride-1 SAME convolution; kernel initialised like PyTorch's default."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = self.kernel_size * self.kernel_size * x.shape[-1]
    kernel = self.param(
        'kernel',
        nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    y = conv2d(x, kernel)
    if self.use_bias:
      bound = fan_in ** -0.5
      bias = self.param(
          'bias', lambda k, s: jax.random.uniform(k, s, minval=-bound,
                                                  maxval=bound),
          (self.features,))
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y
