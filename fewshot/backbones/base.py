"""The functional boundary between flax modules and few-shot algorithms."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any      # a pytree of trainable arrays
ModelState = Any  # a pytree of non-trainable arrays (BatchNorm statistics)

# (params, model_state, images [B,H,W,C], train) -> (features [B,D], model_state)
ApplyFn = Callable[[Params, ModelState, jax.Array, bool],
                   tuple[jax.Array, ModelState]]


class Backbone(NamedTuple):
  """A feature extractor as two pure functions.

  `init(key, images)` returns `(params, model_state)`; `apply(params,
  model_state, images, train)` returns `(features [B, D], new_model_state)`.
  In training mode, BatchNorm running statistics (if the module keeps any) are
  updated; evaluation mode never changes `model_state`.
  """
  init: Callable[[jax.Array, jax.Array], tuple[Params, ModelState]]
  apply: ApplyFn
  module: nn.Module


def from_flax(module: nn.Module) -> Backbone:
  """Wraps a flax module `__call__(images, train) -> features [B, D]`."""

  def init(key: jax.Array, images: jax.Array) -> tuple[Params, ModelState]:
    variables = dict(module.init(key, images, train=False))
    params = variables.pop('params', {})  # {} for a parameter-free module
    return params, variables

  def apply(params: Params, model_state: ModelState, images: jax.Array,
            train: bool) -> tuple[jax.Array, ModelState]:
    variables = {'params': params, **model_state}
    if train and model_state:
      features, new_state = module.apply(variables, images, train=True,
                                         mutable=list(model_state))
      return features, dict(new_state)
    return module.apply(variables, images, train=train), model_state

  return Backbone(init=init, apply=apply, module=module)


def adapt_images(images: jax.Array, size: int | None = None,
                 channels: int | None = None) -> jax.Array:
  """Resizes `[B, H, W, C]` images to `size` x `size` and/or repeats C to `channels`.

  Bilinear resizing (antialiased when shrinking); uint8 images stay uint8
  (rounded), so a backbone's own input normalisation still applies. Only a
  single channel can be repeated (grayscale to RGB).
  """
  if size is not None and images.shape[1:3] != (size, size):
    resized = jax.image.resize(
        images.astype(jnp.float32),
        (images.shape[0], size, size, images.shape[3]), 'bilinear')
    if images.dtype == jnp.uint8:
      resized = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
    images = resized
  if channels is not None and images.shape[-1] != channels:
    if images.shape[-1] != 1:
      raise ValueError(f'Cannot turn {images.shape[-1]}-channel images into '
                       f'{channels} channels; only 1-channel images repeat.')
    images = jnp.repeat(images, channels, axis=-1)
  return images


def with_input_adapter(backbone: Backbone, size: int | None = None,
                       channels: int | None = None) -> Backbone:
  """`backbone` fed through `adapt_images(images, size, channels)`.

  E.g. an ImageNet backbone on 64x64 Tiny-ImageNet (`size=128`) or on 28x28
  grayscale Omniglot (`size=112, channels=3`). Resizing runs on the device
  inside the compiled step; the dataset keeps its own size.
  """
  if size is None and channels is None:
    return backbone

  def init(key: jax.Array, images: jax.Array) -> tuple[Params, ModelState]:
    return backbone.init(key, adapt_images(images, size, channels))

  def apply(params: Params, model_state: ModelState, images: jax.Array,
            train: bool) -> tuple[jax.Array, ModelState]:
    return backbone.apply(params, model_state,
                          adapt_images(images, size, channels), train)

  return Backbone(init=init, apply=apply, module=backbone.module)


def identity_backbone() -> Backbone:
  """Treats its inputs as features: `[B, D]` in, `[B, D]` out, no parameters.

  Runs feature-based algorithms on precomputed features
  (`fewshot.features.precompute`).
  """

  def init(key: jax.Array, features: jax.Array) -> tuple[Params, ModelState]:
    del key, features
    return {}, {}

  def apply(params: Params, model_state: ModelState, features: jax.Array,
            train: bool) -> tuple[jax.Array, ModelState]:
    del params, train
    return features.reshape(features.shape[0], -1), model_state

  return Backbone(init=init, apply=apply, module=None)
