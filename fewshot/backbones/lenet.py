"""LeNet: the digits encoder of domain adaptation (TLlib's LeNet, with BatchNorm).

Two [5x5 VALID conv, norm, 2x2 max-pool, ReLU] blocks of 20 and 50 filters
and a 500-unit fully connected layer: 28x28 images give 50 x 4 x 4 = 800
features before it, as in Caffe's LeNet that TLlib and the adaptation
papers use. TLlib regularises it with dropout; here each layer has
BatchNorm with running statistics instead, so AdaBN has statistics to
re-estimate (`norm='none'`: biases and no norm, the original layout).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewshot import ops
from fewshot.backbones import layers
from fewshot.backbones.conv4 import BatchNormAffine, scale_images

NORMS = ('batch_running', 'batch', 'none')


class LeNet(nn.Module):
  """`images [B, 28, 28, C]` -> `features [B, hidden]` (ReLU outputs).

  Attributes:
    filters: the two conv layers' channels.
    hidden: the fully connected layer's width.
    norm: 'batch_running' (batch statistics in training, running averages
      in evaluation), 'batch' (batch statistics always) or 'none'.
  """
  filters: tuple[int, int] = (20, 50)
  hidden: int = 500
  norm: str = 'batch_running'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}.')
    if images.ndim != 4 or min(images.shape[1:3]) < 16:
      raise ValueError('LeNet expects images [B, H, W, C] of at least 16x16, '
                       f'got {images.shape}.')
    use_norm = self.norm != 'none'

    def normalise(x, name):
      return BatchNormAffine(running=self.norm == 'batch_running',
                             name=name)(x, use_running_average=not train)

    x = scale_images(images)
    for block, filters in enumerate(self.filters):
      x = layers.Conv(filters, kernel_size=5, use_bias=not use_norm,
                      padding='VALID', name=f'conv{block}')(x)
      if use_norm:
        multiplier, offset = normalise(x, f'norm{block}')
        x = ops.affine_relu_max_pool(x, multiplier, offset)
      else:
        x = nn.relu(layers.max_pool_2x2(x))
    x = x.reshape(x.shape[0], -1)
    bound = x.shape[-1] ** -0.5
    x = nn.Dense(self.hidden, use_bias=not use_norm,
                 kernel_init=nn.initializers.variance_scaling(
                     1 / 3, 'fan_in', 'uniform'),
                 bias_init=lambda k, s, d=jnp.float32: jax.random.uniform(
                     k, s, d, -bound, bound), name='fc')(x)
    if use_norm:
      multiplier, offset = normalise(x, 'norm_fc')
      x = x * multiplier[None, :] + offset[None, :]
    return nn.relu(x)
