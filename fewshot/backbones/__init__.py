"""Flax backbones behind one functional interface (`Backbone`)."""

from __future__ import annotations

from typing import Any

from fewshot.backbones.base import (Backbone, adapt_images, from_flax,
                                    identity_backbone, with_input_adapter)
from fewshot.backbones.bert import BertEncoder
from fewshot.backbones.conv4 import Conv4
from fewshot.backbones.efficientnet_lite import EfficientNetLite
from fewshot.backbones.lenet import LeNet
from fewshot.backbones.loading import Loaded, load
from fewshot.backbones.mlp import MLP
from fewshot.backbones.resnet import ResNet12, ResNet18

# name -> flax module class; `create(name, **config.backbone)`. Text
# backbones ('minilm_l6') take int32 token ids `[B, L]` instead of images,
# 'mlp' takes feature vectors `[B, D]` (a data section's stored features).
BACKBONES = {
    'conv4': Conv4,
    'efficientnet_lite0': EfficientNetLite,
    'lenet': LeNet,
    'minilm_l6': BertEncoder,
    'mlp': MLP,
    'resnet12': ResNet12,
    'resnet18': ResNet18,
}


def create(name: str, weights: str | None = None, *,
           input_size: int | None = None, input_channels: int | None = None,
           **kwargs: Any) -> Backbone:
  """Builds the named backbone; kwargs are the module's attributes.

  With `weights` (a named source such as 'imagenet', see `load`), the
  backbone's `init` returns those weights instead of a random init. (A
  config's `backbone.weights=<workdir>` is read by `fewshot.builder`.)
  `input_size` / `input_channels` resize images and repeat a grayscale
  channel on the device before the module (`with_input_adapter`), e.g. to
  feed 64x64 or 28x28x1 images to an ImageNet backbone.
  """
  if weights is not None:
    return with_input_adapter(load(name, weights, **kwargs).backbone,
                              input_size, input_channels)
  return with_input_adapter(_create(name, **kwargs), input_size,
                            input_channels)


def _create(name: str, **kwargs: Any) -> Backbone:
  if name not in BACKBONES:
    raise ValueError(f'Unknown backbone {name!r}; known: {sorted(BACKBONES)}.')
  module_class = BACKBONES[name]
  fields = {f for f in module_class.__dataclass_fields__
            if f not in ('parent', 'name')}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} for backbone {name!r}; '
                     f'it accepts {sorted(fields)}.')
  return from_flax(module_class(**kwargs))


__all__ = ['BACKBONES', 'Backbone', 'BertEncoder', 'Conv4', 'EfficientNetLite', 'LeNet', 'Loaded', 'MLP',
           'ResNet12', 'ResNet18', 'adapt_images', 'create', 'from_flax',
           'identity_backbone', 'load', 'with_input_adapter']
