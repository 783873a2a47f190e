"""Episodic evaluation: many seeded test episodes in one compiled computation."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.algorithms.base import Algorithm, MetaParams
from fewshot.backbones.base import ModelState
from fewshot.data.sampling import DeviceDataset, EpisodeSpec, sample_episode
from fewshot.episodes import Episode
from fewshot.losses import mean_confidence_interval, query_logits

# (meta_params, model_state, data, key) -> accuracies [num_episodes]
EvaluateFn = Callable[[MetaParams, ModelState, DeviceDataset, jax.Array],
                      jax.Array]


def episode_accuracies(algorithm: Algorithm, spec: EpisodeSpec,
                       num_episodes: int, *, chunk_size: int | None = None,
                       images_per_chunk: int = 2048) -> EvaluateFn:
  """Builds `evaluate(meta_params, model_state, data, key) -> [E] accuracies`.

  Episode e is drawn with `fold_in(key, e)`, so the test episodes depend only
  on the key (and the dataset), never on the model or on `chunk_size`.
  `chunk_size` episodes are vmapped at once inside a `lax.map`, which bounds
  memory while keeping the whole evaluation one program; jit the result.
  By default a chunk holds about `images_per_chunk` images: far larger
  chunks only add memory traffic on a CPU (1000 20-way episodes took 9
  minutes in chunks of 50 episodes, 16,000 images).
  """
  if chunk_size is None:
    images_per_episode = spec.num_ways * (spec.num_shots + spec.num_queries)
    chunk_size = max(1, images_per_chunk // images_per_episode)

  def one_episode(meta_params, model_state, data, episode_key):
    sample_key, algorithm_key = jax.random.split(episode_key)
    episode = sample_episode(sample_key, data, spec)
    logits, _ = query_logits(algorithm, meta_params, model_state, episode,
                             algorithm_key, train=False)
    return jnp.mean(jnp.argmax(logits, axis=-1) == episode.query_labels)

  def evaluate(meta_params, model_state, data, key):
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(
        jnp.arange(num_episodes))
    per_key = functools.partial(one_episode, meta_params, model_state, data)
    return jax.lax.map(per_key, keys, batch_size=min(chunk_size, num_episodes))

  return evaluate


def summarize(accuracies: Sequence[float] | np.ndarray) -> dict[str, float]:
  """`{'accuracy', 'ci95', 'episodes'}`: mean and 95% CI half-width."""
  mean, ci95 = mean_confidence_interval(accuracies)
  return {'accuracy': mean, 'ci95': ci95, 'episodes': int(np.size(accuracies))}


def fixed_episode_accuracy(algorithm: Algorithm, meta_params: MetaParams,
                           model_state: ModelState,
                           episodes: Episode) -> jax.Array:
  """`[T]` query accuracies of a given meta-batch of episodes (eval mode)."""

  def one(episode):
    logits, _ = query_logits(algorithm, meta_params, model_state, episode,
                             jax.random.key(0), train=False)
    return jnp.mean(jnp.argmax(logits, axis=-1) == episode.query_labels)

  return jax.vmap(one)(episodes)


def omniglot_runs_error_rate(algorithm: Algorithm, meta_params: MetaParams,
                             model_state: ModelState,
                             runs: Sequence) -> dict[str, float]:
  """Lake et al.'s one-shot protocol: 20-way within-alphabet runs.

  Each run has one training image for each of 20 characters and 20 test
  images; each test image is classified among the run's training images.

  Args:
    runs: `OmniglotRun`s with `training_images [20,S,S,1]`,
      `test_images [20,S,S,1]` and `test_labels [20]`.

  Returns:
    `{'error_rate': percent wrong over all trials, 'trials': count,
    'runs': count}`.
  """
  if not runs:
    raise ValueError('No Omniglot runs to evaluate.')
  num_ways = runs[0].training_images.shape[0]
  episodes = Episode(
      support_images=jnp.stack([r.training_images for r in runs]),
      support_labels=jnp.tile(jnp.arange(num_ways, dtype=jnp.int32),
                              (len(runs), 1)),
      query_images=jnp.stack([r.test_images for r in runs]),
      query_labels=jnp.stack([jnp.asarray(r.test_labels, jnp.int32)
                              for r in runs]),
      class_ids=jnp.tile(jnp.arange(num_ways, dtype=jnp.int32),
                         (len(runs), 1)),
      num_ways=num_ways)
  accuracies = jax.jit(functools.partial(fixed_episode_accuracy, algorithm))(
      meta_params, model_state, episodes)
  trials = int(episodes.query_labels.size)
  wrong = float(np.sum((1.0 - np.asarray(accuracies)) *
                       episodes.query_labels.shape[1]))
  return {'error_rate': 100.0 * wrong / trials, 'trials': trials,
          'runs': len(runs)}
