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
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fewshot import builder
from fewshot import workdir as workdir_lib
from fewshot.checkpoint import Checkpointer
from fewshot.experiment import Experiment
from fewshot.objectives.base import TrainState, init_state, make_train_step
from fewshot.signals import StopSignals


def task_mesh() -> Mesh:
  """A 1-D mesh named 'data' over all devices: the batch axis is split on it."""
  return Mesh(np.asarray(jax.devices()), ('data',))


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


def run_training_loop(train_step: Callable[[TrainState, Any],
                                            tuple[TrainState, Any]],
                      state: TrainState, train_data: Any, *,
                      settings: ml_collections.ConfigDict,
                      checkpointer: Checkpointer, config_dict: dict[str, Any],
                      log: workdir_lib.MetricsLog,
                      validate: Callable[[TrainState, int], Any],
                      items_per_step: int, items: str,
                      ) -> tuple[TrainState, str | None]:
  """Steps `state` to `settings.num_steps`, logging, validating and saving.

  `train_step(state, train_data) -> (state, metrics)` is a jitted step that
  may donate `state` (do not use the `state` passed in afterwards);
  `metrics` are scalars, averaged over the steps since the last log line
  (every `log_every` steps) and written to `log` as `train_<name>` with the
  rate `<items>_per_second` (`items_per_step` per step). `validate(state,
  step)` runs every `eval_every` steps, except after the last (the caller
  validates the final state) or once a signal came. A checkpoint is written
  every `checkpoint_every_steps` steps or `checkpoint_every_secs` seconds
  and at the last step.

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
        logging.info('%s, %.1f %s/s', _log_line(step, 'train', means), rate,
                     items)
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
  """Trains the configured objective, resuming from `workdir`'s checkpoints.

  Builds the experiment (`fewshot.builder.build`; a run that resumes does
  not read `backbone.weights` again) and runs `train` with the config's
  `train` settings and `eval.test_at_end`; the config is saved beside the
  checkpoints.
  """
  if 'objective' not in config:
    raise ValueError('The config has no objective section, so there is '
                     'nothing to train: evaluate it with experiments/'
                     'evaluate.py, or add objective=dict(name=...).')
  experiment = builder.build(
      config, pretrained=not workdir_lib.has_checkpoints(workdir))
  return train(experiment, workdir, settings=config.train,
               config_dict=config.to_dict(),
               test_at_end=config.eval.test_at_end)


def train(experiment: Experiment, workdir: str, *, settings: Any,
          config_dict: dict[str, Any], test_at_end: bool = True
          ) -> dict[str, Any]:
  """Trains `experiment.objective`, resuming from `workdir` if it has checkpoints.

  Args:
    experiment: what to train and how to evaluate it (`fewshot.builder`).
    workdir: checkpoints, `config.json` and `metrics.jsonl` go here.
    settings: `num_steps`, `log_every`, `eval_every`,
      `checkpoint_every_steps`, `checkpoint_every_secs`, `max_checkpoints`
      (attributes, e.g. a config's `train` section).
    config_dict: what `config.json` and each checkpoint record.
    test_at_end: run `experiment.evaluators['test']` on the final state.

  SIGTERM or SIGINT (Ctrl-C) during training saves a checkpoint of the
  last completed step before the process stops (see `StopSignals`; single
  process runs only); running the same command again resumes from it.

  Returns:
    `{'step', 'val'}` (and `'test'`): the evaluators' summaries of the
    final state; or `{'step', 'stopped_by'}` (the signal's name) if a
    signal stopped training and its previous handler did not end the
    process.
  """
  mesh = task_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  state = init_state(experiment.objective, experiment.optimizer,
                     experiment.train_data, experiment.seed)
  batch_size = _batch_size(experiment, state, mesh.size)
  if 'parameters' in experiment.info:
    logging.info('%s: %s', experiment.info.get('backbone'),
                 experiment.info['parameters'])

  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config_once(workdir, config_dict)
  checkpointer = Checkpointer(workdir_lib.checkpoint_dir(workdir),
                              max_to_keep=settings.max_checkpoints)
  if checkpointer.latest_step() is not None:
    state, _ = checkpointer.restore(jax.eval_shape(lambda: state))
    logging.info('Resumed from step %d in %s.', int(state.step), workdir)
  state = jax.device_put(state, replicated)
  train_data = jax.device_put(experiment.train_data, replicated)
  batch_sharding = (NamedSharding(mesh, PartitionSpec('data'))
                    if mesh.size > 1 else None)
  train_step = jax.jit(make_train_step(experiment.objective,
                                       experiment.optimizer, batch_sharding),
                       donate_argnums=0)
  log = workdir_lib.MetricsLog(workdir)

  def report(split: str, evaluate, state: TrainState,
             step: int) -> dict[str, Any]:
    result = evaluate(state.params, state.model_state)
    logging.info(_log_line(step, split, result))
    log.write(step, **{f'{split}_{k}': v for k, v in result.items()
                       if isinstance(v, (int, float))
                       and not isinstance(v, bool)})
    return result

  state, stopped_by = run_training_loop(
      train_step, state, train_data, settings=settings,
      checkpointer=checkpointer, config_dict=config_dict, log=log,
      validate=lambda state, step: report('val', experiment.validate, state,
                                          step),
      items_per_step=batch_size, items=experiment.objective.unit)
  step = int(state.step)
  if stopped_by is not None:  # a previous handler that did not stop us
    return {'step': step, 'stopped_by': stopped_by}
  results = {'step': step, 'val': report('val', experiment.validate, state,
                                         step)}
  if test_at_end:
    results['test'] = report('test', experiment.evaluators['test'], state,
                             step)
  checkpointer.wait()
  checkpointer.close()
  return results


__all__ = ['run_training_loop', 'task_mesh', 'train', 'train_and_evaluate']
