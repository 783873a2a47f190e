"""Episodic evaluation and Lake's Omniglot runs protocol."""

import jax
import numpy as np

from fewshot import backbones
from fewshot.algorithms import protonet
from fewshot.data import omniglot, sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.evaluators import episode_accuracies, omniglot_runs_error_rate
from fewshot.losses import query_logits
from omniglot_runs_test import make_runs


def _model(norm='batch_running'):
  algorithm = protonet(backbones.create('conv4', filters=8, norm=norm))
  params, state = algorithm.init(jax.random.key(0),
                                 np.zeros((2, 28, 28, 1), np.uint8))
  return algorithm, params, state


def test_episode_accuracies_are_seeded_and_match_a_loop():
  algorithm, params, state = _model()
  data = sampling.to_device(synthetic_splits(num_classes=(2, 2, 8),
                                             images_per_class=6)['test'])
  spec = sampling.EpisodeSpec(3, 1, 2)
  key = jax.random.key(7)
  chunked = jax.jit(episode_accuracies(algorithm, spec, 6, chunk_size=4))(
      params, state, data, key)
  whole = jax.jit(episode_accuracies(algorithm, spec, 6, chunk_size=6))(
      params, state, data, key)
  np.testing.assert_allclose(chunked, whole, atol=1e-6)

  @jax.jit  # one episode at a time (compiled once, not op by op)
  def episode_logits(e):
    sample_key, algorithm_key = jax.random.split(jax.random.fold_in(key, e))
    episode = sampling.sample_episode(sample_key, data, spec)
    logits, _ = query_logits(algorithm, params, state, episode,
                             algorithm_key, train=False)
    return logits, episode.query_labels

  for e in range(6):
    logits, labels = episode_logits(e)
    expected = np.mean(np.argmax(logits, -1) == labels)
    assert abs(float(chunked[e]) - expected) < 1e-6


def test_omniglot_runs_error_rate(tmp_path):
  make_runs(tmp_path / 'all_runs')
  runs = omniglot.read_omniglot_runs(tmp_path / 'all_runs', image_size=28)
  algorithm, params, state = _model()
  # Test items are copies of their training image: a deterministic embedding
  # classifies every one correctly.
  result = omniglot_runs_error_rate(algorithm, params, state, runs)
  assert result == {'error_rate': 0.0, 'trials': 40, 'runs': 2}
  # With the answer key scrambled, almost every trial is wrong.
  scrambled = [r.__class__(**{**r.__dict__,
                              'test_labels': (r.test_labels + 1) % 20})
               for r in runs]
  result = omniglot_runs_error_rate(algorithm, params, state, scrambled)
  assert result['error_rate'] > 90.0
