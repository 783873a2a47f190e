"""The one generic episodic loss: one episode, and a meta-batch with its gradient."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fewshot.algorithms.base import Algorithm, MetaParams
from fewshot.backbones.base import ModelState
from fewshot.episodes import Episode
from fewshot.peft.backbone import FROZEN

Metrics = dict[str, jax.Array]


def query_logits(algorithm: Algorithm, meta_params: MetaParams,
                 model_state: ModelState, episode: Episode, key: jax.Array,
                 train: bool) -> tuple[jax.Array, ModelState]:
  """Adapts to the support set, then predicts the queries: `[N*Q, N]`."""
  task_params, model_state = algorithm.adapt(meta_params, model_state, episode,
                                             key, train)
  return algorithm.predict(meta_params, model_state, task_params,
                           episode.query_images, train)


def episode_loss(algorithm: Algorithm, meta_params: MetaParams,
                 model_state: ModelState, episode: Episode, key: jax.Array,
                 train: bool = True) -> tuple[jax.Array, tuple[Metrics, Any]]:
  """Mean query cross-entropy of one episode (or the algorithm's `query_loss`).

  Returns:
    `(loss, (metrics, model_state))` with metrics `loss` and `accuracy`.
  """
  logits, model_state = query_logits(algorithm, meta_params, model_state,
                                     episode, key, train)
  if algorithm.query_loss is not None:
    loss = algorithm.query_loss(logits, episode.query_labels)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, episode.query_labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == episode.query_labels)
  return loss, ({'loss': loss, 'accuracy': accuracy}, model_state)


def meta_batch_loss(algorithm: Algorithm, meta_params: MetaParams,
                    model_state: ModelState, episodes: Episode, key: jax.Array,
                    train: bool = True) -> tuple[jax.Array, tuple[Metrics, Any]]:
  """`episode_loss` vmapped over the leading `T` axis of `episodes`, averaged.

  Each task updates the model state independently; the new state is the mean
  over tasks (for BatchNorm running averages, the average of the tasks').
  """
  num_tasks = episodes.support_labels.shape[0]
  keys = jax.random.split(key, num_tasks)
  per_task = functools.partial(episode_loss, algorithm, train=train)
  losses, (metrics, states) = jax.vmap(per_task, in_axes=(None, None, 0, 0))(
      meta_params, model_state, episodes, keys)
  metrics = jax.tree.map(jnp.mean, metrics)
  return jnp.mean(losses), (metrics, _mean_state(states, model_state))


def _mean_state(states: Any, model_state: ModelState) -> Any:
  """The tasks' new states `[T, ...]` averaged; a PEFT backbone's frozen base
  weights (`model_state['frozen']`, never updated) are passed through as
  they were, not averaged (a mean of T copies need not round to the copy)."""
  mean = jax.tree.map(lambda s: jnp.mean(s, axis=0), states)
  if isinstance(model_state, dict) and FROZEN in model_state:
    mean = {**mean, FROZEN: model_state[FROZEN]}
  return mean


def _mean_over_tasks(tree: Any) -> Any:
  """Mean over the leading task axis of every leaf, as a `[T] x [T, ...]` dot.

  XLA:CPU runs a plain `reduce` over a leading axis of 32 (the sum of the
  per-task meta-gradients, which `jax.grad` of a vmapped loss emits) 15-30x
  slower than this matrix-vector product: 10.7 ms against 0.33 ms for a
  `[32, 3, 3, 64, 64]` Conv-4 kernel gradient (`benchmarks/task_mean.py`).
  """
  def mean(leaf):
    weights = jnp.ones((leaf.shape[0],), leaf.dtype)
    return jnp.tensordot(weights, leaf, axes=1) / leaf.shape[0]
  return jax.tree.map(mean, tree)


def meta_batch_value_and_grad(
    algorithm: Algorithm, meta_params: MetaParams, model_state: ModelState,
    episodes: Episode, key: jax.Array, train: bool = True, *,
    per_task: bool | None = None,
) -> tuple[tuple[jax.Array, tuple[Metrics, Any]], MetaParams]:
  """`jax.value_and_grad(meta_batch_loss, has_aux=True)`, fast on XLA:CPU.

  Same values (to float rounding) as differentiating `meta_batch_loss`.
  With `per_task` the meta-gradient of each task is taken inside the vmap
  (`[T, ...]` per parameter) and averaged over tasks by
  `_mean_over_tasks`; without it, it is `jax.value_and_grad` of
  `meta_batch_loss`. The default (None) is per task on CPU, where it is
  faster, and the mean loss's gradient elsewhere (not measured there).
  The episodic objective trains with it.

  Returns:
    `((loss, (metrics, model_state)), grads)`, grads shaped like
    `meta_params`.
  """
  if per_task is None:
    per_task = jax.default_backend() == 'cpu'
  if not per_task:
    return jax.value_and_grad(
        functools.partial(meta_batch_loss, algorithm, train=train),
        has_aux=True)(meta_params, model_state, episodes, key)
  num_tasks = episodes.support_labels.shape[0]
  keys = jax.random.split(key, num_tasks)
  task_value_and_grad = jax.value_and_grad(
      functools.partial(episode_loss, algorithm, train=train), has_aux=True)
  (losses, (metrics, states)), grads = jax.vmap(
      task_value_and_grad, in_axes=(None, None, 0, 0))(
          meta_params, model_state, episodes, keys)
  metrics = jax.tree.map(jnp.mean, metrics)
  return ((jnp.mean(losses), (metrics, _mean_state(states, model_state))),
          _mean_over_tasks(grads))
