"""Metric learning: an embedding trained with a metric loss on P x K batches.

The network is a backbone (from scratch or pretrained) and an optional
projection head; the loss is any of `fewshot.metric.LOSSES`, optionally
after a miner. Parameters are `{'backbone', 'projection', 'loss'}`: the
loss's own parameters (proxies, ArcFace's class weights) are trained and
checkpointed with the network, and `backbone` alone starts another config
(`backbone.weights=<workdir>`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fewshot._utils import check_options
from fewshot.backbones.base import Backbone, ModelState, Params
from fewshot.data.augment import crop_and_flip
from fewshot.data.batches import LabelledImages
from fewshot.data.sampling import DeviceDataset, sample_class_balanced
from fewshot.heads import init_head, linear_logits
from fewshot.metric import metric_loss
from fewshot.objectives.base import Objective

PROJECTIONS = ('none', 'linear', 'mlp')
DEFAULT_EMBEDDING_DIM = 128


def _init_projection(key, feature_dim: int, embedding_dim: int, kind: str):
  if kind == 'linear':
    return {'output': init_head(key, feature_dim, embedding_dim)}
  hidden_key, output_key = jax.random.split(key)
  return {'hidden': init_head(hidden_key, feature_dim, feature_dim),
          'output': init_head(output_key, feature_dim, embedding_dim)}


def _project(projection: Params, features_BxD: jax.Array) -> jax.Array:
  if 'hidden' in projection:
    features_BxD = jax.nn.relu(linear_logits(features_BxD,
                                             projection['hidden']))
  return linear_logits(features_BxD, projection['output'])


def metric_embedder(backbone: Backbone, projection: str = 'linear',
                    embedding_dim: int | None = None) -> Backbone:
  """`backbone` followed by a projection head, as one `Backbone`.

  Its parameters are `{'backbone': ..., 'projection': ...}` (no
  `projection` for 'none'). 'linear' maps the features to `embedding_dim`
  (default 128); 'mlp' is SimCLR's Linear-ReLU-Linear head.
  """
  if projection not in PROJECTIONS:
    raise ValueError(f'Unknown projection {projection!r}; known: '
                     f'{PROJECTIONS}.')
  if projection != 'none' and embedding_dim is None:
    embedding_dim = DEFAULT_EMBEDDING_DIM
  if projection == 'none':
    if embedding_dim is not None:
      raise ValueError("embedding_dim needs a projection ('linear' or 'mlp'); "
                       "with projection='none' the embedding is the "
                       "backbone's features.")
  elif embedding_dim is None or embedding_dim < 1:
    raise ValueError(f'projection={projection!r} needs embedding_dim >= 1, '
                     f'got {embedding_dim}.')

  def init(key: jax.Array, images: jax.Array) -> tuple[Params, ModelState]:
    backbone_key, projection_key = jax.random.split(key)
    params, model_state = backbone.init(backbone_key, images)
    if projection == 'none':
      return {'backbone': params}, model_state
    features = jax.eval_shape(
        lambda: backbone.apply(params, model_state, images, False)[0])
    return {'backbone': params,
            'projection': _init_projection(projection_key,
                                           features.shape[-1], embedding_dim,
                                           projection)}, model_state

  def apply(params: Params, model_state: ModelState, images: jax.Array,
            train: bool) -> tuple[jax.Array, ModelState]:
    features, model_state = backbone.apply(params['backbone'], model_state,
                                           images, train)
    if 'projection' in params:
      features = _project(params['projection'], features)
    return features, model_state

  return Backbone(init=init, apply=apply, module=backbone.module)


def embedder_params(params: Params) -> Params:
  """The `metric_embedder`'s parameters within a metric objective's."""
  return {k: params[k] for k in ('backbone', 'projection') if k in params}


def metric(backbone: Backbone, *, num_classes: int, loss: str,
           classes_per_batch: int, images_per_class: int,
           projection: str = 'linear', embedding_dim: int | None = None,
           distance: str | None = None,
           loss_options: Mapping[str, Any] | None = None,
           miner: str | None = None,
           miner_options: Mapping[str, Any] | None = None,
           augment: Mapping[str, Any] | None = None) -> Objective:
  """A metric loss on `P x K` class-balanced batches of embedded images.

  Each step draws `classes_per_batch` (P) training classes and
  `images_per_class` (K) images of each from the step key
  (`fewshot.data.sampling.sample_class_balanced`), augments them, embeds
  them with `metric_embedder(backbone, projection, embedding_dim)` and
  applies `fewshot.metric.metric_loss(loss, distance=..., miner=...,
  **loss_options)` with the images' dataset class ids as labels.

  Args:
    backbone: the feature extractor being trained.
    num_classes: the training classes (the proxies / class weights).
    loss: a key of `fewshot.metric.LOSSES`.
    classes_per_batch, images_per_class: P and K.
    projection: 'none', 'linear' or 'mlp' (see `metric_embedder`).
    embedding_dim: the projection's output size (default 128).
    distance: the loss's distance ('euclidean', 'squared', 'cosine').
    loss_options, miner, miner_options: see `fewshot.metric.metric_loss`.
    augment: keyword arguments of `fewshot.data.augment.crop_and_flip`.
  """
  augment = dict(augment or {})
  check_options(crop_and_flip, augment, 'the objective\'s augment')
  embedder = metric_embedder(backbone, projection, embedding_dim)
  metric = metric_loss(loss, distance=distance, miner=miner,
                       miner_options=miner_options, **dict(loss_options or {}))

  def init(key, data: DeviceDataset):
    network_key, loss_key, run_key = jax.random.split(key, 3)
    sample_images = jnp.asarray(data.images[:2])
    params, model_state = embedder.init(network_key, sample_images)
    embeddings = jax.eval_shape(
        lambda: embedder.apply(params, model_state, sample_images, False)[0])
    params['loss'] = metric.init(loss_key, num_classes, embeddings.shape[-1])
    return params, model_state, run_key

  def sample(run_key, step, data: DeviceDataset) -> LabelledImages:
    sample_key, augment_key = jax.random.split(jax.random.fold_in(run_key,
                                                                  step))
    images, labels = sample_class_balanced(sample_key, data,
                                           classes_per_batch, images_per_class)
    if augment:
      images = crop_and_flip(augment_key, images, **augment)
    return LabelledImages(images=images, labels=labels)

  def batch_loss(params, model_state, batch: LabelledImages, key):
    del key  # deterministic given the batch
    embeddings, model_state = embedder.apply(embedder_params(params),
                                             model_state, batch.images, True)
    value = metric.apply(params['loss'], embeddings, batch.labels)
    return value, ({'loss': value}, model_state)

  return Objective(init=init, sample=sample, loss=batch_loss, unit='images',
                   batch_size_name='classes_per_batch x images_per_class')


__all__ = ['PROJECTIONS', 'embedder_params', 'metric', 'metric_embedder']
