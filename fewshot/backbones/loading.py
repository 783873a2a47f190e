"""`load(name, weights)`: a backbone module with random or pretrained variables.

Weights come from

* `None`: a fresh random initialisation (needs the image shape);
* a named source such as `'imagenet'`: converted weights from
  `fewshot.backbones.pretrained_weights.load_pretrained(name, source)`, or
  for a text encoder (`'minilm_l6'`, `'all_minilm_l6_v2'`) from
  `fewshot.backbones.text_weights.load_pretrained`.

A training workdir's backbone is read by `fewshot.workdir.load_backbone`
(checkpoints are the upper layers' business); `pretrained_backbone` turns
any variables into a `Backbone` that starts from them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewshot.backbones.base import Backbone, ModelState, Params, from_flax


class Loaded(NamedTuple):
  """A backbone module and its variables; unpacks as `module, variables`.

  `module.apply(variables, images [B,H,W,C]) -> features [B, D]` (there is
  never a classification head). `variables` is `{'params': ...}` plus the
  module's state collections (`'batch_stats'` for running BatchNorm).
  """
  module: nn.Module
  variables: dict[str, Any]

  @property
  def params(self) -> Params:
    return self.variables['params']

  @property
  def model_state(self) -> ModelState:
    """The non-trainable collections, as `Backbone.apply` takes them."""
    return {k: v for k, v in self.variables.items() if k != 'params'}

  @property
  def backbone(self) -> Backbone:
    """A `Backbone` whose `init` returns these variables (the key is unused).

    Algorithms built on it (`protonet(loaded.backbone)`) start from the
    loaded weights, which is how `create(name, weights=...)` fine-tunes.
    """
    return pretrained_backbone(self.module, self.params, self.model_state)


def pretrained_backbone(module: nn.Module, params: Params,
                        model_state: ModelState) -> Backbone:
  """`from_flax(module)` with an `init` that returns the given variables."""
  wrapped = from_flax(module)

  def init(key: jax.Array, images: jax.Array) -> tuple[Params, ModelState]:
    del key, images  # The variables are given; their shapes fit any image size.
    return params, model_state

  return wrapped._replace(init=init)


def lists_to_tuples(value: Any) -> Any:
  """JSON lists back to tuples (module attributes such as `widths`)."""
  if isinstance(value, (list, tuple)):
    return tuple(lists_to_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: lists_to_tuples(v) for k, v in value.items()}
  return value


def _build_module(name: str, options: Mapping[str, Any]) -> nn.Module:
  from fewshot.backbones import create  # pylint: disable=g-import-not-at-top
  return create(name, **options).module


def is_path(weights: str | os.PathLike) -> bool:
  text = os.fspath(weights)
  return (os.path.exists(text) or os.sep in text or text.startswith('.') or
          text.startswith('~'))


def load(name: str, weights: str | os.PathLike | None = None, *,
         image_shape: Sequence[int] | None = None,
         sample_images: jax.typing.ArrayLike | None = None, seed: int = 0,
         **options: Any) -> Loaded:
  """The named backbone (a key of `BACKBONES`) and its variables.

  Args:
    name: backbone name, e.g. 'resnet12'.
    weights: None (random init with `jax.random.key(seed)`) or a named
      source such as 'imagenet'. (A workdir: `fewshot.workdir.load_backbone`.)
    image_shape: `(H, W, C)` of the inputs (`(L,)` tokens for a text
      encoder); needed for a random init unless
      `sample_images` is given.
    sample_images: `[B, H, W, C]` example inputs, instead of `image_shape`.
    seed: init seed when `weights` is None.
    **options: module attributes (`widths`, `norm`, ...).

  Returns:
    `Loaded(module, variables)`: `module.apply(variables, images)` gives
    `features [B, D]`; `.backbone` is a ready `Backbone` that starts from
    these variables; `.params` and `.model_state` split the variables.

  Raises:
    ValueError: an unknown backbone, option or source, or a path (a
      workdir is read by `fewshot.workdir.load_backbone`).
  """
  if sample_images is None and image_shape is not None:
    # A 1-D shape is a token sequence `(L,)` for a text encoder.
    sample_images = jnp.zeros((1, *image_shape), jnp.int32 if len(
        image_shape) == 1 else jnp.float32)
  if weights is None:
    if sample_images is None:
      raise ValueError('A random init needs image_shape=(H, W, C) or '
                       'sample_images=[B, H, W, C].')
    module = _build_module(name, lists_to_tuples(dict(options)))
    # Jitted: eager init compiles every random draw separately (slow on CPU).
    variables = jax.jit(module.init)(jax.random.key(seed),
                                     jnp.asarray(sample_images))
    return Loaded(module, dict(variables))
  if is_path(weights):
    raise ValueError(
        f'weights={os.fspath(weights)!r} is a path: read a workdir\'s backbone '
        'with fewshot.workdir.load_backbone(path) (a config\'s '
        'backbone.weights=<workdir> is resolved by fewshot.builder).')
  from fewshot.backbones import text_weights  # pylint: disable=g-import-not-at-top
  if name in text_weights.KNOWN_TEXT_WEIGHTS:
    module, variables = text_weights.load_pretrained(name, weights, **options)
    return Loaded(module, dict(variables))
  try:
    from fewshot.backbones import pretrained_weights  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        f'weights={weights!r} is not a path, and named pretrained weights '
        f'need fewshot.backbones.pretrained_weights, which failed to import: '
        f'{e}') from e
  result = pretrained_weights.load_pretrained(name, weights, **options)
  module, variables = result
  return Loaded(module, dict(variables))
