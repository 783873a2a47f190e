"""Conv-4: four [3x3 conv, norm, ReLU, 2x2 max-pool] blocks (Vinyals et al. 2016)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewshot.backbones import layers

NORMS = ('batch', 'batch_running', 'none')


def scale_images(images: jax.Array) -> jax.Array:
  """uint8 0..255 images to float32 in [0, 1]; float images pass through."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) * (1.0 / 255.0)
  return images


class BatchStatNorm(nn.Module):
  """BatchNorm that always uses the current batch's statistics.

  This is the transductive mode of the MAML paper: there are no running
  averages, so training and evaluation behave alike and depend on the batch.
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    broadcast = (1,) * (x.ndim - 1) + (features,)
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale.reshape(broadcast)
    return (x - mean) * multiplier + bias.reshape(broadcast)


class Conv4(nn.Module):
  """`images [B, H, W, C]` -> `features [B, D]`, D = filters * (H/16) * (W/16).

  Attributes:
    filters: channels of every conv layer (64 in the literature).
    norm: 'batch' (batch statistics in training and evaluation, transductive,
      no running state), 'batch_running' (batch statistics in training,
      running averages in evaluation), or 'none' (conv bias, no norm).
  """
  filters: int = 64
  norm: str = 'batch'
  num_blocks: int = 4

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}.')
    if images.ndim != 4:
      raise ValueError(f'Conv4 expects images [B, H, W, C], got {images.shape}.')
    x = scale_images(images)
    for block in range(self.num_blocks):
      x = layers.Conv(self.filters, use_bias=self.norm == 'none',
                      name=f'conv{block}')(x)
      if self.norm == 'batch':
        x = BatchStatNorm(name=f'norm{block}')(x)
      elif self.norm == 'batch_running':
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         epsilon=1e-5, name=f'norm{block}')(x)
      x = nn.relu(x)
      x = layers.max_pool_2x2(x)
    return x.reshape(x.shape[0], -1)
