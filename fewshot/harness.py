"""One harness for every objective: `train_and_evaluate(config, workdir)`.

It builds the experiment (`fewshot.builder`), puts the state and the
training data on a 1-D device mesh named 'data' (the batch or task axis of
every step is split over it), initialises the state or resumes it from the
workdir's latest checkpoint, and runs the jitted step of
`fewshot.objectives.make_train_step` with logging (`metrics.jsonl`), the
validation cadence, orbax checkpoints, safe stops on SIGTERM/SIGINT, and a
test at the end. It never asks which objective it runs.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fewshot import builder
from fewshot._utils import tree_size
from fewshot import workdir as workdir_lib
from fewshot.checkpoint import Checkpointer
from fewshot.experiment import Experiment
from fewshot.mesh import TASK_AXIS, task_mesh
from fewshot.objectives.base import TrainState, init_state, make_train_step
from fewshot.ops.paths import selected_paths
from fewshot.progress import format_duration
from fewshot.config_drift import check_config_drift, record_config
from fewshot.signals import StopSignals


def _batch_size(experiment: Experiment, state: TrainState,
                devices: int) -> int:
  """The number of `objective.unit`s in a batch (its leaves checked).

  Every leaf needs a leading batch axis that divides over the devices; the
  count is `objective.batch_units(batch)` if the objective defines it, else
  the one leading axis all leaves share.
  """
  objective = experiment.objective
  batch = jax.eval_shape(
      objective.sample,
      jax.random.wrap_key_data(state.rng), state.step, experiment.train_data)
  sizes = {leaf.shape[0] if leaf.ndim else None
           for leaf in jax.tree.leaves(batch)}
  if None in sizes or (len(sizes) != 1 and objective.batch_units is None):
    raise ValueError(f'Every leaf of a batch needs the same leading batch '
                     f'axis; the objective\'s have {sorted(map(str, sizes))}.')
  uneven = sorted(size for size in sizes if size % devices)
  if uneven:
    name = objective.batch_size_name
    raise ValueError(f'{name} {uneven[0]} does not divide evenly over '
                     f'{devices} devices; use a multiple of {devices}.')
  if objective.batch_units is not None:
    return int(objective.batch_units(batch))
  return sizes.pop()


def _log_line(step: int, split: str, result: dict[str, Any]) -> str:
  names = sorted((k for k, v in result.items() if isinstance(v, float)),
                 key=lambda k: (k != 'loss', k))
  shown = ', '.join(f'{k} {result[k]:.4g}' for k in names)
  return f'step {step}: {split} {shown}'


class NonFiniteError(FloatingPointError):
  """Training met a non-finite loss or gradient and stopped (see `train`)."""


@flax.struct.dataclass
class _Interval:
  """The steps since the last log line, summed on the device (no host sync).

  `sums` adds the metrics of finite steps only; `first_bad` is the first
  non-finite step (the step count after it; -1: none) and `bad_metrics` its metrics; `run` counts
  the non-finite steps in a row up to the last one, `longest_run` the most.
  """
  sums: Any
  finite_steps: jax.Array
  bad_steps: jax.Array
  first_bad: jax.Array
  bad_metrics: Any
  run: jax.Array
  longest_run: jax.Array

  @classmethod
  def start(cls, metrics_shape: Any, run: Any = 0) -> '_Interval':
    """An empty interval; `run` non-finite steps in a row came before."""
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), metrics_shape)
    zero = jnp.zeros((), jnp.int32)
    run = jnp.asarray(run, jnp.int32)
    return cls(zeros, zero, zero, zero - 1, zeros, run, run)


@jax.jit
def _accumulate(interval: _Interval, metrics: Any, step: jax.Array
                ) -> _Interval:
  bad = metrics['nonfinite'] > 0
  first = bad & (interval.first_bad < 0)
  run = jnp.where(bad, interval.run + 1, 0)
  return _Interval(
      sums=jax.tree.map(lambda a, m: a + jnp.where(bad, 0, m),
                        interval.sums, metrics),
      finite_steps=interval.finite_steps + jnp.where(bad, 0, 1),
      bad_steps=interval.bad_steps + jnp.where(bad, 1, 0),
      first_bad=jnp.where(first, step, interval.first_bad),
      bad_metrics=jax.tree.map(lambda a, m: jnp.where(first, m, a),
                               interval.bad_metrics, metrics),
      run=run, longest_run=jnp.maximum(interval.longest_run, run))


def _nonfinite_names(metrics: dict[str, float]) -> str:
  bad = [f'{k} {metrics[k]}' for k in sorted(metrics, key=lambda k: (
      k != 'loss', k)) if k != 'nonfinite' and not np.isfinite(metrics[k])]
  return ', '.join(bad) or 'a non-finite value'


def run_training_loop(train_step: Callable[[TrainState, Any],
                                            tuple[TrainState, Any]],
                      state: TrainState, train_data: Any, *,
                      settings: ml_collections.ConfigDict,
                      checkpointer: Checkpointer, config_dict: dict[str, Any],
                      log: workdir_lib.MetricsLog,
                      validate: Callable[[TrainState, int], Any],
                      items_per_step: int, items: str,
                      first_metrics: Any = None,
                      ) -> tuple[TrainState, str | None]:
  """Steps `state` to `settings.num_steps`, logging, validating and saving.

  `train_step(state, train_data) -> (state, metrics)` is a jitted step that
  may donate `state` (do not use the `state` passed in afterwards);
  `metrics` are scalars with `nonfinite` (see `make_train_step`), averaged
  over the finite steps since the last log line (every `log_every` steps)
  and written to `log` as `train_<name>` with the rate
  `<items>_per_second` (`items_per_step` per step) and the estimated time
  left. `validate(state, step)` runs every `eval_every` steps, except after
  the last (the caller validates the final state) or once a signal came. A
  checkpoint is written every `checkpoint_every_steps` steps or
  `checkpoint_every_secs` seconds and at the last step. A caller that ran
  the step producing `state` itself (to time its compilation) passes its
  metrics as `first_metrics`: it is logged, validated and saved as the
  loop's own (its time is not in the rate).

  Non-finite steps (`settings.nonfinite`): with 'stop' (the default) the
  loop raises `NonFiniteError` naming the first such step and its
  non-finite metrics at the next log line, validation or checkpoint, before
  anything is validated or saved; the newest checkpoint is the last good
  state. With 'skip' (the step must then have been built with
  `skip_nonfinite=True`) such updates are dropped and counted in the log
  (`train_nonfinite_steps`); more than `max_consecutive_nonfinite` in a row
  raise `NonFiniteError`. Either way the check reads only what the log line,
  validation or checkpoint reads anyway: no extra host sync per step.

  SIGTERM or SIGINT stops the loop after the current step with a checkpoint
  (see `StopSignals`; single-process runs only); the signal then goes to
  its previous handler, which normally ends the process (SIGINT's raises
  KeyboardInterrupt here).

  Returns:
    `(state, stopped_by)`: the last state, and the name of the signal that
    stopped the loop if its previous handler returned, else None. The
    checkpointer's writes are finished; it is closed after a signal.

  Raises:
    NonFiniteError: see above (the checkpointer's writes are finished).
  """
  step = int(state.step) - (first_metrics is not None)
  num_steps = settings.num_steps
  policy = getattr(settings, 'nonfinite', 'stop')
  if policy not in ('stop', 'skip'):
    raise ValueError(f"train.nonfinite must be 'stop' or 'skip', got "
                     f'{policy!r}.')
  max_run = getattr(settings, 'max_consecutive_nonfinite', 20)
  last_save_time = time.time()
  interval_start, interval_steps, interval = time.time(), 0, None
  metrics_shape, run = None, 0  # run: non-finite steps in a row so far
  train_seconds, trained_steps = 0.0, 0  # for the time left

  def check(interval: _Interval | None) -> None:
    """Raises NonFiniteError if the interval's non-finite steps say so."""
    if interval is None:
      return
    first_bad, longest = map(int, jax.device_get(
        (interval.first_bad, interval.longest_run)))
    if first_bad < 0 or (policy == 'skip' and longest <= max_run):
      return
    bad = {k: float(v) for k, v in
           jax.device_get(interval.bad_metrics).items()}
    log.write(first_bad, **{f'train_{k}': v for k, v in bad.items()})
    checkpointer.wait()
    latest = checkpointer.latest_step()
    kept = (f'the newest checkpoint (step {latest}) is the last one saved'
            if latest is not None else 'no checkpoint had been saved yet')
    if policy == 'stop':
      raise NonFiniteError(
          f'Training step {first_bad} gave {_nonfinite_names(bad)}; '
          f'stopped before saving or validating that state ({kept}). Lower '
          "the learning rate, or set --config.train.nonfinite=skip to drop "
          'such updates.')
    raise NonFiniteError(
        f'{longest} training steps in a row were non-finite (more than '
        f'train.max_consecutive_nonfinite={max_run}), from step '
        f'{first_bad} with {_nonfinite_names(bad)}; stopped ({kept}).')

  with StopSignals(enabled=jax.process_count() == 1) as stop:
    while step < num_steps:
      if first_metrics is None:
        state, metrics = train_step(state, train_data)
        interval_steps += 1
      else:  # the caller's step: untimed
        metrics, first_metrics = first_metrics, None
        interval_start = time.time()
      if interval is None:
        metrics_shape = metrics_shape or jax.eval_shape(lambda: metrics)
        interval = _Interval.start(metrics_shape, run)
      interval = _accumulate(interval, metrics, state.step)
      step += 1
      if step % settings.log_every == 0 or step == num_steps:
        check(interval)
        sums, finite_steps, bad_steps = jax.device_get(
            (interval.sums, interval.finite_steps, interval.bad_steps))
        means = {k: float(v) / finite_steps if finite_steps else float('nan')
                 for k, v in sums.items() if k != 'nonfinite'}
        seconds = time.time() - interval_start
        train_seconds += seconds
        trained_steps += interval_steps
        rate = interval_steps * items_per_step / max(seconds, 1e-9)
        left = (num_steps - step) * train_seconds / max(trained_steps, 1)
        skipped = {'nonfinite_steps': float(bad_steps)} if (
            policy == 'skip') else {}
        logging.info('%s, %.1f %s/s, %s left%s',
                     _log_line(step, 'train', means), rate, items,
                     format_duration(left),
                     f', {int(bad_steps)} non-finite steps skipped'
                     if bad_steps else '')
        log.write(step, **{f'{items}_per_second': rate},
                  **{f'train_{k}': v for k, v in {**means, **skipped}.items()})
        run = interval.run
        interval_start, interval_steps, interval = time.time(), 0, None
      if (step % settings.eval_every == 0 and step < num_steps
          and stop.received is None):
        check(interval)
        validate(state, step)
        interval_start = time.time()  # validation time is not training time
      due = (step % settings.checkpoint_every_steps == 0 or
             time.time() - last_save_time > settings.checkpoint_every_secs)
      saved = due or step == num_steps
      if saved or stop.received is not None:
        check(interval)
        checkpointer.save(step, state, config_dict)
        last_save_time = time.time()
      if stop.received is not None:
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains the configured objective, resuming from `workdir`'s checkpoints.

  Builds the experiment (`fewshot.builder.build`; a run that resumes does
  not read `backbone.weights` again) and runs `train` with the config's
  `train` settings and `eval.test_at_end`; the config is saved beside the
  checkpoints. Resuming with a config that changes the computation is an
  error unless `allow_config_change` (see
  `fewshot.config_drift.check_config_drift`); it is checked before anything
  is built.
  """
  if 'objective' not in config:
    raise ValueError('The config has no objective section, so there is '
                     'nothing to train: evaluate it with experiments/'
                     'evaluate.py, or add objective=dict(name=...).')
  check_config_drift(workdir, config.to_dict(),
                     allow_change=allow_config_change)
  experiment = builder.build(
      config, pretrained=not workdir_lib.has_checkpoints(workdir))
  return train(experiment, workdir, settings=config.train,
               config_dict=config.to_dict(),
               test_at_end=config.eval.test_at_end,
               allow_config_change=allow_config_change)


def train(experiment: Experiment, workdir: str, *, settings: Any,
          config_dict: dict[str, Any], test_at_end: bool = True,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Trains `experiment.objective`, resuming from `workdir`'s checkpoints.

  Args:
    experiment: what to train and how to evaluate it (`fewshot.builder`).
    workdir: checkpoints, `config.json`, `metrics.jsonl` (and TensorBoard
      events under `tensorboard/`) go here.
    settings: `num_steps`, `log_every`, `eval_every`,
      `checkpoint_every_steps`, `checkpoint_every_secs`, `max_checkpoints`,
      and optionally `nonfinite` ('stop' or 'skip', see
      `run_training_loop`), `max_consecutive_nonfinite` and `tensorboard`
      (attributes, e.g. a config's `train` section).
    config_dict: what `config.json` and each checkpoint record; resuming
      with one that changes the computation raises unless
      `allow_config_change` (`check_config_drift`).
    test_at_end: run `experiment.evaluators['test']` on the final state.

  Resuming reads the newest readable checkpoint: newer ones whose files are
  truncated or corrupt are moved to `checkpoints/unreadable/` with a
  warning. Until the first step has run, nothing in `workdir` is written
  (a run that fails to start leaves an existing workdir as it was).
  SIGTERM or SIGINT (Ctrl-C) during training saves a checkpoint of the
  last completed step before the process stops (see `StopSignals`; single
  process runs only); running the same command again resumes from it.

  Returns:
    `{'step', 'val'}` (and `'test'`): the evaluators' summaries of the
    final state; or `{'step', 'stopped_by'}` (the signal's name) if a
    signal stopped training and its previous handler did not end the
    process.

  Raises:
    NonFiniteError: a non-finite loss or gradient (see `run_training_loop`).
  """
  changes = check_config_drift(workdir, config_dict,
                               allow_change=allow_config_change)
  mesh = task_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  state = init_state(experiment.objective, experiment.optimizer,
                     experiment.train_data, experiment.seed)
  batch_size = _batch_size(experiment, state, mesh.size)
  skip_nonfinite = getattr(settings, 'nonfinite', 'stop') == 'skip'
  devices = jax.devices()
  logging.info('%s on %d %s device(s) (%s), %s code paths, XLA_FLAGS=%r.',
               experiment.info.get('parameters',
                                   f'{tree_size(state.params):,} parameters'),
               len(devices), devices[0].platform, devices[0].device_kind,
               selected_paths(), os.environ.get('XLA_FLAGS', ''))

  if workdir_lib.has_checkpoints(workdir):
    checkpointer = Checkpointer(workdir_lib.checkpoint_dir(workdir),
                                max_to_keep=settings.max_checkpoints)
    state, _ = checkpointer.restore(jax.eval_shape(lambda: state))
    logging.info('Resumed from step %d in %s.', int(state.step), workdir)
  else:
    checkpointer = None  # created with the first write
  state = jax.device_put(state, replicated)
  train_data = jax.device_put(experiment.train_data, replicated)
  batch_sharding = (NamedSharding(mesh, PartitionSpec(TASK_AXIS))
                    if mesh.size > 1 else None)
  train_step = jax.jit(make_train_step(experiment.objective,
                                       experiment.optimizer, batch_sharding,
                                       skip_nonfinite=skip_nonfinite),
                       donate_argnums=0)
  first_metrics, start_step = None, int(state.step)
  if start_step < settings.num_steps:
    start = time.time()
    state, first_metrics = train_step(state, train_data)
    jax.block_until_ready(first_metrics)
    logging.info('Compiled the train step and ran step %d in %.1f s.',
                 int(state.step), time.time() - start)

  # The first step ran: from here on the run writes to its workdir.
  os.makedirs(workdir, exist_ok=True)
  record_config(workdir, config_dict, changes, start_step)
  if checkpointer is None:
    checkpointer = Checkpointer(workdir_lib.checkpoint_dir(workdir),
                                max_to_keep=settings.max_checkpoints)
  log = workdir_lib.MetricsLog(workdir, tensorboard=getattr(
      settings, 'tensorboard', False))

  def report(split: str, evaluate, state: TrainState,
             step: int) -> dict[str, Any]:
    result = evaluate(state.params, state.model_state)
    logging.info(_log_line(step, split, result))
    log.write(step, **{f'{split}_{k}': v for k, v in result.items()
                       if isinstance(v, (int, float))
                       and not isinstance(v, bool)})
    log.flush()
    return result

  try:
    state, stopped_by = run_training_loop(
        train_step, state, train_data, settings=settings,
        checkpointer=checkpointer, config_dict=config_dict, log=log,
        validate=lambda state, step: report('val', experiment.validate,
                                            state, step),
        items_per_step=batch_size, items=experiment.objective.unit,
        first_metrics=first_metrics)
    step = int(state.step)
    if stopped_by is not None:  # a previous handler that did not stop us
      return {'step': step, 'stopped_by': stopped_by}
    results = {'step': step, 'val': report('val', experiment.validate,
                                           state, step)}
    if test_at_end:
      results['test'] = report('test', experiment.evaluators['test'], state,
                               step)
    checkpointer.wait()
    checkpointer.close()
    return results
  finally:
    log.close()


__all__ = ['NonFiniteError', 'run_training_loop', 'task_mesh', 'train',
           'train_and_evaluate']
