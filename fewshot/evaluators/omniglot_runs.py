"""Lake et al.'s Omniglot one-shot protocol: 20-way within-alphabet runs."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.algorithms.base import Algorithm, MetaParams
from fewshot.backbones.base import ModelState
from fewshot.episodes import Episode
from fewshot.evaluators.episodes import fixed_episode_accuracy


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


__all__ = ['omniglot_runs_error_rate']
