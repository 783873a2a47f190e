"""Flax layers built on the library's fast ops."""

from __future__ import annotations

import flax.linen as nn
import jax

from fewshot import ops


def conv2d(images: jax.Array, kernel: jax.Array,
           padding: str = 'SAME') -> jax.Array:
  """Stride-1 convolution, `[B,H,W,I] x [kh,kw,I,O] -> [B,H',W',O]`.

  'SAME' keeps H x W, 'VALID' gives `H - kh + 1`. Uses
  `fewshot.ops.conv2d`, whose gradients are fast on XLA:CPU.
  """
  return ops.conv2d(images, kernel, padding=padding)


max_pool_2x2 = ops.max_pool_2x2


class Conv(nn.Module):
  """Stride-1 convolution ('SAME' or 'VALID'); PyTorch's default init."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  padding: str = 'SAME'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = self.kernel_size * self.kernel_size * x.shape[-1]
    kernel = self.param(
        'kernel',
        nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    y = conv2d(x, kernel, self.padding)
    if self.use_bias:
      bound = fan_in ** -0.5
      bias = self.param(
          'bias', lambda k, s: jax.random.uniform(k, s, minval=-bound,
                                                  maxval=bound),
          (self.features,))
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y
