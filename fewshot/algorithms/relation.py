"""Relation networks (Sung et al. 2018): a learned similarity on feature maps.

The embedding module maps images to feature maps (Conv-4 with only its
first two blocks pooled keeps 7x7x64 maps of 28x28 images); a class is the
sum of its support maps; the relation module (two conv blocks and two
dense layers) scores each (query, class) pair from their maps concatenated
along the channels. The paper trains the sigmoid score against the one-hot
label with a squared error (`loss='mse'`); `loss='cross_entropy'` uses the
query cross-entropy of the scores instead. The relation module's BatchNorm
always normalises with the statistics of the episode's pairs, in evaluation
too (as the authors' code runs it), so a query's scores depend on the other
queries of its episode.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fewshot.algorithms.base import Algorithm
from fewshot.backbones import layers
from fewshot.backbones.base import Backbone
from fewshot.backbones.conv4 import BatchStatNorm

LOSSES = ('mse', 'cross_entropy')


class RelationModule(nn.Module):
  """`[P, h, w, 2C]` pair maps -> `[P]` relation scores (pre-sigmoid)."""
  filters: int = 64
  hidden: int = 8

  @nn.compact
  def __call__(self, pairs: jax.Array) -> jax.Array:
    x = pairs
    for block in range(2):
      x = layers.Conv(self.filters, use_bias=False, name=f'conv{block}')(x)
      x = nn.relu(BatchStatNorm(name=f'norm{block}')(x))
      if min(x.shape[1:3]) >= 2:
        x = layers.max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name='hidden')(x))
    return nn.Dense(1, name='score')(x)[:, 0]


def _maps(features_BxF: jax.Array, channels: int) -> jax.Array:
  """Flattened `[B, h*w*C]` features back to square `[B, h, w, C]` maps."""
  side = math.isqrt(features_BxF.shape[-1] // channels)
  if side * side * channels != features_BxF.shape[-1]:
    raise ValueError(
        f'Relation networks need square feature maps of {channels} channels; '
        f'the backbone gives {features_BxF.shape[-1]} features. Use a '
        "backbone that keeps maps (conv4 with pooled_blocks=2) and set "
        "'channels' to its filters.")
  return features_BxF.reshape(features_BxF.shape[0], side, side, channels)


def relation_net(backbone: Backbone, *, channels: int = 64,
                 relation_filters: int = 64, hidden: int = 8,
                 loss: str = 'mse') -> Algorithm:
  """Relation networks on a backbone that returns flattened feature maps.

  Args:
    backbone: the embedding module; its features are `[B, h*w*channels]`.
    channels: the channels of its feature maps.
    relation_filters, hidden: the relation module's conv width and dense
      layer size (64 and 8 in the paper).
    loss: 'mse' (the paper) or 'cross_entropy'.

  Returns:
    An `Algorithm` with meta-parameters `{'backbone', 'relation'}`; its
    logits are the `[N*Q, N]` relation scores before the sigmoid.
  """
  if loss not in LOSSES:
    raise ValueError(f'Unknown relation loss {loss!r}; known: {LOSSES}.')
  module = RelationModule(relation_filters, hidden)

  def init(key, sample_images):
    backbone_key, relation_key = jax.random.split(key)
    params, model_state = backbone.init(backbone_key, sample_images)
    features = jax.eval_shape(
        lambda: backbone.apply(params, model_state, sample_images, False)[0])
    maps = jax.eval_shape(lambda: _maps(jnp.zeros(features.shape), channels))
    pairs = jnp.zeros((2, *maps.shape[1:3], 2 * channels))
    relation = module.init(relation_key, pairs)['params']
    return {'backbone': params, 'relation': relation}, model_state

  def adapt(meta_params, model_state, episode, key, train):
    del key
    features, model_state = backbone.apply(
        meta_params['backbone'], model_state, episode.support_images, train)
    maps = _maps(features, channels)
    one_hot = jax.nn.one_hot(episode.support_labels, episode.num_ways,
                             dtype=maps.dtype)
    # The paper sums a class's support maps (one map at one shot).
    classes = jnp.einsum('bn,bhwc->nhwc', one_hot, maps)
    return {'classes': classes}, model_state

  def predict(meta_params, model_state, task_params, images, train):
    features, model_state = backbone.apply(
        meta_params['backbone'], model_state, images, train)
    queries = _maps(features, channels)                       # [B, h, w, C]
    classes = task_params['classes']                          # [N, h, w, C]
    num_queries, num_ways = queries.shape[0], classes.shape[0]
    pairs = jnp.concatenate([
        jnp.repeat(queries, num_ways, axis=0),
        jnp.tile(classes, (num_queries, 1, 1, 1))], axis=-1)
    scores = module.apply({'params': meta_params['relation']}, pairs)
    return scores.reshape(num_queries, num_ways), model_state

  def squared_error(logits, labels):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    return jnp.mean(jnp.sum(jnp.square(jax.nn.sigmoid(logits) - targets), -1))

  def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()

  return Algorithm(init=init, adapt=adapt, predict=predict,
                   query_loss=squared_error if loss == 'mse' else cross_entropy)


__all__ = ['LOSSES', 'RelationModule', 'relation_net']
