"""Feature extraction with a frozen backbone, and episodes over stored features.

A frozen backbone in evaluation mode maps each image to the same features in
every episode, so a split can be embedded once and its episodes drawn over the
stored `[M, D]` features: a linear probe, SimpleShot or ProtoNet evaluation of
600 episodes then costs one pass over the split's images instead of one per
episode, and the probes run in one compiled call over `identity_backbone`.
This is exact only for backbones whose evaluation mode treats images
independently (running BatchNorm statistics, not transductive batch
statistics); `precompute` cannot check that; the builder does for
`eval.precompute_features`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import (Backbone, ModelState, Params,
                                    identity_backbone)
from fewshot.data.dataset import ClassDataset
from fewshot.data.sampling import DeviceDataset
from fewshot.progress import Progress

# Algorithms whose adaptation and prediction only see a frozen backbone's
# evaluation-mode features, so they can run on `precompute`d features.
FEATURE_ALGORITHMS = ('protonet', 'linear_probe', 'simpleshot', 'baseline_pp')


def extract_features(backbone: Backbone, params: Params,
                     model_state: ModelState, images: jax.Array, *,
                     batch_size: int = 256) -> jax.Array:
  """`[M, H, W, C]` images -> `[M, D]` evaluation-mode features.

  One compiled `lax.map` over batches of `batch_size` images (the last one
  padded), so memory stays bounded by one batch's activations. Jit-able.
  """
  num_images = images.shape[0]
  batch_size = max(1, min(batch_size, num_images))
  num_batches = -(-num_images // batch_size)
  padding = num_batches * batch_size - num_images
  padded = jnp.concatenate(
      [images, jnp.zeros((padding, *images.shape[1:]), images.dtype)])
  batches = padded.reshape(num_batches, batch_size, *images.shape[1:])

  def embed(batch):
    return backbone.apply(params, model_state, batch, False)[0]

  features = jax.lax.map(embed, batches)
  return features.reshape(num_batches * batch_size, -1)[:num_images]


@functools.partial(jax.jit, static_argnames=('backbone', 'batch_size'))
def _extract_jit(backbone, params, model_state, images, batch_size):
  return extract_features(backbone, params, model_state, images,
                          batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=('backbone',))
def _embed_batch(backbone, params, model_state, batch):
  return backbone.apply(params, model_state, batch, False)[0]


def extract_text_features(backbone: Backbone, params: Params,
                          model_state: ModelState, ids: Any, *,
                          pad_id: int = 0, batch_size: int = 256,
                          multiple_of: int = 8) -> jax.Array:
  """Right-padded token ids `[M, L]` -> `[M, D]`, batched by length.

  Sequences are sorted by their unpadded length and each batch is cut to
  its longest sequence (rounded up to `multiple_of`), so short texts stop
  paying for the dataset's longest one (banking77 at L=64: 3.4x fewer
  tokens). Exact for encoders whose output ignores padding (`BertEncoder`
  masks it). Host-driven: one compiled program per distinct batch length.
  """
  ids = np.asarray(ids)
  num = ids.shape[0]
  lengths = (ids != pad_id).sum(axis=1)
  order = np.argsort(lengths, kind='stable')
  batch_size = max(1, min(batch_size, num))
  outputs = []
  for start in range(0, num, batch_size):
    rows = order[start:start + batch_size]
    width = min(ids.shape[1], max(1, -(-int(lengths[rows].max()) //
                                         multiple_of) * multiple_of))
    batch = np.full((batch_size, width), pad_id, ids.dtype)
    batch[:len(rows)] = ids[rows, :width]
    outputs.append(_embed_batch(backbone, params, model_state,
                                jnp.asarray(batch))[:len(rows)])
  features = jnp.concatenate(outputs)
  return features[jnp.asarray(np.argsort(order))]


def embed_inputs(backbone: Backbone, params: Params, model_state: ModelState,
                 inputs: Any, *, batch_size: int = 256) -> jax.Array:
  """Evaluation-mode features `[M, D]` of images (`extract_features`, one
  compiled call) or of token ids `[M, L]` (`extract_text_features`, with the
  backbone module's `pad_id`)."""
  if inputs.ndim == 2 and jnp.issubdtype(inputs.dtype, jnp.integer):
    return extract_text_features(
        backbone, params, model_state, inputs,
        pad_id=getattr(backbone.module, 'pad_id', 0), batch_size=batch_size)
  return _extract_jit(backbone, params, model_state, inputs, batch_size)


def embed_dataset(backbone: Backbone, params: Params,
                  model_state: ModelState, dataset: ClassDataset, *,
                  batch_size: int = 256, chunk: int = 4096,
                  what: str = 'embedding') -> ClassDataset:
  """`dataset` with each image replaced by its features `[M, D]` (float32).

  Evaluation-mode features, in host-driven chunks of `chunk` images (one
  compiled program: the last chunk is padded), so a split of any size fits
  in memory and long extractions log their progress. Classes, labels and
  groups are kept, so every sampler, objective and evaluator runs on the
  result as on images, with an `MLP` backbone (`widths=()`: the features
  themselves).
  """
  inputs = np.asarray(dataset.images)
  if dataset.is_text:
    features = np.asarray(embed_inputs(backbone, params, model_state,
                                       inputs, batch_size=batch_size))
  elif inputs.shape[0] == 0:  # an empty split: no features, the right width
    width = jax.eval_shape(lambda x: backbone.apply(
        params, model_state, x, False)[0], jnp.zeros((1, *inputs.shape[1:]),
                                                     inputs.dtype)).shape[-1]
    features = np.zeros((0, width), np.float32)
  else:
    num = inputs.shape[0]
    chunk = max(1, min(chunk, num))
    progress = Progress(num, what)
    parts = []
    for start in range(0, num, chunk):
      part = inputs[start:start + chunk]
      padded = np.zeros((chunk, *inputs.shape[1:]), inputs.dtype)
      padded[:len(part)] = part
      out = _extract_jit(backbone, params, model_state, jnp.asarray(padded),
                         min(batch_size, chunk))
      parts.append(np.asarray(out)[:len(part)])
      progress.update(start + len(part))
    features = np.concatenate(parts)
  return ClassDataset(features.astype(np.float32), dataset.labels,
                      dataset.class_names, dataset.class_groups)


def precompute(backbone: Backbone, params: Params, model_state: ModelState,
               data: DeviceDataset, *, batch_size: int = 256
               ) -> DeviceDataset:
  """`data` with its images replaced by their features `[M, D]` (float32).

  Episodes sampled from the result carry features where images were; run
  the algorithm with `fewshot.backbones.identity_backbone()` (and
  `{'backbone': {}}` in its meta-parameters) to evaluate it on them.
  """
  features = embed_inputs(backbone, params, model_state, data.images,
                          batch_size=batch_size)
  return data.replace(images=features.astype(jnp.float32))


def feature_inputs(backbone: Backbone, meta_params: dict[str, Any],
                   model_state: ModelState, data: DeviceDataset, *,
                   batch_size: int = 256
                   ) -> tuple[dict[str, Any], ModelState, DeviceDataset]:
  """A learner's inputs moved onto precomputed features.

  Returns:
    `(meta_params, model_state, data)` for the learner over
    `identity_backbone()`: its meta-parameters without the backbone's
    (`meta_params['backbone']` embeds the split), no model state, and the
    split as features `[M, D]`.
  """
  data = precompute(backbone, meta_params['backbone'], model_state, data,
                    batch_size=batch_size)
  return {**meta_params, 'backbone': {}}, {}, data


def on_features(make_algorithm: Callable[[Backbone], Algorithm],
                backbone: Backbone, meta_params: dict[str, Any],
                model_state: ModelState, data: DeviceDataset, *,
                batch_size: int = 256
                ) -> tuple[Algorithm, dict[str, Any], ModelState,
                           DeviceDataset]:
  """Moves a frozen-feature evaluation onto precomputed features.

  Args:
    make_algorithm: `backbone -> Algorithm`, the learner's factory.
    backbone, meta_params, model_state: the model as built, with the
      backbone's parameters under `meta_params['backbone']`.
    data: the split to evaluate.
    batch_size: images per feature-extraction batch.

  Returns:
    `(algorithm, meta_params, model_state, data)` to evaluate instead: the
    learner over `identity_backbone()` and `feature_inputs`'s inputs.
  """
  return (make_algorithm(identity_backbone()),
          *feature_inputs(backbone, meta_params, model_state, data,
                          batch_size=batch_size))


__all__ = ['FEATURE_ALGORITHMS', 'embed_dataset', 'embed_inputs', 'extract_features',
           'extract_text_features', 'feature_inputs',
           'on_features', 'precompute']
