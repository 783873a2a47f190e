"""Few-shot evaluation: many seeded episodes in one compiled computation."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.algorithms.base import Algorithm, MetaParams
from fewshot.backbones.base import (Backbone, ModelState, Params,
                                    identity_backbone)
from fewshot.data.dataset import ClassDataset
from fewshot.data.sampling import EpisodeSpec, index_by_class, sample_episode
from fewshot.episodes import Episode
from fewshot.features import feature_inputs
from fewshot.losses import query_logits
from fewshot.progress import Progress
from fewshot.stats import summarize

# (meta_params, model_state, data, key[, first]) -> accuracies [num_episodes]
EvaluateFn = Callable[..., jax.Array]
# (trained params, model_state) -> {'accuracy', 'ci95', ...}; a few-shot
# evaluator also takes `per_episode=True` to add 'accuracies' (a list).
Evaluator = Callable[[Params, ModelState], dict[str, Any]]


class FewShotLearner(NamedTuple):
  """How a trained state is evaluated few-shot.

  `algorithm` adapts to each episode with the meta-parameters
  `meta_params(params)` of the trained `params`: the identity for episodic
  meta-training; for a pretrained backbone, the evaluating algorithm's own
  parameters with the trained backbone's in place. `model_state(state)`
  is the backbone's part of the trained model state (the identity unless
  the objective keeps more, as the multi-task weighting's state).
  """
  algorithm: Algorithm
  meta_params: Callable[[Params], MetaParams]
  model_state: Callable[[ModelState], ModelState] = lambda state: state


class FeatureCache(NamedTuple):
  """Evaluate on features embedded once per call (a frozen backbone).

  `algorithm` is the learner over `identity_backbone()`; the backbone's
  parameters are `meta_params['backbone']`.
  """
  backbone: Backbone
  algorithm: Algorithm
  batch_size: int = 256


def episode_accuracies(algorithm: Algorithm, spec: EpisodeSpec,
                       num_episodes: int, *, chunk_size: int | None = None,
                       images_per_chunk: int = 2048) -> EvaluateFn:
  """Builds `evaluate(meta_params, model_state, data, key, first=0) -> [E]`
  accuracies of episodes `first, ..., first + E - 1`.

  Episode e is drawn with `fold_in(key, e)`, so the test episodes depend only
  on the key (and the dataset), never on the model, on `chunk_size` or on
  how a long evaluation is split into calls (`first`).
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

  def evaluate(meta_params, model_state, data, key, first=0):
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(
        first + jnp.arange(num_episodes))
    per_key = functools.partial(one_episode, meta_params, model_state, data)
    return jax.lax.map(per_key, keys, batch_size=batch)

  # A batch that divides the episodes, if one is not much smaller: the
  # remainder would be a second vmapped program to compile.
  batch = min(chunk_size, num_episodes)
  divisor = max(d for d in range(1, batch + 1) if num_episodes % d == 0)
  batch = divisor if 2 * divisor >= batch else batch

  return evaluate


def few_shot_evaluator(learner: FewShotLearner, dataset: ClassDataset,
                       spec: EpisodeSpec, num_episodes: int, key: jax.Array,
                       *, images_per_chunk: int = 2048,
                       features: FeatureCache | None = None) -> Evaluator:
  """`evaluate(params, model_state) -> summary` on seeded episodes of `dataset`.

  The summary is `fewshot.stats.summarize`'s (`accuracy`, `ci95`,
  `episodes`) plus the episode shape and the wall time in seconds (and the
  feature extraction's, with `features`); `evaluate(..., per_episode=True)`
  adds `accuracies`, the list of per-episode accuracies (left out by
  default: summaries are logged and printed). The dataset is placed like the
  parameters (replicated over the harness's mesh, say) and the evaluation
  compiled on the first call; later calls reuse both.

  The episodes run in up to `PROGRESS_BLOCKS` equal calls of one compiled
  program, so that an evaluation taking minutes (per-episode fine-tuning)
  logs its progress and the time left (`fewshot.progress.Progress`).
  """
  algorithm = learner.algorithm if features is None else features.algorithm
  block = _block_size(num_episodes)
  evaluate = jax.jit(episode_accuracies(algorithm, spec, block,
                                        images_per_chunk=images_per_chunk))
  placed = {}  # sharding -> the dataset on it

  def run(params: Params, model_state: ModelState, *,
          per_episode: bool = False) -> dict[str, Any]:
    start = time.time()
    leaves = jax.tree.leaves(params)
    sharding = getattr(leaves[0], 'sharding', None) if leaves else None
    if sharding not in placed:
      placed.clear()
      placed[sharding] = jax.device_put(index_by_class(dataset), sharding)
    data = placed[sharding]
    meta_params = learner.meta_params(params)
    model_state = learner.model_state(model_state)
    extra = {}
    if features is not None:
      meta_params, model_state, data = feature_inputs(
          features.backbone, meta_params, model_state, data,
          batch_size=features.batch_size)
      jax.block_until_ready(data.images)
      extra = dict(precomputed_features=True,
                   feature_seconds=round(time.time() - start, 2))
    progress = Progress(num_episodes, f'{spec.num_ways}-way '
                        f'{spec.num_shots}-shot episodes')
    blocks = []
    for first in range(0, num_episodes, block):
      blocks.append(np.asarray(evaluate(meta_params, model_state, data, key,
                                        first)))
      progress.update(first + block)
    accuracies = np.concatenate(blocks)
    if per_episode:
      extra['accuracies'] = accuracies.astype(float).tolist()
    return dict(summarize(accuracies), ways=spec.num_ways,
                shots=spec.num_shots, queries=spec.num_queries,
                seconds=round(time.time() - start, 2), **extra)

  return run


PROGRESS_BLOCKS = 20


def _block_size(num_episodes: int) -> int:
  """The episodes per call: the smallest divisor of `num_episodes` that
  makes at most `PROGRESS_BLOCKS` calls."""
  return next(size for size in range(1, num_episodes + 1)
              if num_episodes % size == 0 and
              num_episodes // size <= PROGRESS_BLOCKS)


def feature_cache(make_algorithm: Callable[[Backbone], Algorithm],
                  backbone: Backbone, batch_size: int = 256) -> FeatureCache:
  """The `FeatureCache` of a learner factory on a frozen `backbone`."""
  return FeatureCache(backbone, make_algorithm(identity_backbone()),
                      batch_size)


def fixed_episode_accuracy(algorithm: Algorithm, meta_params: MetaParams,
                           model_state: ModelState,
                           episodes: Episode) -> jax.Array:
  """`[T]` query accuracies of a given meta-batch of episodes (eval mode)."""

  def one(episode):
    logits, _ = query_logits(algorithm, meta_params, model_state, episode,
                             jax.random.key(0), train=False)
    return jnp.mean(jnp.argmax(logits, axis=-1) == episode.query_labels)

  return jax.vmap(one)(episodes)


__all__ = ['EvaluateFn', 'Evaluator', 'FeatureCache', 'FewShotLearner',
           'episode_accuracies', 'feature_cache', 'few_shot_evaluator',
           'fixed_episode_accuracy']
