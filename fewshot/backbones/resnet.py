"""ResNet-12 (MetaOptNet; Tian et al. 2020) and ResNet-18 (He et al. 2016).

Both map `images [B, H, W, C]` to globally average-pooled `features [B, D]`
and keep BatchNorm running statistics in the `batch_stats` collection when
`norm='batch_running'` (the default here: these backbones are pretrained as
ordinary classifiers). Parameter names follow the PyTorch reference
implementations (`conv1`, `bn1`, `layer1_0`, `downsample_conv`, ...), so
converted state dicts map onto them one to one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewshot.backbones import layers
from fewshot.backbones.conv4 import BatchStatNorm, scale_images

NORMS = ('batch_running', 'batch')

# He et al. (2015) normal init on fan-out, as both PyTorch references use.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class ConvNoBias(nn.Module):
  """`[B,H,W,I] -> [B,H',W',features]`, PyTorch-style padding `k // 2`.

  Stride 1 with an odd kernel uses the library's CPU-fast `conv2d`; strided
  convolutions use `lax.conv_general_dilated` with symmetric padding (so
  that converted PyTorch weights compute the same function).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', _KERNEL_INIT,
                        (k, k, x.shape[-1], self.features))
    if self.strides == 1 and k % 2 == 1:
      return layers.conv2d(x, kernel)
    pad = k // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), ((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _norm_layer(norm: str, train: bool, name: str) -> nn.Module:
  if norm == 'batch_running':
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, name=name)
  if norm == 'batch':
    return BatchStatNorm(name=name)
  raise ValueError(f'norm must be one of {NORMS}, got {norm!r}.')


def _prepare_images(images: jax.Array, mean: Sequence[float] | None,
                    std: Sequence[float] | None, where: str) -> jax.Array:
  """uint8 -> [0, 1] floats, then `(x - mean) / std` per channel if given."""
  if images.ndim != 4:
    raise ValueError(f'{where} expects images [B, H, W, C], got '
                     f'{images.shape}.')
  x = scale_images(images)
  per_channel = lambda v: jnp.asarray(v, x.dtype).reshape(1, 1, 1, -1)
  if mean is not None:
    x = x - per_channel(mean)
  if std is not None:
    x = x / per_channel(std)
  return x


class ResNet12Block(nn.Module):
  """Three 3x3 conv-BN-LeakyReLU(0.1) layers, a 1x1 conv+BN shortcut, 2x2 pool.

  `x [B,H,W,I] -> [B,H/2,W/2,features]`; the third layer's activation comes
  after the residual sum: `lrelu(bn3(conv3(.)) + bn(conv1x1(x)))`.
  """
  features: int
  norm: str = 'batch_running'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    shortcut = ConvNoBias(self.features, 1, name='downsample_conv')(x)
    shortcut = _norm_layer(self.norm, train, 'downsample_bn')(shortcut)
    y = x
    for i in (1, 2, 3):
      y = ConvNoBias(self.features, 3, name=f'conv{i}')(y)
      y = _norm_layer(self.norm, train, f'bn{i}')(y)
      if i < 3:
        y = nn.leaky_relu(y, 0.1)
    y = nn.leaky_relu(y + shortcut, 0.1)
    return layers.max_pool_2x2(y)


class ResNet12(nn.Module):
  """ResNet-12: `images [B,H,W,C] -> features [B, widths[-1]]` (640 by default).

  Four `ResNet12Block`s, each halving the resolution, then global average
  pooling. With the default widths it has 12.4M parameters; a forward pass
  costs 3.5G multiply-adds per 84x84 image (0.52G at 32x32).

  Attributes:
    widths: output channels of the four blocks.
    norm: 'batch_running' (batch statistics in training, running averages in
      `batch_stats` at evaluation) or 'batch' (always the current batch's
      statistics, transductive, no state).
    mean, std: optional per-channel normalisation applied after scaling
      uint8 images to [0, 1] (e.g. ImageNet's mean and std).
  """
  widths: Sequence[int] = (64, 160, 320, 640)
  norm: str = 'batch_running'
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = _prepare_images(images, self.mean, self.std, 'ResNet12')
    for i, width in enumerate(self.widths):
      x = ResNet12Block(width, norm=self.norm, name=f'layer{i + 1}')(x, train)
    return jnp.mean(x, axis=(1, 2))


class BasicBlock(nn.Module):
  """ResNet-18's block: `relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))`.

  The shortcut is the identity, or a 1x1 conv+BN when the stride or width
  changes. `x [B,H,W,I] -> [B,H/s,W/s,features]`.
  """
  features: int
  strides: int = 1
  norm: str = 'batch_running'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = ConvNoBias(self.features, 3, self.strides, name='conv1')(x)
    y = nn.relu(_norm_layer(self.norm, train, 'bn1')(y))
    y = ConvNoBias(self.features, 3, name='conv2')(y)
    y = _norm_layer(self.norm, train, 'bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = ConvNoBias(self.features, 1, self.strides, name='downsample_conv')(x)
      x = _norm_layer(self.norm, train, 'downsample_bn')(x)
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """ResNet-18 (torchvision layout): `images [B,H,W,C] -> features [B, 512]`.

  Four stages of two `BasicBlock`s (widths 64, 128, 256, 512; stages 2-4
  start with stride 2), then global average pooling; 11.2M parameters with
  the ImageNet stem (the 1000-way classifier is not part of the backbone).

  Attributes:
    small_images: True replaces the ImageNet stem (7x7/2 conv, 3x3/2
      max-pool: a 4x reduction) with one 3x3/1 conv, the usual choice for
      32-84 px inputs (CIFAR, mini-ImageNet).
    widths: stage widths.
    norm, mean, std: as in `ResNet12`.
  """
  small_images: bool = False
  widths: Sequence[int] = (64, 128, 256, 512)
  norm: str = 'batch_running'
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = _prepare_images(images, self.mean, self.std, 'ResNet18')
    if self.small_images:
      x = ConvNoBias(self.widths[0], 3, name='conv1')(x)
    else:
      x = ConvNoBias(self.widths[0], 7, 2, name='conv1')(x)
    x = nn.relu(_norm_layer(self.norm, train, 'bn1')(x))
    if not self.small_images:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, width in enumerate(self.widths):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, norm=self.norm,
                       name=f'layer{stage + 1}_{block}')(x, train)
    return jnp.mean(x, axis=(1, 2))
