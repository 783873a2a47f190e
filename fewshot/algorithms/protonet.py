"""Prototypical networks (Snell et al. 2017)."""

from __future__ import annotations

import jax.numpy as jnp

from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import Backbone
from fewshot.heads import cosine_similarities, prototypes, squared_distances

DISTANCES = ('sqeuclidean', 'cosine')


def protonet(backbone: Backbone, *, distance: str = 'sqeuclidean',
             init_scale: float = 10.0) -> Algorithm:
  """Prototypical networks on a backbone.

  Args:
    backbone: the embedding `images -> features [B, D]`.
    distance: 'sqeuclidean' (logits are negative squared distances to the
      prototypes) or 'cosine' (logits are a learned scale times the cosine
      similarity; the scale starts at `init_scale`).
    init_scale: initial cosine temperature; unused for 'sqeuclidean'.

  Returns:
    An `Algorithm`; its task parameters are `{'prototypes': [N, D]}`.
  """
  if distance not in DISTANCES:
    raise ValueError(f'distance must be one of {DISTANCES}, got {distance!r}.')

  def init(key, sample_images):
    params, model_state = backbone.init(key, sample_images)
    meta_params = {'backbone': params}
    if distance == 'cosine':
      meta_params['log_scale'] = jnp.log(jnp.asarray(init_scale, jnp.float32))
    return meta_params, model_state

  def adapt(meta_params, model_state, episode, key, train):
    del key  # ProtoNet adaptation is deterministic.
    embeddings, model_state = backbone.apply(
        meta_params['backbone'], model_state, episode.support_images, train)
    protos = prototypes(embeddings, episode.support_labels, episode.num_ways)
    return {'prototypes': protos}, model_state

  def predict(meta_params, model_state, task_params, images, train):
    embeddings, model_state = backbone.apply(
        meta_params['backbone'], model_state, images, train)
    protos = task_params['prototypes']
    if distance == 'cosine':
      logits = jnp.exp(meta_params['log_scale']) * cosine_similarities(
          embeddings, protos)
    else:
      logits = -squared_distances(embeddings, protos)
    return logits, model_state

  return Algorithm(init=init, adapt=adapt, predict=predict)
