"""Linear probes, SimpleShot, Baseline++ and fine-tuning against references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot.algorithms import baselines
from fewshot.backbones.base import Backbone
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.episodes import Episode
from fewshot.evaluators import episode_accuracies
from fewshot.losses import episode_loss, query_logits


def _feature_backbone() -> Backbone:
  """Images `[B, 1, 1, D]` are the features, times a learnable scale."""

  def init(key, images):
    del key, images
    return {'scale': jnp.ones([], jnp.float32)}, {}

  def apply(params, model_state, images, train):
    del train
    return images.reshape(images.shape[0], -1) * params['scale'], model_state

  return Backbone(init=init, apply=apply, module=None)


def _feature_episode(features, labels, num_ways, queries=None,
                     query_labels=None) -> Episode:
  """An episode whose 'images' are feature vectors (queries = support)."""
  features = jnp.asarray(features, jnp.float32)[:, None, None, :]
  queries = features if queries is None else jnp.asarray(
      queries, jnp.float32)[:, None, None, :]
  return Episode(support_images=features,
                 support_labels=jnp.asarray(labels, jnp.int32),
                 query_images=queries,
                 query_labels=jnp.asarray(
                     labels if query_labels is None else query_labels,
                     jnp.int32),
                 class_ids=jnp.arange(num_ways, dtype=jnp.int32),
                 num_ways=num_ways)


def _separable(num_ways=4, shots=5, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_ways, dim)) * 3.0
  labels = np.repeat(np.arange(num_ways), shots)
  features = centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))
  return features.astype(np.float32), labels


def _logits(algorithm, episode, meta_params=None, state=None):
  if meta_params is None:
    meta_params, state = algorithm.init(jax.random.key(0),
                                        episode.support_images)
  logits, _ = _jit_query_logits(algorithm, meta_params, state, episode,
                                jax.random.key(1), False)
  return logits


# One compiled program per test case is far cheaper than eager dispatch.
_jit_query_logits = jax.jit(query_logits, static_argnums=(0, 5))


@pytest.mark.parametrize('solver,init', [('ridge', 'zeros'),
                                         ('logistic', 'zeros'),
                                         ('logistic', 'prototypes')])
def test_probes_fit_separable_support_perfectly(solver, init):
  # High-dimensional (dual ridge) and low-dimensional (primal ridge) features.
  for dim in (64, 6):
    features, labels = _separable(dim=dim)
    algorithm = baselines.linear_probe(_feature_backbone(), solver=solver,
                                       init=init)
    logits = _logits(algorithm, _feature_episode(features, labels, 4))
    np.testing.assert_array_equal(np.argmax(logits, -1), labels)


def test_ridge_matches_lstsq_and_dual_equals_primal():
  rng = np.random.default_rng(1)
  for num_samples, dim in ((8, 20), (20, 8)):
    features = rng.normal(size=(num_samples, dim)).astype(np.float32)
    targets = np.eye(4, dtype=np.float32)[rng.integers(0, 4, num_samples)]
    l2 = 0.7
    # Ridge is least squares on [X; sqrt(l2) I] W = [Y; 0].
    stacked_x = np.concatenate([features, np.sqrt(l2) * np.eye(dim)]).astype(
        np.float64)
    stacked_y = np.concatenate([targets, np.zeros((dim, 4))])
    expected = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
    for form in ('primal', 'dual', 'auto'):
      np.testing.assert_allclose(
          baselines.ridge_weights(features, targets, l2, form), expected,
          rtol=1e-4, atol=1e-4)


def test_ridge_probe_logits_match_numpy():
  features, labels = _separable(num_ways=3, shots=2, dim=10, seed=2)
  queries = np.random.default_rng(3).normal(size=(5, 10)).astype(np.float32)
  l2 = 0.5
  algorithm = baselines.linear_probe(_feature_backbone(), l2=l2,
                                     init_scale=3.0)
  episode = _feature_episode(features, labels, 3, queries, np.zeros(5))
  normalise = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  with_bias = lambda x: np.concatenate([normalise(x), np.ones((len(x), 1))], 1)
  x = with_bias(features.astype(np.float64))
  weights = np.linalg.solve(x.T @ x + l2 * np.eye(11), x.T @ np.eye(3)[labels])
  expected = 3.0 * with_bias(queries.astype(np.float64)) @ weights
  np.testing.assert_allclose(_logits(algorithm, episode), expected,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('centering', ['support', 'base', 'none'])
def test_simpleshot_matches_numpy(centering):
  rng = np.random.default_rng(4)
  features = rng.normal(size=(6, 5)).astype(np.float32) + 1.0
  labels = np.array([0, 1, 2, 0, 1, 2])
  queries = rng.normal(size=(4, 5)).astype(np.float32)
  base_mean = rng.normal(size=5).astype(np.float32)
  algorithm = baselines.simpleshot(_feature_backbone(), centering=centering,
                                   base_mean=base_mean)
  episode = _feature_episode(features, labels, 3, queries, np.zeros(4))
  mean = {'support': features.mean(0), 'base': base_mean,
          'none': np.zeros(5)}[centering]
  cl2n = lambda x: (x - mean) / np.linalg.norm(x - mean, axis=-1,
                                               keepdims=True)
  centroids = np.stack([cl2n(features)[labels == c].mean(0) for c in range(3)])
  expected = -np.array([[np.sum((q - c) ** 2) for c in centroids]
                        for q in cl2n(queries)])
  np.testing.assert_allclose(_logits(algorithm, episode), expected,
                             rtol=1e-4, atol=1e-4)


def test_feature_mean_matches_numpy_with_a_partial_batch():
  images = np.random.default_rng(5).normal(size=(7, 1, 1, 3)).astype(
      np.float32)
  backbone = _feature_backbone()
  params, state = backbone.init(None, images)
  mean = jax.jit(functools.partial(baselines.feature_mean, backbone,
                                   batch_size=3))(params, state, images)
  np.testing.assert_allclose(mean, images.reshape(7, 3).mean(0), rtol=1e-5,
                             atol=1e-6)


def test_baseline_pp_is_invariant_to_feature_scale():
  features, labels = _separable(num_ways=3, shots=3, dim=8, seed=6)
  queries = np.random.default_rng(7).normal(size=(6, 8))
  algorithm = baselines.baseline_pp(_feature_backbone(), steps=10)
  episode = _feature_episode(features, labels, 3, queries, np.zeros(6))
  meta_params, state = algorithm.init(jax.random.key(0),
                                      episode.support_images)
  logits = _logits(algorithm, episode, meta_params, state)
  scaled = {'backbone': {'scale': jnp.asarray(7.3, jnp.float32)}}
  np.testing.assert_allclose(_logits(algorithm, episode, scaled, state),
                             logits, rtol=1e-4, atol=1e-4)
  # Fine-tuning changed the classifier (logits differ from zero steps).
  untrained = _logits(baselines.baseline_pp(_feature_backbone(), steps=0),
                      episode, meta_params, state)
  assert not np.allclose(untrained, logits, atol=1e-3)


def test_prototype_initialised_heads_start_as_nearest_centroid():
  features, labels = _separable(num_ways=3, shots=2, dim=7, seed=8)
  queries = np.random.default_rng(9).normal(size=(5, 7))
  episode = _feature_episode(features, labels, 3, queries, np.zeros(5))
  nearest = _logits(baselines.simpleshot(_feature_backbone(),
                                         centering='none'), episode)
  # Unit-norm features: the head's logits are -||f - p||^2 + ||f||^2 = +1.
  for algorithm in (
      baselines.fine_tune(_feature_backbone(), steps=0),
      baselines.linear_probe(_feature_backbone(), solver='logistic', steps=0,
                             init='prototypes')):
    np.testing.assert_allclose(_logits(algorithm, episode) - 1.0, nearest,
                               rtol=1e-5, atol=1e-5)


def test_fine_tuning_lowers_the_support_loss():
  features, labels = _separable(num_ways=3, shots=3, dim=6, seed=11)
  features = features + np.random.default_rng(12).normal(
      size=features.shape).astype(np.float32) * 3.0  # overlapping classes
  episode = _feature_episode(features, labels, 3)  # queries = support
  losses = []
  for steps in (0, 30):
    algorithm = baselines.fine_tune(_feature_backbone(), steps=steps,
                                    head_learning_rate=0.1)
    meta_params, state = algorithm.init(jax.random.key(0),
                                        episode.support_images)
    losses.append(float(jax.jit(functools.partial(
        episode_loss, algorithm))(meta_params, state, episode,
                                  jax.random.key(0))[0]))
  assert losses[1] < 0.5 * losses[0]


def test_freeze_backbone_stops_meta_gradients():
  features, labels = _separable(num_ways=3, shots=2, dim=12, seed=10)
  episode = _feature_episode(features, labels, 3)
  for freeze_backbone, expect_zero in ((True, True), (False, False)):
    algorithm = baselines.linear_probe(_feature_backbone(),
                                       freeze_backbone=freeze_backbone,
                                       normalize=False)
    meta_params, state = algorithm.init(jax.random.key(0),
                                        episode.support_images)
    grads = jax.jit(jax.grad(lambda p: episode_loss(
        algorithm, p, state, episode, jax.random.key(0))[0]))(meta_params)
    assert (float(jnp.abs(grads['backbone']['scale'])) == 0.0) == expect_zero
    assert float(jnp.abs(grads['log_scale'])) > 0.0


def _small_conv4_episode():
  """A 3-way 2-shot episode of 16x16 images and a two-block Conv-4."""
  splits = synthetic_splits(num_classes=(4, 1, 1), images_per_class=4,
                            image_size=16)
  data = sampling.to_device(splits['train'])
  episode = sampling.sample_episode(jax.random.key(0), data,
                                    sampling.EpisodeSpec(3, 2, 1))
  backbone = backbones.create('conv4', filters=8, norm='batch_running',
                              num_blocks=2)
  return episode, backbone


def test_fine_tune_keeps_frozen_backbone_bit_identical():
  episode, backbone = _small_conv4_episode()
  meta_params, state = backbone.init(jax.random.key(1), episode.support_images)
  meta_params = {'backbone': meta_params}
  algorithm = baselines.fine_tune(backbone, steps=3, l2sp=0.1, head_l2=0.01,
                                  trainable=('head', 'backbone/conv1'))
  task_params, _ = jax.jit(algorithm.adapt, static_argnums=4)(
      meta_params, state, episode, jax.random.key(0), False)
  bits = lambda x: np.asarray(x).view(np.uint32)
  for name, before in meta_params['backbone'].items():
    for leaf, value in before.items():
      same = np.array_equal(bits(task_params['backbone'][name][leaf]),
                            bits(value))
      assert same == (name != 'conv1'), (name, leaf)


def test_fine_tune_gradual_unfreezing_trains_the_head_first():
  episode, backbone = _small_conv4_episode()
  params, state = backbone.init(jax.random.key(1), episode.support_images)
  meta_params = {'backbone': params}
  stages = [(0, ['head']), (2, ['head', 'backbone/conv1']), (3, ['.*'])]
  moved = {}
  for steps in (2, 3, 4):
    algorithm = baselines.fine_tune(backbone, steps=steps, unfreeze=stages)
    task_params, _ = jax.jit(algorithm.adapt, static_argnums=4)(
        meta_params, state, episode, jax.random.key(0), False)
    moved[steps] = {name: not np.array_equal(task_params['backbone'][name]
                                             ['kernel'], leaf['kernel'])
                    for name, leaf in params.items() if 'kernel' in leaf}
  assert moved[2] == {'conv0': False, 'conv1': False}  # head only
  assert moved[3] == {'conv0': False, 'conv1': True}   # + the top block
  assert moved[4] == {'conv0': True, 'conv1': True}    # everything
  with pytest.raises(ValueError, match='step 0'):
    baselines.fine_tune(backbone, unfreeze=[(5, ['.*'])])


def _contract_algorithms():
  return {
      'ridge': functools.partial(baselines.linear_probe, solver='ridge'),
      'logistic': functools.partial(baselines.linear_probe, solver='logistic',
                                    steps=3),
      'simpleshot': baselines.simpleshot,
      'simpleshot_base': functools.partial(baselines.simpleshot,
                                           centering='base'),
      'baseline_pp': functools.partial(baselines.baseline_pp, steps=3),
      'fine_tune': functools.partial(baselines.fine_tune, steps=2),
  }


@pytest.mark.parametrize('name', sorted(_contract_algorithms()))
def test_contract(name):
  ways, shots, queries, tasks = 3, 2, 2, 2
  splits = synthetic_splits(num_classes=(5, 1, 1), images_per_class=4,
                            image_size=16)
  data = sampling.to_device(splits['train'])
  spec = sampling.EpisodeSpec(ways, shots, queries)
  algorithm = _contract_algorithms()[name](backbones.create(
      'conv4', filters=8, num_blocks=2, norm='batch_running'))
  meta_params, state = algorithm.init(jax.random.key(1),
                                      data.images[:ways * shots])
  traces = []

  @jax.jit
  def evaluate(meta_params, state, episodes, key):
    traces.append(1)

    def one(episode, key):
      loss, (metrics, _) = episode_loss(algorithm, meta_params, state,
                                        episode, key, train=False)
      logits, _ = query_logits(algorithm, meta_params, state, episode, key,
                               False)
      return loss, metrics['accuracy'], logits

    return jax.vmap(one)(episodes, jax.random.split(key, tasks))

  dims = chex.Dimensions(T=tasks, N=ways, Q=queries)
  for seed in range(2):  # A second meta-batch reuses the compiled program.
    episodes = sampling.sample_meta_batch(jax.random.key(seed), data, spec,
                                          tasks)
    losses, accuracies, logits = evaluate(meta_params, state, episodes,
                                          jax.random.key(2))
    chex.assert_shape(logits, dims['T(NQ)N'])
    chex.assert_shape(losses, (tasks,))
    assert np.isfinite(np.asarray(losses)).all()
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(
        accuracies, np.mean(np.argmax(logits, -1) == episodes.query_labels,
                            axis=-1), atol=1e-6)
  assert len(traces) == 1


def test_plugs_into_episode_accuracies():
  data = sampling.to_device(synthetic_splits(
      num_classes=(1, 1, 4), images_per_class=5, image_size=16)['test'])
  algorithm = baselines.linear_probe(backbones.create(
      'conv4', filters=8, num_blocks=2, norm='batch_running'))
  meta_params, state = algorithm.init(jax.random.key(0), data.images[:6])
  spec = sampling.EpisodeSpec(3, 2, 2)
  accuracies = jax.jit(episode_accuracies(algorithm, spec, 4, chunk_size=2))(
      meta_params, state, data, jax.random.key(1))
  chex.assert_shape(accuracies, (4,))
  assert np.all((np.asarray(accuracies) >= 0) & (np.asarray(accuracies) <= 1))


def test_rejects_unknown_options():
  backbone = _feature_backbone()
  with pytest.raises(ValueError, match='solver must be one of'):
    baselines.linear_probe(backbone, solver='svm')
  with pytest.raises(ValueError, match='centering must be one of'):
    baselines.simpleshot(backbone, centering='median')
  with pytest.raises(ValueError, match='head_init must be one of'):
    baselines.fine_tune(backbone, head_init='random')
  with pytest.raises(ValueError, match='optimizer must be one of'):
    baselines.baseline_pp(backbone, optimizer='lbfgs')

