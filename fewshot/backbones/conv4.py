"""Conv-4: four [3x3 conv, norm, ReLU, 2x2 max-pool] blocks (Vinyals et al. 2016)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewshot import ops
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


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and (biased) variance of `[..., C]` over all other axes.

  One pass over `x` (mean and mean of squares, as `flax.linen.BatchNorm`
  computes them), so XLA reads the activation once for both.
  """
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  mean_of_squares = jnp.mean(jnp.square(x), axis=axes)
  return mean, jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)


class BatchNormAffine(nn.Module):
  """BatchNorm as its per-channel affine map: `x -> x * multiplier + offset`.

  Returns `(multiplier [C], offset [C])` instead of the normalized tensor, so
  that a caller can apply them where it is cheapest (Conv-4 applies them
  after the max-pool, `fewshot.ops.affine_relu_max_pool`). Parameters
  (`scale`, `bias`) and, with `running=True`, running statistics
  (`batch_stats`: `mean`, biased `var`, updated with `momentum` outside
  initialization) are named and behave as in `flax.linen.BatchNorm`.

  Attributes:
    running: keep running statistics; `use_running_average=True` then
      normalizes with them. Without it the current batch's statistics are
      always used (transductive, as in the MAML paper).
  """
  running: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    if self.running:
      running_mean = self.variable('batch_stats', 'mean', jnp.zeros,
                                   (features,), jnp.float32)
      running_var = self.variable('batch_stats', 'var', jnp.ones,
                                  (features,), jnp.float32)
    if self.running and use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      mean, var = batch_moments(x)
      if self.running and not self.is_initializing():
        keep = self.momentum
        running_mean.value = keep * running_mean.value + (1 - keep) * mean
        running_var.value = keep * running_var.value + (1 - keep) * var
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
    return multiplier, bias - mean * multiplier


class Conv4(nn.Module):
  """`images [B, H, W, C]` -> `features [B, D]`, D = filters * (H/16) * (W/16).

  Attributes:
    filters: channels of every conv layer (64 in the literature).
    norm: 'batch' (batch statistics in training and evaluation, transductive,
      no running state), 'batch_running' (batch statistics in training,
      running averages in evaluation), or 'none' (conv bias, no norm).
    num_blocks: conv blocks.
    pooled_blocks: how many of the first blocks end with the 2x2 max-pool
      (None: all). Relation networks use 4 blocks with 2 pooled, keeping
      7x7 feature maps of 28x28 images (Sung et al. 2018).

  Each block's norm, ReLU and pool run as one `affine_relu_max_pool` on the
  pooled tensor (same values as norm -> ReLU -> pool, a quarter of the work).
  """
  filters: int = 64
  norm: str = 'batch'
  num_blocks: int = 4
  pooled_blocks: int | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}.')
    if images.ndim != 4:
      raise ValueError(f'Conv4 expects images [B, H, W, C], got {images.shape}.')
    pooled = self.num_blocks if self.pooled_blocks is None else self.pooled_blocks
    if not 0 <= pooled <= self.num_blocks:
      raise ValueError(f'pooled_blocks must be in [0, num_blocks='
                       f'{self.num_blocks}], got {self.pooled_blocks}.')
    x = scale_images(images)
    for block in range(self.num_blocks):
      pool = block < pooled
      x = layers.Conv(self.filters, use_bias=self.norm == 'none',
                      name=f'conv{block}')(x)
      if self.norm == 'none':
        x = nn.relu(layers.max_pool_2x2(x) if pool else x)
        continue
      multiplier, offset = BatchNormAffine(
          running=self.norm == 'batch_running', name=f'norm{block}')(
              x, use_running_average=not train)
      if pool:
        x = ops.affine_relu_max_pool(x, multiplier, offset)
      else:
        x = nn.relu(x * multiplier[None, None, None, :]
                    + offset[None, None, None, :])
    return x.reshape(x.shape[0], -1)
