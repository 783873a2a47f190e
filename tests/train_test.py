"""The trainer end to end: training, resuming, compiling once, clear errors."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import chex
import jax
import numpy as np
import pytest

from fewshot import train
from fewshot.checkpoint import Checkpointer
from fewshot.data import sampling
from omniglot_runs_test import make_runs

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _tiny_config(steps=4):
  config = _load_config('protonet_synthetic', f'steps={steps}')
  config.data.num_classes = (12, 5, 5)
  config.data.images_per_class = 8
  config.train.ways = 5
  config.train.queries = 2
  config.train.log_every = 2
  config.train.eval_every = 2
  config.train.checkpoint_every_steps = 2
  config.eval.queries = 2
  config.eval.num_episodes = 10
  config.eval.val_episodes = 6
  config.eval.images_per_chunk = 40
  config.backbone.filters = 8
  return config


def _final_params(config, workdir):
  _, params, model_state, *_ = train.restore_workdir(config, workdir)
  return params, model_state


def test_two_steps_end_to_end(tmp_path):
  config = _tiny_config(steps=2)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 2
  assert 0.0 <= results['test']['accuracy'] <= 1.0
  assert results['test']['episodes'] == 10
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert any('train_loss' in r and np.isfinite(r['train_loss'])
             for r in records)
  assert any(r.get('episodes_per_second', 0) > 0 for r in records)
  assert json.load(open(tmp_path / 'config.json'))['train']['num_steps'] == 2


def _resume_and_compare(config, tmp_path, name, stopped_at):
  """Checks the stopped run kept `stopped_at`, resumes it to the end and
  compares it with the uninterrupted run in `tmp_path / 'straight'`."""
  workdir = tmp_path / name
  checkpointer = Checkpointer(workdir / 'checkpoints')
  assert checkpointer.latest_step() == stopped_at
  checkpointer.close()
  results = train.train_and_evaluate(config, str(workdir))
  assert results['step'] == config.train.num_steps
  straight = _final_params(config, str(tmp_path / 'straight'))
  resumed = _final_params(config, str(workdir))
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)
  return straight


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path,
                                                         monkeypatch):
  config = _tiny_config(steps=4)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  original_save = Checkpointer.save

  def save_then_die(self, step, state, config_dict):
    original_save(self, step, state, config_dict)
    if step == 2:
      self.wait()
      raise KeyboardInterrupt('simulated pre-emption after step 2')

  monkeypatch.setattr(Checkpointer, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'killed'))
  monkeypatch.setattr(Checkpointer, 'save', original_save)
  # Nothing written before the kill is lost.
  straight = _resume_and_compare(config, tmp_path, 'killed', stopped_at=2)
  # And training did move the parameters.
  fresh = train.init_state(*train.build(config)[1:3],
                           np.zeros((2, 28, 28, 1), np.uint8), config.seed)
  assert not np.array_equal(fresh.params['backbone']['conv0']['kernel'],
                            straight[0]['backbone']['conv0']['kernel'])


class _Terminated(Exception):
  pass


def test_sigterm_checkpoints_the_current_step_and_resumes(tmp_path,
                                                          monkeypatch):
  # SIGTERM between checkpoints (every 2 steps) arrives after step 3: the
  # trainer must save step 3, then stop by the previous handler.
  config = _tiny_config(steps=4)
  config.train.log_every = 1
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  original_write = train.MetricsLog.write

  def write_then_signal(self, step, **values):
    original_write(self, step, **values)
    if step == 3 and 'train_loss' in values:
      os.kill(os.getpid(), signal.SIGTERM)

  def raise_terminated(signum, frame):
    raise _Terminated(signum)

  monkeypatch.setattr(train.MetricsLog, 'write', write_then_signal)
  previous = signal.signal(signal.SIGTERM, raise_terminated)
  try:
    with pytest.raises(_Terminated):
      train.train_and_evaluate(config, str(tmp_path / 'stopped'))
    # The trainer put the test's handler back.
    assert signal.getsignal(signal.SIGTERM) is raise_terminated
  finally:
    signal.signal(signal.SIGTERM, previous)
  monkeypatch.setattr(train.MetricsLog, 'write', original_write)
  _resume_and_compare(config, tmp_path, 'stopped', stopped_at=3)


def test_stop_signals_leave_ignored_signals_and_other_threads_alone():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with train.StopSignals() as stop:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) == stop._record  # pylint: disable=protected-access
    assert stop.received is None
    seen = {}

    def in_thread():
      with train.StopSignals():
        seen['handler'] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen['handler'] is signal.getsignal(signal.SIGTERM)
    with train.StopSignals(enabled=False):
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def test_train_step_compiles_once():
  config = _tiny_config()
  splits, algorithm, optimizer, spec, _ = train.build(config)
  state = train.init_state(algorithm, optimizer, splits['train'].images[:2], 0)
  step_fn = train.make_train_step(algorithm, optimizer, spec, 2)
  step_fn = jax.jit(chex.assert_max_traces(step_fn, n=1), donate_argnums=0)
  data = sampling.to_device(splits['train'])
  losses = []
  for _ in range(3):
    state, metrics = step_fn(state, data)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 3 and np.isfinite(losses).all()


def test_augmented_episodes_are_shifted_copies():
  config = _tiny_config()
  splits = train.build(config)[0]
  data = sampling.to_device(splits['train'])
  episodes = sampling.sample_meta_batch(
      jax.random.key(0), data, sampling.EpisodeSpec(5, 2, 2), 2)
  key = jax.random.key(1)
  augmented = train.augment_episodes(key, episodes, crop_padding=2,
                                     pad_mode='edge')
  np.testing.assert_array_equal(augmented.support_labels,
                                episodes.support_labels)
  again = train.augment_episodes(key, episodes, crop_padding=2,
                                 pad_mode='edge')
  np.testing.assert_array_equal(again.query_images, augmented.query_images)
  shifted = 0
  for before, after in [(episodes.support_images, augmented.support_images),
                        (episodes.query_images, augmented.query_images)]:
    before = np.asarray(before).reshape((-1,) + before.shape[-3:])
    after = np.asarray(after).reshape(before.shape)
    height, width = before.shape[1:3]
    for original, image in zip(before, after):
      padded = np.pad(original, ((2, 2), (2, 2), (0, 0)), mode='edge')
      offsets = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[dy:dy + height, dx:dx + width],
                                   image)]
      assert offsets, 'an augmented image is not a shifted copy'
      shifted += (2, 2) not in offsets
  assert shifted > 0  # not the identity


def test_train_step_rejects_unknown_augmentation():
  config = _tiny_config()
  splits, algorithm, optimizer, spec, _ = train.build(config)
  with pytest.raises(ValueError, match="Unknown option.*'rotate'"):
    train.make_train_step(algorithm, optimizer, spec, 2,
                          augment=dict(rotate=10))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
  config = _tiny_config(steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  config.backbone.filters = 4
  with pytest.raises(ValueError, match='another architecture.*has shape'):
    train.evaluate_workdir(config, str(tmp_path))
  config.backbone.filters = 8
  config.backbone.norm = 'batch'  # no running statistics in this mode
  with pytest.raises(ValueError, match='another architecture'):
    train.evaluate_workdir(config, str(tmp_path))


@pytest.mark.parametrize('section,key', [('algorithm', 'temperature'),
                                         ('backbone', 'width'),
                                         ('optimizer', 'beta'),
                                         ('data', 'colour')])
def test_unknown_config_option_is_a_clear_error(section, key):
  config = _tiny_config()
  config[section][key] = 1
  with pytest.raises(ValueError, match=f"Unknown option.*'{key}'"):
    train.build(config)


def test_impossible_episodes_are_named(tmp_path):
  config = _tiny_config()
  config.eval.ways = 20
  with pytest.raises(ValueError, match='20-way.*meta-val split has only 5'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_evaluate_without_checkpoints_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoints'):
    train.evaluate_workdir(_tiny_config(), str(tmp_path))


def test_experiment_scripts_end_to_end(tmp_path):
  """train.py then evaluate.py as a user runs them; the last line is JSON."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  common = ['--config', str(REPO / 'configs' / 'protonet_synthetic.py:steps=3'),
            '--workdir', str(tmp_path), '--config.eval.num_episodes=20',
            '--config.backbone.filters=8']
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'train.py'),
                  *common], check=True, env=env, capture_output=True)
  out = subprocess.run(
      [sys.executable, str(REPO / 'experiments' / 'evaluate.py'), *common],
      check=True, env=env, capture_output=True, text=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result['episodes'] == 20 and 0 <= result['accuracy'] <= 1
  assert result['ci95'] >= 0 and result['norm'] == 'batch_running'
  make_runs(tmp_path / 'all_runs')
  out = subprocess.run(
      [sys.executable, str(REPO / 'experiments' / 'evaluate.py'), *common,
       '--protocol', 'omniglot_runs', '--runs_dir', str(tmp_path / 'all_runs')],
      check=True, env=env, capture_output=True, text=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result['trials'] == 40 and 0 <= result['error_rate'] <= 100
  bad = subprocess.run(
      [sys.executable, str(REPO / 'experiments' / 'evaluate.py'), *common,
       '--config.train.no_such_key=1'], env=env, capture_output=True, text=True)
  assert bad.returncode != 0 and 'no_such_key' in bad.stderr


def test_cosine_after_decay_start_continues_a_constant_run():
  """The schedules share one optimizer state, and `decay_start` holds the
  rate until then: a constant-rate state continues under the cosine."""
  params = {'w': np.ones(3, np.float32)}
  constant = train.make_optimizer(learning_rate=0.1, num_steps=10)
  cosine = train.make_optimizer(learning_rate=0.1, schedule='cosine',
                                num_steps=10, decay_start=6)
  grads = {'w': np.array([1.0, -2.0, 0.5], np.float32)}
  state_c, state_d = constant.init(params), cosine.init(params)
  chex.assert_trees_all_equal_structs(state_c, state_d)
  updates = []
  for step in range(10):
    update_c, state_c = constant.update(grads, state_c, params)
    update_d, state_d = cosine.update(grads, state_d, params)
    updates.append((update_c['w'], update_d['w']))
  for step, (update_c, update_d) in enumerate(updates):
    # Constant to step 6, then 0.1 * (1 + cos(pi * (step - 6) / 4)) / 2,
    # i.e. the constant run's Adam update scaled by the cosine factor.
    factor = 1.0 if step <= 6 else 0.5 * (1 + np.cos(np.pi * (step - 6) / 4))
    np.testing.assert_allclose(update_d, factor * update_c, rtol=1e-6)
  assert float(np.abs(updates[9][1]).max()) < 0.2 * 0.1
  with pytest.raises(ValueError, match='decay_start'):
    train.make_optimizer(schedule='cosine', num_steps=10, decay_start=10)
  with pytest.raises(ValueError, match='cosine schedule only'):
    train.make_optimizer(schedule='constant', num_steps=10, decay_start=5)
