"""Matching and relation networks against naive per-query, per-pair loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot.algorithms import matching_net, relation_net
from fewshot.backbones.base import identity_backbone
from fewshot.episodes import Episode, episode_labels
from fewshot.losses import episode_loss, query_logits

N, K, Q = 3, 2, 2


def _episode(shape, seed=0):
  rng = np.random.default_rng(seed)
  return Episode(
      support_images=rng.normal(size=(N * K, *shape)).astype(np.float32),
      support_labels=episode_labels(N, K),
      query_images=rng.normal(size=(N * Q, *shape)).astype(np.float32),
      query_labels=episode_labels(N, Q),
      class_ids=jnp.arange(N), num_ways=N)


def test_matching_logits_are_the_log_attention_mass_of_each_class():
  episode = _episode((5,))
  algorithm = matching_net(identity_backbone(), init_scale=3.0)
  params, state = algorithm.init(jax.random.key(0), episode.support_images)
  logits, _ = query_logits(algorithm, params, state, episode,
                           jax.random.key(1), train=False)
  support = np.asarray(episode.support_images)
  labels = np.asarray(episode.support_labels)
  for q, x in enumerate(np.asarray(episode.query_images)):
    cos = support @ x / np.linalg.norm(support, axis=1) / np.linalg.norm(x)
    attention = np.exp(3.0 * cos) / np.exp(3.0 * cos).sum()
    expected = [attention[labels == n].sum() for n in range(N)]
    np.testing.assert_allclose(np.exp(logits[q]), expected, rtol=1e-5)


def test_relation_scores_each_query_class_pair_from_summed_support_maps():
  episode = _episode((3 * 3 * 4,))
  algorithm = relation_net(identity_backbone(), channels=4,
                           relation_filters=4, hidden=3)
  params, state = algorithm.init(jax.random.key(0), episode.support_images)
  task, _ = algorithm.adapt(params, state, episode, jax.random.key(1), False)
  logits, _ = algorithm.predict(params, state, task, episode.query_images,
                                False)
  maps = np.asarray(episode.support_images).reshape(N * K, 3, 3, 4)
  classes = np.stack([maps[np.asarray(episode.support_labels) == n].sum(0)
                      for n in range(N)])
  np.testing.assert_allclose(task['classes'], classes, rtol=1e-5)
  from fewshot.algorithms.relation import RelationModule  # pylint: disable=g-import-not-at-top
  module = RelationModule(4, 3)
  queries = np.asarray(episode.query_images).reshape(N * Q, 3, 3, 4)
  # The relation module normalises with the statistics of all N*Q*N pairs
  # it is given, so the naive loop scores the same set of pairs, one
  # (query, class) at a time read back from the result.
  pairs = np.stack([np.concatenate([queries[q], classes[n]], -1)
                    for q in range(N * Q) for n in range(N)])
  scores = module.apply({'params': params['relation']}, pairs)
  np.testing.assert_allclose(logits, np.asarray(scores).reshape(N * Q, N),
                             rtol=1e-5, atol=1e-6)
  loss, _ = episode_loss(algorithm, params, state, episode, jax.random.key(2))
  targets = np.eye(N)[np.asarray(episode.query_labels)]
  expected = np.mean(np.sum((1 / (1 + np.exp(-np.asarray(logits)))
                             - targets) ** 2, -1))
  assert np.isclose(float(loss), expected, rtol=1e-5)


def test_relation_needs_square_maps_and_conv4_keeps_them_unpooled():
  with pytest.raises(ValueError, match='square feature maps of 4 channels'):
    episode = _episode((10,))
    relation_net(identity_backbone(), channels=4).init(
        jax.random.key(0), episode.support_images)
  images = jnp.zeros((2, 28, 28, 1), jnp.uint8)
  kept = backbones.create('conv4', filters=8, pooled_blocks=2)
  params, state = kept.init(jax.random.key(0), images)
  assert kept.apply(params, state, images, False)[0].shape == (2, 7 * 7 * 8)
  pooled = backbones.create('conv4', filters=8)
  same_params, _ = pooled.init(jax.random.key(0), images)
  assert jax.tree.map(jnp.shape, same_params) == jax.tree.map(jnp.shape,
                                                              params)
  assert pooled.apply(same_params, state, images, False)[0].shape == (2, 8)


def _naive_lstm(params, h, c, x):
  z = np.concatenate([x, h]) @ params['kernel'] + params['bias']
  i, f, g, o = np.split(z, 4)
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
  return sigmoid(o) * np.tanh(c), c


def test_full_context_embeddings_follow_the_papers_equations():
  episode = _episode((4,))
  algorithm = matching_net(identity_backbone(), init_scale=2.0, fce=True,
                           fce_steps=3)
  params, state = algorithm.init(jax.random.key(0), episode.support_images)
  task, _ = algorithm.adapt(params, state, episode, jax.random.key(1), False)
  logits, _ = algorithm.predict(params, state, task, episode.query_images,
                                False)
  fce = jax.tree.map(np.asarray, params['fce'])
  support = np.asarray(episode.support_images)
  zero = np.zeros(4)
  forward, backward, (h, c) = [], [None] * len(support), (zero, zero)
  for x in support:                       # the bidirectional LSTM, by hand
    h, c = _naive_lstm(fce['support_forward'], h, c, x)
    forward.append(h)
  h, c = zero, zero
  for i in reversed(range(len(support))):
    h, c = _naive_lstm(fce['support_backward'], h, c, support[i])
    backward[i] = h
  g = support + np.stack(forward) + np.stack(backward)
  np.testing.assert_allclose(task['support'], g, rtol=1e-5, atol=1e-6)
  labels = np.asarray(episode.support_labels)
  for q, x in enumerate(np.asarray(episode.query_images)):
    h, c, read = zero, zero, g.mean(0)    # the attention LSTM, K = 3 steps
    for _ in range(3):
      h, c = _naive_lstm(fce['query'], h, c, np.concatenate([x, read]))
      h = h + x
      a = np.exp(g @ h) / np.exp(g @ h).sum()
      read = a @ g
    cos = g @ h / np.linalg.norm(g, axis=1) / np.linalg.norm(h)
    attention = np.exp(2.0 * cos) / np.exp(2.0 * cos).sum()
    expected = [attention[labels == n].sum() for n in range(N)]
    np.testing.assert_allclose(np.exp(logits[q]), expected, rtol=1e-4)
  # With zero LSTM weights the embeddings are the backbone's again.
  zeroed = dict(params, fce=jax.tree.map(jnp.zeros_like, params['fce']))
  plain = matching_net(identity_backbone(), init_scale=2.0)
  want, _ = query_logits(plain, {'backbone': {}, 'log_scale':
                                 params['log_scale']}, state, episode,
                         jax.random.key(1), train=False)
  got, _ = query_logits(algorithm, zeroed, state, episode, jax.random.key(1),
                        train=False)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
