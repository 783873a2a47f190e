"""Nothing lost, nothing silent: non-finite steps, damaged checkpoints,
config drift, strict-JSON metrics, TensorBoard events and progress logs.

The harness runs on the episodic objective of `configs/protonet_synthetic.py`
with a two-block Conv-4 (quick to compile); the step and the loop are also
tested on toy objectives defined here.
"""

import hashlib
import json
import logging
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fewshot import builder
from fewshot import config_drift
from fewshot import harness
from fewshot import workdir as workdir_lib
from fewshot.checkpoint import (ArchitectureMismatch, Checkpointer,
                                UnreadableCheckpoints)
from fewshot.evaluators import workdir as evaluation
from fewshot.objectives import Objective, TrainState, make_train_step
from helpers import load_config


def _tiny_config(steps=4):
  config = load_config('protonet_synthetic', f'steps={steps}')
  config.data.num_classes = (12, 5, 5)
  config.data.images_per_class = 8
  config.data.image_size = 12
  config.objective.ways = 5
  config.objective.queries = 2
  config.train.log_every = 2
  config.train.eval_every = 100
  config.train.checkpoint_every_steps = 2
  config.eval.queries = 2
  config.eval.num_episodes = 4
  config.eval.val_episodes = 4
  config.eval.images_per_chunk = 40
  config.backbone.filters = 8
  config.backbone.num_blocks = 2
  return config


def _toy_objective(bad_steps=(2,)):
  """A scalar weight fit to 1 whose loss is NaN at the steps `bad_steps`
  (the batch is the step number)."""

  def init(key, data):
    del data
    return {'w': jnp.zeros(())}, {'count': jnp.zeros(())}, key

  def sample(run_key, step, data):
    del run_key, data
    return step[None]

  def loss(params, model_state, batch, key):
    del key
    bad = jnp.isin(batch[0], jnp.asarray(bad_steps))
    value = (params['w'] - 1.0) ** 2 * jnp.where(bad, jnp.nan, 1.0)
    return value, ({'loss': value}, {'count': model_state['count'] + 1})

  return Objective(init=init, sample=sample, loss=loss)


def _toy_state(objective, optimizer):
  params, model_state, key = objective.init(jax.random.key(0), None)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=model_state, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(key))


@pytest.mark.parametrize('skip', [False, True])
def test_step_reports_nonfinite_and_skip_keeps_the_state(skip):
  objective, optimizer = _toy_objective(), optax.adam(0.1)
  step = jax.jit(make_train_step(objective, optimizer, skip_nonfinite=skip))
  state = _toy_state(objective, optimizer)
  flags, states = [], []
  for _ in range(4):
    state, metrics = step(state, None)
    flags.append(float(metrics['nonfinite']))
    states.append(state)
  # The batch of step index 2 is non-finite; without skipping, so is every
  # step after it (the parameters are NaN).
  assert flags == [0.0, 0.0, 1.0, 0.0 if skip else 1.0]
  assert int(state.step) == 4
  if skip:
    # The skipped step left parameters, model state and optimizer state.
    jax.tree.map(np.testing.assert_array_equal,
                 (states[1].params, states[1].model_state, states[1].opt_state),
                 (states[2].params, states[2].model_state, states[2].opt_state))
    assert np.isfinite(float(state.params['w']))
    assert float(state.params['w']) != float(states[2].params['w'])
  else:
    assert np.isnan(float(state.params['w']))


def _loop(tmp_path, objective, settings, optimizer=None):
  """Runs `run_training_loop` on a toy objective; `(state, log records,
  checkpoint steps)`."""
  optimizer = optimizer or optax.sgd(0.1)
  skip = settings.get('nonfinite') == 'skip'
  step = jax.jit(make_train_step(objective, optimizer, skip_nonfinite=skip),
                 donate_argnums=0)
  settings = ml_collections.ConfigDict(dict(
      dict(log_every=2, eval_every=1000, checkpoint_every_steps=2,
           checkpoint_every_secs=1e9), **settings))
  checkpointer = Checkpointer(tmp_path / 'checkpoints')
  log = workdir_lib.MetricsLog(tmp_path)
  validated = []
  try:
    state, _ = harness.run_training_loop(
        step, _toy_state(objective, optimizer), None, settings=settings,
        checkpointer=checkpointer, config_dict={}, log=log,
        validate=lambda state, s: validated.append(s), items_per_step=1,
        items='steps')
  finally:
    steps = checkpointer._manager.all_steps()  # pylint: disable=protected-access
    checkpointer.close()
  return state, workdir_lib.read_metrics(tmp_path), sorted(steps)


def test_first_nonfinite_step_stops_before_saving_it(tmp_path):
  # NaN at the 5th step (index 4): the checkpoint of step 4 stays newest.
  with pytest.raises(harness.NonFiniteError,
                     match=r'step 5 gave loss nan.*step 4\) is the last'):
    _loop(tmp_path, _toy_objective(bad_steps=(4,)), dict(num_steps=8))
  checkpointer = Checkpointer(tmp_path / 'checkpoints')
  assert checkpointer.latest_step() == 4
  checkpointer.close()
  records = workdir_lib.read_metrics(tmp_path)
  assert np.isnan(records[-1]['train_loss']) and records[-1]['step'] == 5
  # The file is strict JSON: no bare NaN.
  for line in open(tmp_path / workdir_lib.METRICS):
    json.loads(line, parse_constant=lambda c: pytest.fail(f'bare {c}'))


def test_skip_counts_nonfinite_steps_and_averages_the_finite_ones(tmp_path):
  state, records, steps = _loop(tmp_path, _toy_objective(bad_steps=(1, 5)),
                                dict(num_steps=6, nonfinite='skip'))
  train = [r for r in records if 'train_loss' in r]
  assert [r['train_nonfinite_steps'] for r in train] == [1.0, 0.0, 1.0]
  assert all(np.isfinite(r['train_loss']) for r in train)
  assert steps[-1] == 6 and np.isfinite(float(state.params['w']))
  # A run of more non-finite steps than allowed stops.
  with pytest.raises(harness.NonFiniteError, match='3 training steps in a row'):
    _loop(tmp_path / 'many', _toy_objective(bad_steps=(1, 2, 3)),
          dict(num_steps=6, nonfinite='skip', max_consecutive_nonfinite=2))


def test_a_diverging_run_stops_with_the_step_and_keeps_good_checkpoints(
    tmp_path):
  config = _tiny_config(steps=6)
  config.optimizer.learning_rate = 1e12
  with pytest.raises(harness.NonFiniteError,
                     match=r'Training step \d+ gave .*nan'):
    harness.train_and_evaluate(config, str(tmp_path))
  records = workdir_lib.read_metrics(tmp_path)
  bad = [r['step'] for r in records if r.get('train_nonfinite')]
  assert bad, records
  if workdir_lib.has_checkpoints(tmp_path):  # any checkpoint is a good one
    config.optimizer.learning_rate = 1e-3
    state = workdir_lib.restore_state(
        tmp_path, _initial_state(config))
    assert int(state.step) < bad[0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def _initial_state(config):
  from fewshot.objectives import init_state  # pylint: disable=g-import-not-at-top
  experiment = builder.build(config, pretrained=False)
  return init_state(experiment.objective, experiment.optimizer,
                    experiment.train_data, experiment.seed)


def _files(directory):
  """`{relative path: sha256}` of every file under `directory`."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return found


def _damage(step_dir, how):
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      data = open(path, 'rb').read()
      if how == 'empty':
        data = b''
      elif how == 'truncate':
        data = data[:len(data) // 2]
      with open(path, 'wb') as f:
        f.write(data)


@pytest.fixture(scope='module')
def four_steps(tmp_path_factory):
  """A finished 4-step run (checkpoints at 2 and 4) and its config."""
  workdir = tmp_path_factory.mktemp('four')
  config = _tiny_config(steps=4)
  config.eval.test_at_end = False
  harness.train_and_evaluate(config, str(workdir))
  return config, workdir


def _copy(workdir, target):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(workdir, target)
  return target


@pytest.fixture(scope='module')
def six_steps(four_steps, tmp_path_factory):
  """`four_steps` resumed to 6 steps, undamaged: `(config, workdir)`."""
  config, source = four_steps
  config = config.copy_and_resolve_references()
  config.train.num_steps = 6
  workdir = _copy(source, tmp_path_factory.mktemp('six') / 'run')
  harness.train_and_evaluate(config, str(workdir))
  return config, workdir


@pytest.mark.parametrize('how', ['truncate', 'empty'])
def test_a_damaged_latest_checkpoint_falls_back_and_is_moved_aside(
    four_steps, six_steps, tmp_path, how, caplog):
  config, source = four_steps
  workdir = _copy(source, tmp_path / 'run')
  latest = workdir / 'checkpoints' / '4'
  _damage(latest, how)
  damaged = _files(latest)
  experiment = builder.build(config, pretrained=False)
  # Evaluation reads the one before it, and leaves the workdir alone.
  with caplog.at_level(logging.WARNING):
    params, _, step = evaluation.restore(experiment, str(workdir))
  assert step == 2 and 'step 4' in caplog.text and latest.exists()
  # Resuming moves it aside (unchanged) and trains on from step 2.
  config, straight = six_steps
  results = harness.train_and_evaluate(config, str(workdir))
  assert results['step'] == 6
  assert _files(workdir / 'checkpoints' / 'unreadable' / '4') == damaged
  # Steps 3 and 4 were trained again: the run equals one never damaged.
  resumed = evaluation.restore(experiment, str(workdir))
  expected = evaluation.restore(experiment, str(straight))
  jax.tree.map(np.testing.assert_array_equal, resumed[:2], expected[:2])


def test_no_readable_checkpoint_is_a_clear_error(four_steps, tmp_path):
  config, source = four_steps
  workdir = _copy(source, tmp_path / 'run')
  for step in ('2', '4'):
    _damage(workdir / 'checkpoints' / step, 'truncate')
  with pytest.raises(UnreadableCheckpoints, match='None of the checkpoints'):
    evaluation.restore(builder.build(config, pretrained=False), str(workdir))


def test_config_drift_is_an_error_unless_allowed(four_steps, tmp_path):
  config, source = four_steps
  workdir = _copy(source, tmp_path / 'run')
  before = _files(workdir)
  changed = config.copy_and_resolve_references()
  changed.train.num_steps = 6
  changed.optimizer.learning_rate = 0.5
  changed.objective.queries = 3
  with pytest.raises(ValueError, match=(
      r'2 field\(s\):\n  objective.queries: 2 in the workdir, 3 now\n'
      r'  optimizer.learning_rate: 0.001 in the workdir, 0.5 now')):
    harness.train_and_evaluate(changed, str(workdir))
  assert _files(workdir) == before  # nothing written
  # Logging, evaluation and (under a constant schedule) the step count may
  # change; with the flag, the rest too, and the change is recorded.
  results = harness.train_and_evaluate(changed, str(workdir),
                                       allow_config_change=True)
  assert results['step'] == 6
  record, = [json.loads(l)
             for l in open(workdir / config_drift.CONFIG_CHANGES)]
  assert record['step'] == 4
  assert record['changes'] == {'objective.queries': [2, 3],
                               'optimizer.learning_rate': [0.001, 0.5],
                               'train.num_steps': [4, 6]}
  assert json.load(open(workdir / 'config.json'))['objective']['queries'] == 3


def test_a_run_that_fails_to_start_leaves_the_workdir_as_it_was(four_steps,
                                                                tmp_path):
  config, source = four_steps
  workdir = _copy(source, tmp_path / 'run')
  before = _files(workdir)
  other = config.copy_and_resolve_references()
  other.backbone.filters = 4
  other.train.num_steps = 6
  with pytest.raises(ArchitectureMismatch, match='another architecture'):
    harness.train_and_evaluate(other, str(workdir), allow_config_change=True)
  assert _files(workdir) == before


def _scalar_events(directory):
  """`{tag: [(step, value)]}` of the TensorBoard event files under
  `directory`, read with tensorboardX's protobuf (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  found = {}
  for name in sorted(os.listdir(directory)):
    data = open(os.path.join(directory, name), 'rb').read()
    offset = 0
    while offset < len(data):
      length, = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, value.simple_value))
  return found


def test_metrics_are_mirrored_as_tensorboard_events_and_progress_logged(
    tmp_path, caplog):
  config = _tiny_config(steps=4)
  config.train.eval_every = 2
  with caplog.at_level(logging.INFO):
    harness.train_and_evaluate(config, str(tmp_path))
  records = workdir_lib.read_metrics(tmp_path)
  events = _scalar_events(tmp_path / workdir_lib.TENSORBOARD)
  for key, tag in (('train_loss', 'train/loss'),
                   ('val_accuracy', 'val/accuracy'),
                   ('test_accuracy', 'test/accuracy')):
    logged = [(r['step'], r[key]) for r in records if key in r]
    assert len(logged) >= 1
    steps, values = zip(*events[tag])
    assert list(steps) == [s for s, _ in logged]
    np.testing.assert_allclose(values, [v for _, v in logged], rtol=1e-6)
  # The first lines: parameters, devices, the compiled step's time; every
  # training line an estimate of the time left.
  text = caplog.text
  assert 'parameters' in text and 'cpu device' in text
  assert 'Compiled the train step and ran step 1 in' in text
  train_lines = [l for l in text.splitlines() if ': train loss' in l]
  assert len(train_lines) == 2 and all(' left' in l for l in train_lines)


def test_long_evaluations_log_progress_and_time_left(monkeypatch, caplog):
  from fewshot import progress  # pylint: disable=g-import-not-at-top
  from fewshot.algorithms import protonet  # pylint: disable=g-import-not-at-top
  from fewshot.backbones.base import identity_backbone  # pylint: disable=g-import-not-at-top
  from fewshot.data import sampling  # pylint: disable=g-import-not-at-top
  from fewshot.data.dataset import ClassDataset  # pylint: disable=g-import-not-at-top
  from fewshot.evaluators import FewShotLearner, few_shot_evaluator  # pylint: disable=g-import-not-at-top
  assert progress.format_duration(3725) == '1h02m'
  assert progress.format_duration(250) == '4m10s'
  # Every call of the clock is a minute later: each block is a minute long.
  clock = iter(range(0, 10**6, 60))
  monkeypatch.setattr(progress, '_clock', lambda: next(clock))
  labels = np.repeat(np.arange(4), 3).astype(np.int32)
  dataset = ClassDataset((labels[:, None, None, None] * 50).astype(np.uint8)
                         .repeat(2, 1).repeat(2, 2), labels, tuple('abcd'))
  algorithm = protonet(identity_backbone())
  params, state = algorithm.init(jax.random.key(0), dataset.images[:2])
  evaluate = few_shot_evaluator(FewShotLearner(algorithm, lambda p: p),
                                dataset, sampling.EpisodeSpec(2, 1, 1), 40,
                                jax.random.key(1))
  with caplog.at_level(logging.INFO):
    assert evaluate(params, state)['episodes'] == 40
  lines = [l for l in caplog.text.splitlines() if '2-way 1-shot episodes' in l]
  # 20 blocks of 2 episodes; a line per block but the last.
  assert len(lines) == 19
  # 30 s per episode so far, every time.
  assert lines[0].endswith('2/40, 19m00s left')
  assert lines[-1].endswith('38/40, 1m00s left')


_KILL_CONFIG = """
import importlib.util

def get_config():
  spec = importlib.util.spec_from_file_location('base', {base!r})
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  config = base.get_config('steps={steps}')
  config.data.num_classes = (12, 5, 5)
  config.data.images_per_class = 8
  config.data.image_size = 12
  config.objective.ways = 5
  config.objective.queries = 2
  config.backbone.filters = 8
  config.backbone.num_blocks = 2
  config.train.log_every = 1
  config.train.eval_every = 1000
  config.train.checkpoint_every_steps = 1
  config.eval.test_at_end = False
  return config
"""


def _kill_config(tmp_path, steps):
  """A small protonet_synthetic config file that checkpoints every step,
  and the config it defines."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'kill_config.py'
  path.write_text(_KILL_CONFIG.format(
      base=str(REPO / 'configs' / 'protonet_synthetic.py'), steps=steps))
  spec = importlib.util.spec_from_file_location('kill_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module.get_config()


def _train_command(config_path, workdir):
  import sys  # pylint: disable=g-import-not-at-top
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  return [sys.executable, str(REPO / 'experiments' / 'train.py'), '--config',
          str(config_path), '--workdir', str(workdir)]


def _lines(path):
  return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.fixture(scope='module')
def script_run(tmp_path_factory):
  """An unkilled train.py run of `_KILL_CONFIG`: `(config path, config,
  workdir, env)`; the processes share a compilation cache."""
  import subprocess  # pylint: disable=g-import-not-at-top
  tmp_path = tmp_path_factory.mktemp('script')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'compilation_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  config_path, config = _kill_config(tmp_path, _KILL_STEPS)
  workdir = tmp_path / 'straight'
  subprocess.run(_train_command(config_path, workdir), env=env, check=True,
                 capture_output=True)
  return config_path, config, workdir, env


_KILL_STEPS = 40


def test_sigkill_at_random_moments_then_finishing_equals_a_straight_run(
    script_run, tmp_path):
  """train.py killed with SIGKILL 4 times at random moments (a checkpoint
  is written after every step, so most kills land in or near a write), then
  run to the end: its parameters are bit-identical to an unkilled run's."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  config_path, config, straight, env = script_run
  killed = tmp_path / 'killed'
  rng = np.random.default_rng(0)
  metrics, kills, in_writes = killed / workdir_lib.METRICS, 0, 0
  while kills < 4:
    seen = _lines(metrics)
    process = subprocess.Popen(_train_command(config_path, killed), env=env,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None and _lines(metrics) <= seen:
      time.sleep(0.02)  # until this process has trained a step
    time.sleep(rng.uniform(0, 0.4))
    if process.poll() is not None:  # finished before the kill
      break
    process.send_signal(signal.SIGKILL)
    process.wait()
    kills += 1
    # An unfinished write leaves orbax's temporary folder behind.
    in_writes += any('tmp' in name
                     for name in os.listdir(killed / 'checkpoints'))
  assert kills >= 2, 'the run finished before it could be killed twice'
  subprocess.run(_train_command(config_path, killed), env=env, check=True,
                 capture_output=True)
  from helpers import restore_train_state  # pylint: disable=g-import-not-at-top
  expected, _, _ = restore_train_state(config, straight)
  got, _, _ = restore_train_state(config, killed)
  assert int(got.step) == _KILL_STEPS
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  print(f'{kills} kills, {in_writes} during a checkpoint write')


def test_evaluating_with_another_model_names_the_config_fields(script_run):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  config_path, _, workdir, env = script_run
  result = subprocess.run(
      [sys.executable, str(REPO / 'experiments' / 'evaluate.py'), '--config',
       str(config_path), '--workdir', str(workdir),
       '--config.backbone.filters=4'], env=env, capture_output=True,
      text=True, check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('evaluate.py: The checkpoint at step 40'), last
  assert last.endswith("config.json in: backbone.filters: 8 there, 4 here.")
