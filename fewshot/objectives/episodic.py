"""Episodic meta-learning: any `Algorithm`, meta-batches drawn in the step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fewshot._utils import check_options
from fewshot.algorithms.base import Algorithm
from fewshot.data.augment import augment_episodes, crop_and_flip
from fewshot.data.sampling import DeviceDataset, EpisodeSpec, sample_meta_batch
from fewshot.losses import meta_batch_loss, meta_batch_value_and_grad
from fewshot.objectives.base import Objective


def episodic(algorithm: Algorithm, *, ways: int, shots: int, queries: int,
             meta_batch_size: int = 1,
             augment: dict[str, Any] | None = None) -> Objective:
  """Meta-trains `algorithm` on `[T]` meta-batches of N-way K-shot episodes.

  The batch is an `Episode` with a leading task axis `T = meta_batch_size`,
  drawn from a `DeviceDataset` of the training classes; the loss is the
  mean query cross-entropy over its tasks (`fewshot.losses`).

  Args:
    algorithm: the few-shot learner.
    ways, shots, queries: the training episodes (`EpisodeSpec`).
    meta_batch_size: tasks per step.
    augment: keyword arguments of `fewshot.data.augment.crop_and_flip`
      applied to every support and query image (each its own draw).
  """
  spec = EpisodeSpec(ways, shots, queries)
  augment = dict(augment or {})
  check_options(crop_and_flip, augment, 'the objective\'s augment')

  def init(key, data: DeviceDataset):
    init_key, run_key = jax.random.split(key)
    params, model_state = algorithm.init(init_key, jnp.asarray(data.images[:2]))
    return params, model_state, run_key

  def sample(run_key, step, data: DeviceDataset):
    sample_key, _ = jax.random.split(jax.random.fold_in(run_key, step))
    episodes = sample_meta_batch(sample_key, data, spec, meta_batch_size)
    if augment:
      episodes = augment_episodes(jax.random.fold_in(sample_key, 1), episodes,
                                  **augment)
    return episodes

  # The step key's second half is the algorithm's (the first drew the batch).
  def loss(params, model_state, episodes, key):
    return meta_batch_loss(algorithm, params, model_state, episodes,
                           jax.random.split(key)[1])

  def value_and_grad(params, model_state, episodes, key):
    return meta_batch_value_and_grad(algorithm, params, model_state, episodes,
                                     jax.random.split(key)[1])

  return Objective(init=init, sample=sample, loss=loss,
                   value_and_grad=value_and_grad, unit='episodes',
                   batch_size_name='meta_batch_size')


__all__ = ['episodic']
