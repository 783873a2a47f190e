"""Matching networks (Vinyals et al. 2016): attention over the support set.

A query's class distribution is the softmax-attention-weighted sum of the
support labels, the attention being the cosine similarity of embeddings:
`p(n | x) = sum_{i: y_i = n} softmax_i(s * cos(f(x), g(x_i)))`. The logits
returned are `log p(n | x)` (a logsumexp over each class's support
images), so the generic query cross-entropy is the paper's loss.
Here f = g (the embedding without full-context embeddings); the
temperature `s` is learned from `init_scale` unless `learn_scale=False`,
and `init_scale=1, learn_scale=False` is the paper's raw cosine attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import Backbone
from fewshot.heads import cosine_similarities


def matching_net(backbone: Backbone, *, init_scale: float = 10.0,
                 learn_scale: bool = True) -> Algorithm:
  """Matching networks on a backbone.

  Args:
    backbone: the embedding `images -> features [B, D]` of support and
      queries.
    init_scale: the attention's initial inverse temperature.
    learn_scale: train the temperature (`meta_params['log_scale']`).

  Returns:
    An `Algorithm`; its task parameters are the support embeddings
    `[N*K, D]` and labels.
  """

  def init(key, sample_images):
    params, model_state = backbone.init(key, sample_images)
    meta_params = {'backbone': params}
    if learn_scale:
      meta_params['log_scale'] = jnp.log(jnp.asarray(init_scale, jnp.float32))
    return meta_params, model_state

  def adapt(meta_params, model_state, episode, key, train):
    del key
    embeddings, model_state = backbone.apply(
        meta_params['backbone'], model_state, episode.support_images, train)
    return {'support': embeddings,
            'labels': jax.nn.one_hot(episode.support_labels,
                                     episode.num_ways, dtype=bool)}, model_state

  def predict(meta_params, model_state, task_params, images, train):
    embeddings, model_state = backbone.apply(
        meta_params['backbone'], model_state, images, train)
    scale = (jnp.exp(meta_params['log_scale']) if learn_scale
             else jnp.asarray(init_scale, jnp.float32))
    attention = scale * cosine_similarities(embeddings,
                                            task_params['support'])  # [B, NK]
    log_weights = jax.nn.log_softmax(attention, axis=-1)
    # log p(n | x): logsumexp of the attention log-weights of class n.
    in_class = task_params['labels'][None, :, :]                     # [1,NK,N]
    logits = jax.nn.logsumexp(
        jnp.where(in_class, log_weights[:, :, None], -jnp.inf), axis=1)
    return logits, model_state

  return Algorithm(init=init, adapt=adapt, predict=predict)


__all__ = ['matching_net']
