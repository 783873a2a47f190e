"""Supervised backbone pretraining: `pretrain_and_evaluate(config, workdir)`.

The "good embedding" recipe (Tian et al. 2020) and the Baseline / Baseline++
pretraining stage (Chen et al. 2019): a backbone and a linear (or cosine)
classifier trained with cross-entropy on all images of the meta-training
classes. Progress is measured the few-shot way: `config.algorithm` (e.g.
ProtoNet's nearest centroid) on the backbone's features, in evaluation mode,
on seeded episodes of the meta-validation classes.

Like `fewshot.train`, this module reads a ConfigDict and nothing below it
does; the run uses `train.py`'s state, optimizer, checkpointing and log, so
its workdir has the same layout (`config.json`, `checkpoints/`,
`metrics.jsonl`) and `fewshot.backbones.load(name, weights=workdir)` reads
the final backbone (without the classifier).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from fewshot import backbones
from fewshot import data as data_lib
from fewshot._utils import check_options
from fewshot.algorithms import ALGORITHMS
from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import Backbone
from fewshot.checkpoint import Checkpointer
from fewshot.data.augment import crop_and_flip
from fewshot.data.dataset import ClassDataset
from fewshot.data.sampling import EpisodeSpec
from fewshot.evaluate import episode_accuracies, summarize
from fewshot.train import (TrainState, MetricsLog, write_json_atomic,
                           make_optimizer, run_training_loop, task_mesh)

HEADS = ('linear', 'cosine')


@flax.struct.dataclass
class LabelledImages:
  """A supervised training set as device arrays (a pytree; a jit argument).

  Attributes:
    images: `[M, H, W, C]` uint8.
    labels: `[M]` int32 class index.
  """
  images: jax.Array
  labels: jax.Array

  @property
  def num_images(self) -> int:
    return self.images.shape[0]


def labelled_images(dataset: ClassDataset, device=None) -> LabelledImages:
  """Places a dataset's images and labels on a device."""
  return LabelledImages(images=jax.device_put(dataset.images, device),
                        labels=jax.device_put(dataset.labels, device))


def init_head(key: jax.Array, feature_dim: int, num_classes: int, *,
              kind: str = 'linear', init_scale: float = 10.0
              ) -> dict[str, jax.Array]:
  """Classifier parameters: `kernel [D, C]` and `bias [C]` or `log_scale []`.

  Args:
    kind: 'linear' (`features @ kernel + bias`, PyTorch's default init) or
      'cosine' (Baseline++: a learned scale times the cosine similarity of
      the features and each class's weight vector).
    init_scale: the cosine head's initial scale; unused for 'linear'.
  """
  if kind not in HEADS:
    raise ValueError(f'head kind must be one of {HEADS}, got {kind!r}.')
  bound = feature_dim ** -0.5
  kernel_key, bias_key = jax.random.split(key)
  kernel = jax.random.uniform(kernel_key, (feature_dim, num_classes),
                              minval=-bound, maxval=bound)
  if kind == 'cosine':
    return {'kernel': kernel,
            'log_scale': jnp.log(jnp.asarray(init_scale, jnp.float32))}
  return {'kernel': kernel,
          'bias': jax.random.uniform(bias_key, (num_classes,), minval=-bound,
                                     maxval=bound)}


def head_logits(head_params: dict[str, jax.Array],
                features_BxD: jax.Array) -> jax.Array:
  """`[B, C]` logits of either head kind (told apart by its parameters)."""
  kernel_DxC = head_params['kernel']
  if 'log_scale' in head_params:
    normalise = lambda x, axis: x * jax.lax.rsqrt(
        jnp.sum(jnp.square(x), axis=axis, keepdims=True) + 1e-12)
    cosine_BxC = normalise(features_BxD, -1) @ normalise(kernel_DxC, 0)
    return jnp.exp(head_params['log_scale']) * cosine_BxC
  return features_BxD @ kernel_DxC + head_params['bias'][None, :]


def make_pretrain_optimizer(*, name: str = 'sgd', learning_rate: float = 0.05,
                            weight_decay: float = 5e-4, num_steps: int = 1,
                            **options: Any) -> optax.GradientTransformation:
  """`train.make_optimizer` plus weight decay for every optimizer.

  'sgd' (momentum 0.9) and 'adam' add `weight_decay * params` to the
  gradient, as PyTorch's `weight_decay` does, except to the cosine head's
  `log_scale` (decay would pull the scale to 1); 'adamw' decouples it and
  decays every parameter. Other options (`schedule`, `warmup_steps`, ...) go
  to `make_optimizer`.
  """
  check_options(make_optimizer, options, 'the optimizer')
  if name == 'adamw':
    return make_optimizer(name=name, learning_rate=learning_rate,
                          weight_decay=weight_decay, num_steps=num_steps,
                          **options)
  tx = make_optimizer(name=name, learning_rate=learning_rate,
                      num_steps=num_steps, **options)
  if weight_decay:
    def decayed(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: 'log_scale' not in jax.tree_util.keystr(path), params)
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decayed), tx)
  return tx


def batch_indices(key: jax.Array, step: jax.Array, num_images: int,
                  batch_size: int) -> jax.Array:
  """`[batch_size]` image indices of `step`: epochs without replacement.

  Each epoch is a fresh permutation `permutation(fold_in(key, epoch))`; the
  `num_images % batch_size` images left over at its end are skipped.
  """
  steps_per_epoch = num_images // batch_size
  epoch, position = jnp.divmod(step, steps_per_epoch)
  order = jax.random.permutation(jax.random.fold_in(key, epoch), num_images)
  return jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))


def make_pretrain_step(backbone: Backbone,
                       optimizer: optax.GradientTransformation, *,
                       batch_size: int, augment: dict[str, Any],
                       batch_sharding: NamedSharding | None = None):
  """Builds `train_step(state, data) -> (state, metrics)`; jit it once.

  `state.params` is `{'backbone': ..., 'head': ...}`. The step draws its
  minibatch and augmentation on the device from the run key and
  `state.step`, so a resumed run repeats an uninterrupted one exactly.

  Args:
    augment: keyword arguments of `fewshot.data.augment.crop_and_flip`.
  """

  def loss_fn(params, model_state, images, labels):
    features, model_state = backbone.apply(params['backbone'], model_state,
                                           images, True)
    logits = head_logits(params['head'], features)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return jnp.mean(loss), ({'loss': jnp.mean(loss), 'accuracy': accuracy},
                            model_state)

  def train_step(state: TrainState, data: LabelledImages):
    order_key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    index = batch_indices(order_key, state.step, data.num_images, batch_size)
    images = crop_and_flip(jax.random.fold_in(step_key, state.step),
                           data.images[index], **augment)
    labels = data.labels[index]
    if batch_sharding is not None:
      images = jax.lax.with_sharding_constraint(images, batch_sharding)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, model_state)), grads = grad_fn(
        state.params, state.model_state, images, labels)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params,
                         model_state=model_state, opt_state=opt_state), metrics

  return train_step


def init_pretrain_state(backbone: Backbone,
                        optimizer: optax.GradientTransformation,
                        sample_images: np.ndarray, num_classes: int,
                        seed: int, head: dict[str, Any]) -> TrainState:
  """A fresh `TrainState` with `params = {'backbone', 'head'}`.

  `key(seed)` splits into the backbone init, head init and run keys.
  """
  backbone_key, head_key, run_key = jax.random.split(jax.random.key(seed), 3)
  sample_images = jnp.asarray(sample_images)
  params, model_state = backbone.init(backbone_key, sample_images)
  features = jax.eval_shape(
      lambda: backbone.apply(params, model_state, sample_images, False)[0])
  params = {'backbone': params,
            'head': init_head(head_key, features.shape[-1], num_classes,
                              **head)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=model_state, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(run_key))


def build(config: ml_collections.ConfigDict):
  """`(splits, backbone, algorithm, optimizer, eval_spec)` from a config.

  `algorithm` is the few-shot learner that evaluates the backbone.
  """
  data_options = dict(config.data)
  splits = data_lib.load_splits(data_options.pop('name'), **data_options)
  for split in ('train', 'val', 'test'):
    if split not in splits:
      raise ValueError(f'The dataset has no {split!r} split.')
  backbone_options = dict(config.backbone)
  backbone = backbones.create(backbone_options.pop('name'), **backbone_options)
  algorithm_options = dict(config.algorithm)
  name = algorithm_options.pop('name')
  if name not in ALGORITHMS:
    raise ValueError(
        f'Unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}.')
  check_options(ALGORITHMS[name], algorithm_options, f'algorithm {name!r}')
  algorithm = ALGORITHMS[name](backbone, **algorithm_options)
  check_options(init_head, config.head, 'the head')
  check_options(crop_and_flip, config.augment, 'augment')
  optimizer = make_pretrain_optimizer(num_steps=config.train.num_steps,
                                      **config.optimizer)
  if config.train.batch_size > splits['train'].images.shape[0]:
    raise ValueError(f'batch_size {config.train.batch_size} exceeds the '
                     f'{splits["train"].images.shape[0]} training images.')
  eval_spec = EpisodeSpec(config.eval.ways, config.eval.shots,
                          config.eval.queries)
  for split in ('val', 'test'):
    data_lib.check_spec(eval_spec, splits[split].class_counts(),
                        splits[split].class_names, f'meta-{split} split')
  return splits, backbone, algorithm, optimizer, eval_spec


def few_shot_evaluator(algorithm: Algorithm, algorithm_params: dict[str, Any],
                       spec: EpisodeSpec, num_episodes: int, *,
                       images_per_chunk: int = 2048):
  """Jitted `evaluate(params, model_state, data, key) -> [E]` accuracies.

  Runs `algorithm` in evaluation mode with the pretrained backbone
  `params['backbone']` in place of its own; the classifier head is unused.
  `algorithm_params` are the algorithm's other meta-parameters (e.g. the
  cosine scale, which does not change ProtoNet's predictions).
  """
  evaluate = episode_accuracies(algorithm, spec, num_episodes,
                                images_per_chunk=images_per_chunk)

  def run(params, model_state, data, key):
    meta_params = {**algorithm_params, 'backbone': params['backbone']}
    return evaluate(meta_params, model_state, data, key)

  return jax.jit(run)


def pretrain_and_evaluate(config: ml_collections.ConfigDict,
                          workdir: str) -> dict[str, Any]:
  """Pretrains as configured, resuming from `workdir` if it has checkpoints.

  SIGTERM or SIGINT (Ctrl-C) saves a checkpoint of the last completed step
  before the process stops, as in `fewshot.train.train_and_evaluate`.

  Returns:
    `{'step', 'val'}` few-shot metrics of the final backbone (and `'test'`
    if `config.eval.test_at_end`); or `{'step', 'stopped_by'}` (the
    signal's name) if a signal stopped training and its previous handler
    did not end the process.
  """
  os.makedirs(workdir, exist_ok=True)
  splits, backbone, algorithm, optimizer, eval_spec = build(config)
  mesh = task_mesh()
  batch_size = config.train.batch_size
  if batch_size % mesh.size:
    raise ValueError(f'batch_size {batch_size} does not divide evenly over '
                     f'{mesh.size} devices; use a multiple of {mesh.size}.')
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = (NamedSharding(mesh, PartitionSpec('data'))
                    if mesh.size > 1 else None)

  config_dict = config.to_dict()
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    write_json_atomic(config_path, config_dict)

  train_split = splits['train']
  state = init_pretrain_state(backbone, optimizer, train_split.images[:2],
                              train_split.num_classes, config.seed,
                              dict(config.head))
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'),
                              max_to_keep=config.train.max_checkpoints)
  if checkpointer.latest_step() is not None:
    state, _ = checkpointer.restore(jax.eval_shape(lambda: state))
    logging.info('Resumed from step %d in %s.', int(state.step), workdir)
  state = jax.device_put(state, replicated)
  train_data = jax.device_put(labelled_images(train_split), replicated)
  val_data = jax.device_put(data_lib.to_device(splits['val']), replicated)

  train_step = jax.jit(
      make_pretrain_step(backbone, optimizer, batch_size=batch_size,
                         augment=dict(config.augment),
                         batch_sharding=batch_sharding),
      donate_argnums=0)
  # The evaluating algorithm's own meta-parameters, if any (not the backbone).
  sample_images = jnp.asarray(train_split.images[:2])
  algorithm_params = dict(algorithm.init(jax.random.key(0), sample_images)[0])
  algorithm_params.pop('backbone')
  evaluator = functools.partial(
      few_shot_evaluator, algorithm, algorithm_params, eval_spec,
      images_per_chunk=config.eval.images_per_chunk)
  evaluate_val = evaluator(config.eval.val_episodes)
  val_key = jax.random.key(config.eval.seed + 1)
  log = MetricsLog(workdir)

  def validate(state: TrainState, step: int) -> dict[str, float]:
    accuracies = evaluate_val(state.params, state.model_state, val_data,
                              val_key)
    result = summarize(np.asarray(accuracies))
    logging.info('step %d: val %d-way %d-shot accuracy %.2f%% +- %.2f', step,
                 eval_spec.num_ways, eval_spec.num_shots,
                 100 * result['accuracy'], 100 * result['ci95'])
    log.write(step, val_accuracy=result['accuracy'], val_ci95=result['ci95'])
    return result

  state, stopped_by = run_training_loop(
      train_step, state, train_data, settings=config.train,
      checkpointer=checkpointer, config_dict=config_dict, log=log,
      validate=validate, items_per_step=batch_size, items='images')
  step = int(state.step)
  if stopped_by is not None:  # a previous handler that did not stop us
    return {'step': step, 'stopped_by': stopped_by}

  results = {'step': step, 'val': validate(state, step)}
  if config.eval.test_at_end:
    test_data = jax.device_put(data_lib.to_device(splits['test']), replicated)
    accuracies = evaluator(config.eval.num_episodes)(
        state.params, state.model_state, test_data,
        jax.random.key(config.eval.seed))
    results['test'] = summarize(np.asarray(accuracies))
    logging.info('test %d-way %d-shot accuracy %.2f%% +- %.2f over %d '
                 'episodes', eval_spec.num_ways, eval_spec.num_shots,
                 100 * results['test']['accuracy'],
                 100 * results['test']['ci95'], results['test']['episodes'])
    log.write(step, test_accuracy=results['test']['accuracy'],
              test_ci95=results['test']['ci95'])
  checkpointer.wait()
  checkpointer.close()
  return results
