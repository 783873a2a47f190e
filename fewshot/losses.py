"""The one generic episodic loss: one episode, and a meta-batch with its gradient."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from fewshot.algorithms.base import Algorithm, MetaParams
from fewshot.backbones.base import ModelState
from fewshot.episodes import Episode
from fewshot.mesh import TASK_AXIS, task_mesh
from fewshot.ops import paths
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
  keys = jax.random.split(key, episodes.support_labels.shape[0])
  loss, (metrics, states) = _tasks_loss(algorithm, train, meta_params,
                                        model_state, episodes, keys)
  return loss, (metrics, _keep_frozen(states, model_state))


def _tasks_loss(algorithm: Algorithm, train: bool, meta_params: MetaParams,
                model_state: ModelState, episodes: Episode, keys: jax.Array
                ) -> tuple[jax.Array, tuple[Metrics, Any]]:
  """Loss, metrics and new state of `[T]` tasks, each averaged over them."""
  per_task = functools.partial(episode_loss, algorithm, train=train)
  losses, (metrics, states) = jax.vmap(per_task, in_axes=(None, None, 0, 0))(
      meta_params, model_state, episodes, keys)
  metrics = jax.tree.map(jnp.mean, metrics)
  return jnp.mean(losses), (metrics, _mean_state(states))


def _mean_state(states: Any) -> Any:
  """The tasks' new states `[T, ...]` averaged over the task axis."""
  return jax.tree.map(lambda s: jnp.mean(s, axis=0), states)


def _keep_frozen(mean: Any, model_state: ModelState) -> Any:
  """`mean` with a PEFT backbone's frozen base weights (`model_state['frozen']`,
  never updated) passed through as they were, not averaged (a mean of T
  copies need not round to the copy)."""
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
    per_task: bool | None = None, mesh: Mesh | None = None,
) -> tuple[tuple[jax.Array, tuple[Metrics, Any]], MetaParams]:
  """`jax.value_and_grad(meta_batch_loss, has_aux=True)`, fast on XLA:CPU
  and local to each device when the task axis is split over several.

  Same values (to float rounding) as differentiating `meta_batch_loss`.
  With `per_task` the meta-gradient of each task is taken inside the vmap
  (`[T, ...]` per parameter) and averaged over tasks by
  `_mean_over_tasks`; without it, it is `jax.value_and_grad` of the mean
  loss. The default (None) is per task on CPU, where it is faster, and the
  mean loss's gradient elsewhere (not measured there); `fewshot.ops.paths`
  can force either. The episodic
  objective trains with it.

  On several devices each runs its own `T / D` tasks under `shard_map`
  (no communication), and one all-reduce averages the loss, metrics, new
  state and gradient. Left to the SPMD partitioner, the per-task kernels of
  MAML's inner loop (`fewshot.ops.conv`, unrolled over the task axis) had
  every task's activations sent to device 0, broadcast to all (so every
  device computed every task) and re-split: ~300 collectives per step and
  4x slower steps on 4 simulated CPU devices (issue 18's run aborted on
  XLA:CPU's 40 s rendezvous timeout of a collective).

  Args:
    mesh: a 1-D mesh whose axis `TASK_AXIS` splits the task axis; default
      all devices (the harness's `task_mesh`) if there are several and they
      divide `T`, else none (one program over all tasks).

  Returns:
    `((loss, (metrics, model_state)), grads)`, grads shaped like
    `meta_params`.
  """
  if per_task is None:
    per_task = paths.cpu_paths()
  num_tasks = episodes.support_labels.shape[0]
  keys = jax.random.split(key, num_tasks)

  def tasks_value_and_grad(meta_params, model_state, episodes, keys):
    if not per_task:
      return jax.value_and_grad(
          functools.partial(_tasks_loss, algorithm, train),
          has_aux=True)(meta_params, model_state, episodes, keys)
    task_value_and_grad = jax.value_and_grad(
        functools.partial(episode_loss, algorithm, train=train), has_aux=True)
    (losses, (metrics, states)), grads = jax.vmap(
        task_value_and_grad, in_axes=(None, None, 0, 0))(
            meta_params, model_state, episodes, keys)
    metrics = jax.tree.map(jnp.mean, metrics)
    return ((jnp.mean(losses), (metrics, _mean_state(states))),
            _mean_over_tasks(grads))

  if mesh is None:
    mesh = _task_mesh(num_tasks)
  if mesh is not None:
    tasks_value_and_grad = _split_over_tasks(tasks_value_and_grad, mesh)
  (loss, (metrics, states)), grads = tasks_value_and_grad(
      meta_params, model_state, episodes, keys)
  return (loss, (metrics, _keep_frozen(states, model_state))), grads


def _task_mesh(num_tasks: int) -> Mesh | None:
  """`fewshot.mesh.task_mesh()` (the harness's), if it has several devices
  and they divide the tasks."""
  devices = jax.device_count()
  if devices == 1 or num_tasks % devices:
    return None
  return task_mesh()


def _split_over_tasks(fn, mesh: Mesh):
  """`fn(meta_params, model_state, episodes, keys)`, whose outputs are means
  over the tasks, run on each device's tasks and averaged by `pmean`.

  The parameters and state go in replicated, the episodes and keys split on
  their task axis. `check_vma=False`: gradients stay each device's own until
  the `pmean` (with varying-axis checks the custom-gradient convs of
  `fewshot.ops.conv` do not trace: their kernel gradient varies over the
  devices, the kernel does not).
  """
  def local(*args):
    return jax.lax.pmean(fn(*args), TASK_AXIS)

  tasks = PartitionSpec(TASK_AXIS)
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(PartitionSpec(), PartitionSpec(), tasks,
                                 tasks),
                       out_specs=PartitionSpec(), check_vma=False)
