"""Prototypical networks against naive references and few-shot invariances."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot.algorithms import protonet
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.heads import cosine_similarities, prototypes, squared_distances
from fewshot.losses import query_logits


def test_prototypes_match_a_naive_loop():
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(12, 7)).astype(np.float32)
  labels = rng.permutation(np.repeat(np.arange(4), 3))
  expected = np.stack([
      np.mean([e for e, l in zip(embeddings, labels) if l == c], axis=0)
      for c in range(4)])
  np.testing.assert_allclose(prototypes(embeddings, labels, 4), expected,
                             rtol=1e-5, atol=1e-6)


def test_distances_match_a_naive_loop():
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(9, 5)).astype(np.float32)
  protos = rng.normal(size=(3, 5)).astype(np.float32)
  sq = np.array([[np.sum((q - p) ** 2) for p in protos] for q in queries])
  cos = np.array([[q @ p / np.linalg.norm(q) / np.linalg.norm(p)
                   for p in protos] for q in queries])
  np.testing.assert_allclose(squared_distances(queries, protos), sq,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cosine_similarities(queries, protos), cos,
                             rtol=1e-5, atol=1e-5)


def _setup(norm, distance='sqeuclidean'):
  splits = synthetic_splits(num_classes=(8, 2, 2), images_per_class=6)
  data = sampling.to_device(splits['train'])
  episode = sampling.sample_episode(jax.random.key(0), data,
                                    sampling.EpisodeSpec(4, 3, 2))
  # Two conv blocks: half the distinct layer shapes to compile, and none of
  # these properties depends on the depth.
  algorithm = protonet(backbones.create('conv4', filters=8, norm=norm,
                                        num_blocks=2), distance=distance)
  params, state = algorithm.init(jax.random.key(1), episode.support_images)
  return algorithm, params, state, episode


@pytest.mark.parametrize('norm', ['batch', 'batch_running', 'none'])
@pytest.mark.parametrize('distance', ['sqeuclidean', 'cosine'])
def test_support_permutation_and_relabelling(norm, distance):
  algorithm, params, state, episode = _setup(norm, distance)
  logits, _ = query_logits(algorithm, params, state, episode,
                           jax.random.key(2), train=False)
  chex.assert_shape(logits, (8, 4))
  # Shuffling the support set leaves the logits unchanged.
  perm = np.random.default_rng(0).permutation(12)
  shuffled = episode.replace(support_images=episode.support_images[perm],
                             support_labels=episode.support_labels[perm])
  logits_shuffled, _ = query_logits(algorithm, params, state, shuffled,
                                    jax.random.key(2), train=False)
  np.testing.assert_allclose(logits_shuffled, logits, rtol=1e-4, atol=1e-4)
  # Relabelling the classes permutes the logit columns the same way.
  relabel = np.array([2, 0, 3, 1])
  relabelled = episode.replace(support_labels=relabel[episode.support_labels],
                               query_labels=relabel[episode.query_labels])
  logits_relabelled, _ = query_logits(algorithm, params, state, relabelled,
                                      jax.random.key(2), train=False)
  np.testing.assert_allclose(logits_relabelled[:, relabel], logits,
                             rtol=1e-4, atol=1e-4)


def test_adapt_and_predict_jit_and_agree():
  algorithm, params, state, episode = _setup('batch_running')
  eager, _ = query_logits(algorithm, params, state, episode,
                          jax.random.key(0), train=False)
  jitted, _ = jax.jit(query_logits, static_argnums=(0, 5))(
      algorithm, params, state, episode, jax.random.key(0), False)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_training_mode_updates_running_statistics_only_when_training():
  algorithm, params, state, episode = _setup('batch_running')
  _, eval_state = query_logits(algorithm, params, state, episode,
                               jax.random.key(0), train=False)
  _, train_state = query_logits(algorithm, params, state, episode,
                                jax.random.key(0), train=True)
  jax.tree.map(np.testing.assert_array_equal, eval_state, state)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), train_state, state)
  assert all(jax.tree.leaves(moved))


def test_cosine_scale_is_a_learned_meta_parameter():
  algorithm, params, state, episode = _setup('batch', 'cosine')

  def loss(p):
    logits, _ = query_logits(algorithm, p, state, episode, jax.random.key(0),
                             train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8),
                                                episode.query_labels])

  grads = jax.jit(jax.grad(loss))(params)  # one program, not op by op
  assert float(jnp.abs(grads['log_scale'])) > 0


def test_rejects_unknown_distance_and_bad_image_rank():
  with pytest.raises(ValueError, match='distance must be one of'):
    protonet(backbones.create('conv4'), distance='manhattan')
  algorithm, params, state, episode = _setup('batch')
  bad = episode.replace(support_images=episode.support_images[..., 0])
  with pytest.raises(ValueError, match=r'expects images \[B, H, W, C\]'):
    query_logits(algorithm, params, state, bad, jax.random.key(0), False)
