"""Multi-task learning: one shared backbone, a named head per task.

Tasks read *streams*: a stream is one training set of images drawn on the
device each step, either `[B]` minibatches of `MultiLabelImages` (several
label sets per image, so tasks on the same images share one forward pass)
or N-way K-shot episodes of a class-grouped `DeviceDataset`. A task is a
head on its stream's features:

* 'classify': a linear or cosine classifier over one label set
  (cross-entropy; `accuracy`);
* 'regress': a linear map to a `[D]` target (mean squared error);
* 'episodes': prototypes of the episode's support set (ProtoNet's
  negative squared distances, no parameters; `accuracy` on the queries).

A stream with `rotate=True` turns each image by a random multiple of 90
degrees and adds the label set 'rotation' (4 classes; Gidaris et al.'s
self-supervised task).

Parameters are `{'backbone': ..., 'heads': {task: ...}, 'weighting':
...}`, the backbone under the same key as every other objective's, so a
multi-task workdir is a pretrained backbone for any config. The model
state is `{'backbone': BatchNorm statistics, 'weighting': the method's
state}`. The step computes the `[T]` task losses in one forward pass; a
`Weighting` that needs the task gradients' Gram matrix gets the per-task
gradients from one pullback per task (`fewshot.multitask.gradients`), the
others one backward pass of the weighted loss. Which gradients
(`gradients=`):

* 'parameters' (the default): the task gradients of the shared backbone's
  parameters, exact; `T` backward passes through the backbone.
* 'features': the task gradients of the backbone's output features, every
  example's `[D]` gradient in the inner products (Sener and Koltun 2018's
  MGDA-UB bound, as their code computes it). The combined feature gradient
  `sum_t c_t dL_t/dz` goes back through the backbone once, so the step
  costs one backbone backward pass whatever `T` is. Two tasks on different
  streams have orthogonal feature gradients here.
* 'features_summed': as 'features', but each task's feature gradient is
  summed over its batch to one `[D]` vector before the inner products
  (LibMTL's `rep_grad=True`, also across streams of different images).

The feature modes change only the Gram matrix the weighting sees: for the
same coefficients the backbone's update equals the parameter mode's
(the backward pass is linear; tested). LibMTL refuses PCGrad and CAGrad
with `rep_grad`; here every Gram-reading method accepts them, as an
approximation whose quality is the user's call.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from fewshot.backbones.base import Backbone
from fewshot.data.augment import rotate_quarter_turns
from fewshot.data.batches import MultiLabelImages, batch_indices
from fewshot.data.sampling import EpisodeSpec, sample_episode
from fewshot.episodes import Episode
from fewshot.heads import (classifier_logits, init_head, linear_logits,
                           prototypes, squared_distances)
from fewshot.multitask.gradients import combine, gram_matrix, task_gradients
from fewshot.multitask.weighting import Weighting
from fewshot.objectives.base import Objective

TASK_KINDS = ('classify', 'regress', 'episodes')
GRADIENTS = ('parameters', 'features', 'features_summed')
ROTATION = 'rotation'


@dataclasses.dataclass(frozen=True)
class Stream:
  """One training stream: minibatches of `batch_size`, or `episodes`."""
  batch_size: int = 0
  episodes: EpisodeSpec | None = None
  rotate: bool = False

  def __post_init__(self):
    if (self.batch_size > 0) == (self.episodes is not None):
      raise ValueError('A stream has either batch_size > 0 (minibatches) or '
                       'an episode spec, not both or neither.')
    if self.rotate and self.episodes is not None:
      raise ValueError('rotate applies to minibatch streams only.')


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: a head of `kind` on the features of `stream`.

  Attributes:
    stream: the stream it reads.
    kind: 'classify', 'regress' or 'episodes' (see the module docstring).
    labels: the stream's label set (default: the task's name).
    outputs: classes ('classify') or target dimensions ('regress').
    head: 'linear' or 'cosine' classifier (`fewshot.heads.init_head`).
    init_scale: the cosine head's initial scale.
  """
  stream: str
  kind: str = 'classify'
  labels: str | None = None
  outputs: int = 0
  head: str = 'linear'
  init_scale: float = 10.0

  def __post_init__(self):
    if self.kind not in TASK_KINDS:
      raise ValueError(f'Task kind must be one of {TASK_KINDS}, got '
                       f'{self.kind!r}.')
    if self.kind != 'episodes' and self.outputs < 1:
      raise ValueError(f'A {self.kind!r} task needs outputs >= 1, got '
                       f'{self.outputs}.')


def check_tasks(tasks: Mapping[str, Task], streams: Mapping[str, Stream]
                ) -> None:
  """Raises a clear error for tasks and streams that do not fit together."""
  if not tasks:
    raise ValueError('A multi-task objective needs at least one task.')
  for name, task in tasks.items():
    if task.stream not in streams:
      raise ValueError(f'Task {name!r} reads stream {task.stream!r}, but the '
                       f'streams are {sorted(streams)}.')
    episodic = streams[task.stream].episodes is not None
    if episodic != (task.kind == 'episodes'):
      raise ValueError(f'Task {name!r} of kind {task.kind!r} cannot read '
                       f'stream {task.stream!r}: episode tasks read episode '
                       'streams, the others minibatch streams.')
  unused = sorted(set(streams) - {t.stream for t in tasks.values()})
  if unused:
    raise ValueError(f'Stream(s) {unused} are read by no task.')


def label_name(name: str, task: Task) -> str:
  return task.labels or name


def _sample_stream(key, step, stream: Stream, data):
  if stream.episodes is not None:
    return sample_episode(jax.random.fold_in(key, step), data,
                          stream.episodes)
  order_key, rotate_key = jax.random.split(key)
  index = batch_indices(order_key, step, data.num_images, stream.batch_size)
  images = data.images[index]
  labels = {k: v[index] for k, v in data.labels.items()}
  if stream.rotate:
    turns = jax.random.randint(jax.random.fold_in(rotate_key, step),
                               (stream.batch_size,), 0, 4)
    images = rotate_quarter_turns(images, turns)
    labels[ROTATION] = turns.astype(jnp.int32)
  return MultiLabelImages(images=images, labels=labels)


def _episode_loss(features, episode: Episode):
  """ProtoNet's query cross-entropy and accuracy on `[N*K + N*Q, D]`."""
  support = features[:episode.support_labels.shape[0]]
  query = features[episode.support_labels.shape[0]:]
  logits = -squared_distances(
      query, prototypes(support, episode.support_labels, episode.num_ways))
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, episode.query_labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == episode.query_labels)


def head_outputs(task: Task, head, features):
  """`[B, outputs]` logits or predictions of a classify or regress head."""
  if task.kind == 'classify':
    return classifier_logits(features, head)
  return linear_logits(features, head)


def task_loss(task: Task, head, features, targets):
  """`(loss, metrics)` of a classify or regress head on its batch."""
  outputs = head_outputs(task, head, features)
  if task.kind == 'classify':
    loss = optax.softmax_cross_entropy_with_integer_labels(
        outputs, targets).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(outputs, -1) == targets)}
  loss = jnp.mean(jnp.square(outputs - targets.reshape(outputs.shape)))
  return loss, {}


def multitask(backbone: Backbone, *, tasks: Mapping[str, Task],
              streams: Mapping[str, Stream], weighting: Weighting,
              gradients: str = 'parameters') -> Objective:
  """Trains `backbone` and one head per task, combined by `weighting`.

  The data is `{stream: MultiLabelImages or DeviceDataset}`; the batch
  `{stream: MultiLabelImages or Episode}`. Metrics: `loss` (the sum of the
  task losses), and per task `<task>_loss`, `<task>_weight` (its
  coefficient in the shared update) and `<task>_accuracy` for classifiers.

  Args:
    backbone: the shared encoder.
    tasks: `{name: Task}`; the order of the mapping is the task order of
      the weighting's `[T]` vectors.
    streams: `{name: Stream}`, each read by at least one task.
    weighting: how the task losses and gradients are combined
      (`fewshot.multitask.make_weighting`).
    gradients: which task gradients a Gram-reading weighting combines:
      'parameters', 'features' or 'features_summed' (module docstring);
      loss-weighting methods take one backward pass in every mode.
  """
  check_tasks(tasks, streams)
  if gradients not in GRADIENTS:
    raise ValueError(f'gradients must be one of {GRADIENTS}, got '
                     f'{gradients!r}.')
  names = tuple(tasks)
  stream_names = tuple(sorted(streams))
  for task in tasks.values():
    if task.kind == 'classify':  # fail early on a bad head kind
      init_head(jax.random.key(0), 1, 1, kind=task.head)

  def init(key, data):
    backbone_key, head_key, run_key = jax.random.split(key, 3)
    sample = data[stream_names[0]]
    sample_images = jnp.asarray(sample.images[:2])
    params, model_state = backbone.init(backbone_key, sample_images)
    dim = jax.eval_shape(lambda: backbone.apply(
        params, model_state, sample_images, False)[0]).shape[-1]
    heads = {}
    for index, name in enumerate(names):
      task = tasks[name]
      if task.kind == 'episodes':
        heads[name] = {}
      else:
        heads[name] = init_head(
            jax.random.fold_in(head_key, index), dim, task.outputs,
            kind=task.head if task.kind == 'classify' else 'linear',
            init_scale=task.init_scale)
    weighting_params, weighting_state = weighting.init(len(names))
    return ({'backbone': params, 'heads': heads,
             'weighting': weighting_params},
            {'backbone': model_state, 'weighting': weighting_state}, run_key)

  def sample(run_key, step, data):
    return {name: _sample_stream(jax.random.fold_in(run_key, index), step,
                                 streams[name], data[name])
            for index, name in enumerate(stream_names)}

  def encode(backbone_params, backbone_state, batch):
    """`({stream: features [B, D]}, backbone_state)`, a pass per stream."""
    features = {}
    for name in stream_names:
      item = batch[name]
      if isinstance(item, Episode):
        images = jnp.concatenate([item.support_images, item.query_images])
      else:
        images = item.images
      features[name], backbone_state = backbone.apply(
          backbone_params, backbone_state, images, True)
    return features, backbone_state

  def head_losses(heads, features, batch):
    """`([T] losses, metrics)` of every task's head on its features."""
    losses, metrics = [], {}
    for name in names:
      task = tasks[name]
      item = batch[task.stream]
      if task.kind == 'episodes':
        loss, accuracy = _episode_loss(features[task.stream], item)
        extra = {'accuracy': accuracy}
      else:
        loss, extra = task_loss(task, heads[name], features[task.stream],
                                item.labels[label_name(name, task)])
      losses.append(loss)
      metrics.update({f'{name}_loss': loss},
                     **{f'{name}_{k}': v for k, v in extra.items()})
    return jnp.stack(losses), metrics

  def task_losses(model_params, backbone_state, batch):
    """`([T] losses, (metrics, backbone_state))` in one forward pass."""
    features, backbone_state = encode(model_params['backbone'],
                                      backbone_state, batch)
    losses, metrics = head_losses(model_params['heads'], features, batch)
    return losses, (metrics, backbone_state)

  def feature_gram(feature_grads):
    """`[T, T]` Gram of the `{stream: [T, B, D]}` feature gradients."""
    if gradients == 'features_summed':
      return gram_matrix(sum(g.reshape(g.shape[0], g.shape[1], -1).sum(1)
                             for g in feature_grads.values()))
    return gram_matrix(feature_grads)

  def combined_gradients(params, model_state, batch, key):
    """`(losses, metrics, backbone_state, combination, weighting_grads,
    grads)` of a Gram-reading weighting, in the mode of `gradients`."""
    if gradients == 'parameters':
      (losses, (metrics, backbone_state)), task_grads = task_gradients(
          lambda p: task_losses(p, model_state['backbone'], batch),
          {'backbone': params['backbone'], 'heads': params['heads']})
      gram = gram_matrix(task_grads['backbone'])
      backbone_grads = lambda c: combine(task_grads['backbone'], c)
    else:
      features, encoder_vjp, backbone_state = jax.vjp(
          lambda p: encode(p, model_state['backbone'], batch),
          params['backbone'], has_aux=True)
      # T pullbacks through the heads only: cheap.
      (losses, metrics), task_grads = task_gradients(
          lambda p: head_losses(p['heads'], p['features'], batch),
          {'heads': params['heads'], 'features': features})
      gram = feature_gram(task_grads['features'])
      backbone_grads = lambda c: encoder_vjp(
          combine(task_grads['features'], c))[0]
    gram = jax.lax.stop_gradient(gram)
    (_, combination), weighting_grads = weighting_step(
        params['weighting'], model_state['weighting'], losses, gram, key)
    grads = {'backbone': backbone_grads(combination.shared),
             # Row t of head s's gradient is 0 unless s == t.
             'heads': combine(task_grads['heads'], combination.heads)}
    return losses, metrics, backbone_state, combination, weighting_grads, grads

  def weighting_step(weighting_params, weighting_state, losses, gram, key):
    def objective(p):
      combination = weighting.combine(p, weighting_state,
                                      jax.lax.stop_gradient(losses), gram, key)
      return combination.loss, combination
    return jax.value_and_grad(objective, has_aux=True)(weighting_params)

  def value_and_grad(params, model_state, batch, key):
    if weighting.needs_gram:
      (losses, metrics, backbone_state, combination, weighting_grads,
       grads) = combined_gradients(params, model_state, batch, key)
    else:
      model_params = {'backbone': params['backbone'],
                      'heads': params['heads']}
      losses_fn = lambda p: task_losses(p, model_state['backbone'], batch)
      # Loss-weighting methods: the heads share the backbone's weights
      # (`Combination.heads == shared`), one backward pass of the sum.
      def weighted(p):
        losses, aux = losses_fn(p)
        combination = weighting.combine(
            params['weighting'], model_state['weighting'],
            jax.lax.stop_gradient(losses), None, key)
        return (jnp.sum(jax.lax.stop_gradient(combination.shared) * losses),
                (losses, aux))
      (_, (losses, (metrics, backbone_state))), grads = jax.value_and_grad(
          weighted, has_aux=True)(model_params)
      (_, combination), weighting_grads = weighting_step(
          params['weighting'], model_state['weighting'], losses, None, key)
    grads['weighting'] = weighting_grads
    total = jnp.sum(losses)
    metrics = dict(metrics, loss=total,
                   **{f'{name}_weight': combination.shared[i]
                      for i, name in enumerate(names)})
    if jax.tree.leaves(params['weighting']):
      metrics['weighting_loss'] = combination.loss
    model_state = {'backbone': backbone_state,
                   'weighting': combination.state}
    return (total, (metrics, model_state)), grads

  def loss(params, model_state, batch, key):
    return value_and_grad(params, model_state, batch, key)[0]

  def batch_units(batch):
    return sum(item.support_images.shape[0] + item.query_images.shape[0]
               if isinstance(item, Episode) else item.images.shape[0]
               for item in batch.values())

  return Objective(init=init, sample=sample, loss=loss,
                   value_and_grad=value_and_grad, unit='images',
                   batch_size_name='batch_size', batch_units=batch_units)


__all__ = ['GRADIENTS', 'ROTATION', 'Stream', 'TASK_KINDS', 'Task',
           'check_tasks', 'head_outputs', 'label_name', 'multitask', 'task_loss']
