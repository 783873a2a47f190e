"""Episodic meta-training: `train_and_evaluate(config, workdir)`.

This is the only module that reads a ConfigDict; everything below it takes
plain keyword arguments.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fewshot import backbones
from fewshot import data as data_lib
from fewshot import features as features_lib
from fewshot._utils import check_options
from fewshot.algorithms import ALGORITHMS
from fewshot.algorithms.base import Algorithm
from fewshot.checkpoint import Checkpointer
from fewshot.data.augment import crop_and_flip
from fewshot.data.sampling import DeviceDataset, EpisodeSpec
from fewshot.episodes import Episode
from fewshot.evaluate import episode_accuracies, summarize
from fewshot.features import FEATURE_ALGORITHMS
from fewshot.losses import meta_batch_value_and_grad


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, as arrays only (checkpointable)."""
  step: jax.Array         # [] int32, number of completed steps
  params: Any             # meta-parameters
  model_state: Any        # BatchNorm running statistics, if any
  opt_state: Any
  rng: jax.Array          # raw key data of the run's base key


def make_optimizer(*, name: str = 'adam', learning_rate: float = 1e-3,
                   schedule: str = 'constant', decay_every: int = 2000,
                   decay_factor: float = 0.5, warmup_steps: int = 0,
                   num_steps: int = 1, decay_start: int = 0,
                   weight_decay: float = 0.0,
                   clip_norm: float | None = None
                   ) -> optax.GradientTransformation:
  """Outer-loop optimizer: 'adam', 'adamw' or 'sgd' (momentum 0.9).

  Schedules: 'constant', 'step' (multiply by `decay_factor` every
  `decay_every` steps, as in the ProtoNet paper), 'cosine' (a cosine to
  zero at `num_steps`, held at `learning_rate` until `decay_start` if that
  is later than the warm-up); each after `warmup_steps` of linear warm-up.
  Every schedule keeps the same optimizer state (a step count), so a run
  can be resumed under another schedule: a constant-rate run continued
  with `schedule='cosine'` and `decay_start` at or after its current step
  (same optimizer, rate, warm-up and clipping) is the run that config
  gives from scratch.
  """
  if decay_start < 0 or (decay_start and schedule != 'cosine'):
    raise ValueError(f'decay_start ({decay_start}) applies to the cosine '
                     f'schedule only and must be >= 0; schedule is {schedule!r}.')
  if schedule == 'constant':
    lr = optax.constant_schedule(learning_rate)
  elif schedule == 'step':
    lr = optax.exponential_decay(learning_rate, decay_every, decay_factor,
                                 staircase=True)
  elif schedule == 'cosine':
    if decay_start and decay_start >= num_steps:
      raise ValueError(f'decay_start {decay_start} must come before num_steps '
                       f'{num_steps}.')
    start = max(decay_start, warmup_steps)
    lr = optax.cosine_decay_schedule(learning_rate, max(num_steps - start, 1))
    if start > warmup_steps:
      lr = optax.join_schedules(
          [optax.constant_schedule(learning_rate), lr], [start - warmup_steps])
  else:
    raise ValueError(f'Unknown schedule {schedule!r}: constant, step, cosine.')
  if warmup_steps:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), lr],
        [warmup_steps])
  if name == 'adam':
    tx = optax.adam(lr)
  elif name == 'adamw':
    tx = optax.adamw(lr, weight_decay=weight_decay)
  elif name == 'sgd':
    tx = optax.sgd(lr, momentum=0.9)
  else:
    raise ValueError(f'Unknown optimizer {name!r}: adam, adamw, sgd.')
  if clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx


def augment_episodes(key: jax.Array, episodes: Episode,
                     **options: Any) -> Episode:
  """Applies `crop_and_flip(**options)` to every support and query image.

  Each image draws its own crop offset and flip; shapes and labels are
  unchanged, so `episodes` may be one episode or a meta-batch `[T, ...]`.
  """
  if not options:
    return episodes
  support_key, query_key = jax.random.split(key)

  def augment(key, images):
    flat = images.reshape((-1,) + images.shape[-3:])
    return crop_and_flip(key, flat, **options).reshape(images.shape)

  return episodes.replace(
      support_images=augment(support_key, episodes.support_images),
      query_images=augment(query_key, episodes.query_images))


def make_train_step(algorithm: Algorithm, optimizer: optax.GradientTransformation,
                    spec: EpisodeSpec, meta_batch_size: int,
                    task_sharding: NamedSharding | None = None,
                    augment: dict[str, Any] | None = None):
  """Builds `train_step(state, data) -> (state, metrics)`; jit it once.

  The step draws its meta-batch on the device from `fold_in(rng, step)`, so
  a resumed run sees exactly the episodes an uninterrupted run would.
  `augment` (keyword arguments of `fewshot.data.augment.crop_and_flip`)
  augments the drawn episodes' images, also from that key.
  """
  augment = dict(augment or {})
  check_options(crop_and_flip, augment, 'train.augment')

  def train_step(state: TrainState, data: DeviceDataset):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    sample_key, algorithm_key = jax.random.split(key)
    episodes = data_lib.sample_meta_batch(sample_key, data, spec,
                                          meta_batch_size)
    if augment:
      episodes = augment_episodes(jax.random.fold_in(sample_key, 1), episodes,
                                  **augment)
    if task_sharding is not None:
      episodes = jax.lax.with_sharding_constraint(episodes, task_sharding)
    (_, (metrics, model_state)), grads = meta_batch_value_and_grad(
        algorithm, state.params, state.model_state, episodes, algorithm_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state=model_state, opt_state=opt_state)
    return new_state, metrics

  return train_step


def build_backbone(config: ml_collections.ConfigDict, *,
                   pretrained: bool = True) -> backbones.Backbone:
  """The backbone of `config.backbone` (with its `weights` if `pretrained`)."""
  backbone_options = dict(config.backbone)
  if not pretrained:
    backbone_options.pop('weights', None)
  return backbones.create(backbone_options.pop('name'), **backbone_options)


def build_algorithm(config: ml_collections.ConfigDict,
                    backbone: backbones.Backbone) -> Algorithm:
  """`config.algorithm` (a registered name and its options) on `backbone`."""
  algorithm_options = dict(config.algorithm)
  name = algorithm_options.pop('name')
  if name not in ALGORITHMS:
    raise ValueError(f'Unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}.')
  check_options(ALGORITHMS[name], algorithm_options, f'algorithm {name!r}')
  return ALGORITHMS[name](backbone, **algorithm_options)


def _load_splits(config: ml_collections.ConfigDict) -> dict[str, Any]:
  data_options = dict(config.data)
  splits = data_lib.load_splits(data_options.pop('name'), **data_options)
  for split in ('train', 'val', 'test'):
    if split not in splits:
      raise ValueError(f'The dataset has no {split!r} split.')
  return splits


def _eval_spec(config: ml_collections.ConfigDict, splits) -> EpisodeSpec:
  eval_spec = EpisodeSpec(config.eval.ways, config.eval.shots,
                          config.eval.queries)
  for split in ('val', 'test'):
    data_lib.check_spec(eval_spec, splits[split].class_counts(),
                        splits[split].class_names, f'meta-{split} split')
  return eval_spec


def build(config: ml_collections.ConfigDict, *, pretrained: bool = True):
  """Builds `(splits, algorithm, optimizer, train_spec, eval_spec)` from a config.

  With `pretrained=False` a `config.backbone.weights` source is not read (a
  run's own checkpoint supersedes the weights it started from).
  """
  splits = _load_splits(config)
  algorithm = build_algorithm(config,
                               build_backbone(config, pretrained=pretrained))
  optimizer_options = dict(config.optimizer)
  check_options(make_optimizer, optimizer_options, 'the optimizer')
  optimizer = make_optimizer(num_steps=config.train.num_steps,
                             **optimizer_options)
  train_spec = EpisodeSpec(config.train.ways, config.train.shots,
                           config.train.queries)
  data_lib.check_spec(train_spec, splits['train'].class_counts(),
                      splits['train'].class_names, 'meta-train split')
  return splits, algorithm, optimizer, train_spec, _eval_spec(config, splits)


def init_state(algorithm: Algorithm, optimizer: optax.GradientTransformation,
               sample_images: np.ndarray, seed: int) -> TrainState:
  """A fresh `TrainState`: `key(seed)` splits into the init key and the run key."""
  init_key, run_key = jax.random.split(jax.random.key(seed))
  params, model_state = algorithm.init(init_key, jnp.asarray(sample_images))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=model_state, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(run_key))


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to a temporary file, then renames it over `path`."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class MetricsLog:
  """Appends one JSON object per line to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, step: int, **values: Any) -> None:
    record = {'step': step, 'time': time.time()}
    record.update({k: float(v) if np.ndim(v) == 0 else v
                   for k, v in values.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def task_mesh() -> Mesh:
  """A 1-D mesh named 'data' over all devices: the task axis is split on it."""
  return Mesh(np.asarray(jax.devices()), ('data',))


class StopSignals:
  """Defers SIGTERM and SIGINT while training, so the loop can checkpoint.

  Inside the `with` block a first signal is only recorded (`received`); the
  training loop checks it after every step (validation is then skipped),
  saves a checkpoint and leaves the block, whose exit restores the previous
  handlers and raises the signal again (SIGTERM then ends the process as
  usual, SIGINT raises KeyboardInterrupt). A second signal before that is
  passed to the previous handler at once. A signal whose handler is
  `SIG_IGN` or not a Python one stays as it was. Nothing is installed
  outside the main thread (Python cannot) or when `enabled` is False
  (multi-process runs: the processes would stop at different steps).
  A signal is seen between steps, not inside a compiled step or the first
  step's compilation.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.received: int | None = None
    self._previous: dict[int, Any] = {}
    self._passed_on = False

  def __enter__(self) -> 'StopSignals':
    if self.enabled and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        previous = signal.getsignal(signum)
        if previous is None or previous is signal.SIG_IGN:
          continue
        signal.signal(signum, self._record)
        self._previous[signum] = previous
    return self

  def _record(self, signum, frame) -> None:
    del frame
    if self.received is not None:
      self._restore()
      self._passed_on = True
      signal.raise_signal(signum)
      return
    self.received = signum
    logging.warning('Received %s: stopping after this step with a checkpoint '
                    '(send it again to stop at once).',
                    signal.Signals(signum).name)

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __exit__(self, *exc_info) -> None:
    self._restore()
    if (self.received is not None and exc_info[0] is None
        and not self._passed_on):
      signal.raise_signal(self.received)


def run_training_loop(train_step: Callable[[TrainState, Any],
                                            tuple[TrainState, Any]],
                      state: TrainState, train_data: Any, *,
                      settings: ml_collections.ConfigDict,
                      checkpointer: Checkpointer, config_dict: dict[str, Any],
                      log: MetricsLog,
                      validate: Callable[[TrainState, int], Any],
                      items_per_step: int, items: str,
                      ) -> tuple[TrainState, str | None]:
  """Steps `state` to `settings.num_steps`, logging, validating and saving.

  The loop shared by meta-training and pretraining. `train_step(state,
  train_data) -> (state, metrics)` is a jitted step that may donate
  `state` (do not use the `state` passed in afterwards); `metrics` are
  scalars with 'loss' and 'accuracy', averaged over the steps since the
  last log line (every `log_every` steps) and written to `log` as
  `train_<name>` with the rate `<items>_per_second` (`items_per_step` per
  step). `validate(state, step)` runs every `eval_every` steps, except after
  the last (the caller validates the final state) or once a signal came. A
  checkpoint is written every `checkpoint_every_steps` steps or
  `checkpoint_every_secs` seconds and at the last step.

  SIGTERM or SIGINT stops the loop after the current step with a checkpoint
  (see `StopSignals`; single-process runs only); the signal then goes to
  its previous handler, which normally ends the process (SIGINT's raises
  KeyboardInterrupt here).

  Returns:
    `(state, stopped_by)`: the last state, and the name of the signal that
    stopped the loop if its previous handler returned, else None. The
    checkpointer's writes are finished; it is closed after a signal.
  """
  step = int(state.step)
  num_steps = settings.num_steps
  last_save_time = time.time()
  interval_start, interval_steps, metrics_sum = time.time(), 0, None
  with StopSignals(enabled=jax.process_count() == 1) as stop:
    while step < num_steps:
      state, metrics = train_step(state, train_data)
      step += 1
      interval_steps += 1
      metrics_sum = metrics if metrics_sum is None else jax.tree.map(
          jnp.add, metrics_sum, metrics)
      if step % settings.log_every == 0 or step == num_steps:
        means = {k: float(v) / interval_steps
                 for k, v in jax.device_get(metrics_sum).items()}
        rate = interval_steps * items_per_step / (time.time() - interval_start)
        logging.info('step %d: loss %.4f, accuracy %.3f, %.1f %s/s', step,
                     means['loss'], means['accuracy'], rate, items)
        log.write(step, **{f'{items}_per_second': rate},
                  **{f'train_{k}': v for k, v in means.items()})
        interval_start, interval_steps, metrics_sum = time.time(), 0, None
      if (step % settings.eval_every == 0 and step < num_steps
          and stop.received is None):
        validate(state, step)
        interval_start = time.time()  # validation time is not training time
      due = (step % settings.checkpoint_every_steps == 0 or
             time.time() - last_save_time > settings.checkpoint_every_secs)
      saved = due or step == num_steps
      if saved:
        checkpointer.save(step, state, config_dict)
        last_save_time = time.time()
      if stop.received is not None:
        if not saved:
          checkpointer.save(step, state, config_dict)
        logging.warning('Stopped at step %d with a checkpoint; run the same '
                        'command again to resume.', step)
        break
    # Inside the block: a signal that comes after the last step's check is
    # passed on only once the final checkpoint is written.
    checkpointer.wait()
    if stop.received is not None:
      checkpointer.close()
  if stop.received is not None:
    return state, signal.Signals(stop.received).name
  return state, None


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Meta-trains as configured, resuming from `workdir` if it has checkpoints.

  SIGTERM or SIGINT (Ctrl-C) during training saves a checkpoint of the
  last completed step before the process stops (see `StopSignals`; single
  process runs only); running the same command again resumes from it.

  Returns:
    The final validation (and, if `config.eval.test_at_end`, test) metrics;
    or `{'step', 'stopped_by'}` (the signal's name) if a signal stopped
    training and its previous handler did not end the process.
  """
  os.makedirs(workdir, exist_ok=True)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  resuming = os.path.isdir(checkpoint_dir) and any(
      name.isdigit() for name in os.listdir(checkpoint_dir))
  splits, algorithm, optimizer, train_spec, eval_spec = build(
      config, pretrained=not resuming)
  mesh = task_mesh()
  meta_batch_size = config.train.meta_batch_size
  if meta_batch_size % mesh.size:
    raise ValueError(
        f'meta_batch_size {meta_batch_size} does not divide evenly over '
        f'{mesh.size} devices; use a multiple of {mesh.size}.')
  replicated = NamedSharding(mesh, PartitionSpec())
  task_sharding = NamedSharding(mesh, PartitionSpec('data'))

  config_path = os.path.join(workdir, 'config.json')
  config_dict = config.to_dict()
  if not os.path.exists(config_path):
    write_json_atomic(config_path, config_dict)

  sample_images = splits['train'].images[:2]
  state = init_state(algorithm, optimizer, sample_images, config.seed)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'),
                              max_to_keep=config.train.max_checkpoints)
  if checkpointer.latest_step() is not None:
    state, _ = checkpointer.restore(jax.eval_shape(lambda: state))
    logging.info('Resumed from step %d in %s.', int(state.step), workdir)
  state = jax.device_put(state, replicated)

  train_data = data_lib.to_device(splits['train'])
  val_data = data_lib.to_device(splits['val'])
  train_data, val_data = jax.device_put((train_data, val_data), replicated)
  train_step = jax.jit(
      make_train_step(algorithm, optimizer, train_spec, meta_batch_size,
                      task_sharding, augment=config.train.get('augment')),
      donate_argnums=0)
  evaluate = jax.jit(episode_accuracies(algorithm, eval_spec,
                                        config.eval.val_episodes,
                                        images_per_chunk=config.eval.images_per_chunk))
  val_key = jax.random.key(config.eval.seed + 1)
  log = MetricsLog(workdir)

  def validate(state: TrainState, step: int) -> dict[str, float]:
    accuracies = evaluate(state.params, state.model_state, val_data, val_key)
    result = summarize(np.asarray(accuracies))
    logging.info('step %d: val accuracy %.2f%% +- %.2f (%d-way %d-shot)',
                 step, 100 * result['accuracy'], 100 * result['ci95'],
                 eval_spec.num_ways, eval_spec.num_shots)
    log.write(step, val_accuracy=result['accuracy'], val_ci95=result['ci95'])
    return result

  state, stopped_by = run_training_loop(
      train_step, state, train_data, settings=config.train,
      checkpointer=checkpointer, config_dict=config_dict, log=log,
      validate=validate, items_per_step=meta_batch_size, items='episodes')
  step = int(state.step)
  if stopped_by is not None:  # a previous handler that did not stop us
    return {'step': step, 'stopped_by': stopped_by}

  results = {'step': step, 'val': validate(state, step)}
  if config.eval.test_at_end:
    test_evaluate = jax.jit(episode_accuracies(
        algorithm, eval_spec, config.eval.num_episodes,
        images_per_chunk=config.eval.images_per_chunk))
    test_data = jax.device_put(data_lib.to_device(splits['test']), replicated)
    accuracies = test_evaluate(state.params, state.model_state, test_data,
                               jax.random.key(config.eval.seed))
    results['test'] = summarize(np.asarray(accuracies))
    logging.info('test accuracy %.2f%% +- %.2f over %d episodes',
                 100 * results['test']['accuracy'],
                 100 * results['test']['ci95'], results['test']['episodes'])
    log.write(step, test_accuracy=results['test']['accuracy'],
              test_ci95=results['test']['ci95'])
  checkpointer.wait()
  checkpointer.close()
  return results


def restore_workdir(config: ml_collections.ConfigDict, workdir: str):
  """Rebuilds the configured model and loads the latest checkpoint of `workdir`.

  Returns:
    `(algorithm, params, model_state, splits, eval_spec, step)`.
  """
  splits, algorithm, optimizer, _, eval_spec = build(config, pretrained=False)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoints in {workdir}: train first with '
                            f'experiments/train.py --workdir {workdir}.')
  state = init_state(algorithm, optimizer, splits['train'].images[:2],
                     config.seed)
  checkpointer = Checkpointer(directory)
  state, _ = checkpointer.restore(jax.eval_shape(lambda: state))
  checkpointer.close()
  return (algorithm, state.params, state.model_state, splits, eval_spec,
          int(state.step))


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | None,
                     *, split: str = 'test') -> dict[str, Any]:
  """Accuracy and 95% CI of a model on seeded episodes of `split`.

  The model is the latest checkpoint of `workdir`, or, with `workdir=None`,
  the configured model as built from `config.backbone.weights` (a
  pretrained backbone evaluated by a feature-based algorithm such as a
  linear probe, or fine-tuned per episode). Uses `config.eval` (ways, shots,
  queries, num_episodes, seed): the same episodes for every model evaluated
  with the same settings. With `config.eval.precompute_features`, the
  split is embedded once by the frozen backbone and the episodes are drawn
  over its features (`fewshot.features`); this needs an algorithm in
  `FEATURE_ALGORITHMS` and a backbone whose evaluation mode treats images
  independently (not `norm='batch'`).
  """
  precomputed = bool(config.eval.get('precompute_features', False))
  if precomputed:
    name = config.algorithm.name
    if name not in FEATURE_ALGORITHMS:
      raise ValueError(
          f'eval.precompute_features needs a frozen-feature algorithm '
          f'({", ".join(FEATURE_ALGORITHMS)}); {name!r} adapts the backbone.')
    if config.backbone.get('norm') == 'batch':
      raise ValueError(
          "eval.precompute_features needs per-image features, but norm='batch' "
          'normalises each episode with its own statistics.')
  if workdir is None:
    if not config.backbone.get('weights'):
      raise ValueError('Nothing to evaluate: give a workdir with checkpoints, '
                       'or config.backbone.weights (a pretrain workdir or a '
                       "named source such as 'imagenet').")
    splits = _load_splits(config)
    spec = _eval_spec(config, splits)
    backbone = build_backbone(config, pretrained=True)
    algorithm = build_algorithm(config, backbone)
    params, model_state = algorithm.init(
        jax.random.key(config.seed), jnp.asarray(splits[split].images[:2]))
    step = 0
  else:
    algorithm, params, model_state, splits, spec, step = restore_workdir(
        config, workdir)
    backbone = build_backbone(config, pretrained=False)
  start = time.time()
  data = data_lib.to_device(splits[split])
  extract_seconds = None
  if precomputed:
    algorithm, params, model_state, data = features_lib.on_features(
        functools.partial(build_algorithm, config), backbone, params,
        model_state, data,
        batch_size=config.eval.get('feature_batch_size', 256))
    jax.block_until_ready(data.images)
    extract_seconds = round(time.time() - start, 2)
  evaluate = jax.jit(episode_accuracies(
      algorithm, spec, config.eval.num_episodes,
      images_per_chunk=config.eval.images_per_chunk))
  accuracies = evaluate(params, model_state, data,
                        jax.random.key(config.eval.seed))
  result = summarize(np.asarray(accuracies))
  result.update(split=split, step=step, ways=spec.num_ways,
                shots=spec.num_shots, queries=spec.num_queries,
                algorithm=config.algorithm.name,
                backbone=config.backbone.name,
                weights=config.backbone.get('weights') if workdir is None
                else workdir,
                norm=config.backbone.get('norm'),
                seconds=round(time.time() - start, 2))
  if precomputed:
    result.update(precomputed_features=True,
                  feature_seconds=extract_seconds)
  return result


def evaluate_omniglot_runs(config: ml_collections.ConfigDict, workdir: str,
                           runs_dir: str) -> dict[str, Any]:
  """Lake's 20-way one-shot runs error rate of a workdir's checkpoint."""
  from fewshot.data.omniglot import read_omniglot_runs  # pylint: disable=g-import-not-at-top
  from fewshot.evaluate import omniglot_runs_error_rate  # pylint: disable=g-import-not-at-top
  runs = read_omniglot_runs(runs_dir, image_size=config.data.image_size)
  algorithm, params, model_state, _, _, step = restore_workdir(config, workdir)
  result = omniglot_runs_error_rate(algorithm, params, model_state, runs)
  result['step'] = step
  return result
