"""The harness end to end: training, resuming, compiling once, clear errors.

The episodic objective (`configs/protonet_synthetic.py`) drives these tests;
`supervised_test.py` runs the same harness on the supervised objective and
`objectives_test.py` on an objective defined in the test itself.
"""

import json
import os
import signal
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from fewshot import builder
from fewshot import harness
from fewshot import workdir as workdir_lib
from fewshot.checkpoint import Checkpointer
from fewshot.data import sampling
from fewshot.evaluators import episode_accuracies
from fewshot.evaluators import workdir as evaluation
from fewshot.objectives import init_state, make_train_step
from fewshot.stats import summarize
from helpers import REPO, killed_after_checkpoint, load_config
from omniglot_runs_test import make_runs


def _tiny_config(steps=4):
  config = load_config('protonet_synthetic', f'steps={steps}')
  config.data.num_classes = (12, 5, 5)
  config.data.images_per_class = 8
  config.objective.ways = 5
  config.objective.queries = 2
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
  params, model_state, _ = evaluation.restore(
      builder.build(config, pretrained=False), workdir)
  return params, model_state


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
  """A finished 2-step run: `(config, workdir, results)`, for tests that
  only read it."""
  workdir = tmp_path_factory.mktemp('two_steps')
  config = _tiny_config(steps=2)
  return config, workdir, harness.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """An uninterrupted 4-step run's workdir, which the stopped runs resume to
  the end and are compared with (its config differs from theirs at most in
  `log_every`, which trains nothing)."""
  workdir = tmp_path_factory.mktemp('straight')
  harness.train_and_evaluate(_tiny_config(steps=4), str(workdir))
  return workdir


def test_two_steps_end_to_end(two_steps):
  config, workdir, results = two_steps
  assert results['step'] == 2
  # The reported test figure is the seeded episodes' accuracy of the saved
  # parameters, computed here independently of the harness.
  experiment = builder.build(config)
  params, model_state, step = evaluation.restore(experiment, str(workdir))
  assert step == 2
  spec = sampling.EpisodeSpec(config.eval.ways, config.eval.shots,
                              config.eval.queries)
  accuracies = jax.jit(episode_accuracies(
      experiment.learner.algorithm, spec, config.eval.num_episodes))(
          params, model_state,
          sampling.to_device(builder.load_splits(config.data)['test']),
          jax.random.key(config.eval.seed))
  expected = summarize(np.asarray(accuracies))
  assert results['test']['episodes'] == 10
  np.testing.assert_allclose(results['test']['accuracy'],
                             expected['accuracy'], rtol=1e-6)
  np.testing.assert_allclose(results['test']['ci95'], expected['ci95'],
                             rtol=1e-6)
  # metrics.jsonl holds both steps' training losses, as one log line per
  # `log_every` steps, and the test figure; config.json the config.
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  train_records = [r for r in records if 'train_loss' in r]
  assert [r['step'] for r in train_records] == [2]
  assert np.isfinite(train_records[0]['train_loss'])
  assert train_records[0]['episodes_per_second'] > 0
  assert [r['test_accuracy'] for r in records if 'test_accuracy' in r] == [
      results['test']['accuracy']]
  assert json.load(open(workdir / 'config.json'))['train']['num_steps'] == 2


def _resume_and_compare(config, straight_dir, workdir, stopped_at):
  """Checks the stopped run kept `stopped_at`, resumes it to the end and
  compares it with the uninterrupted run in `straight_dir`."""
  checkpointer = Checkpointer(workdir / 'checkpoints')
  assert checkpointer.latest_step() == stopped_at
  checkpointer.close()
  results = harness.train_and_evaluate(config, str(workdir))
  assert results['step'] == config.train.num_steps
  straight = _final_params(config, str(straight_dir))
  resumed = _final_params(config, str(workdir))
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)
  return straight


def test_resume_after_a_kill_equals_an_uninterrupted_run(straight_run,
                                                         tmp_path,
                                                         monkeypatch):
  config = _tiny_config(steps=4)
  killed_after_checkpoint(monkeypatch, 2, lambda: harness.train_and_evaluate(
      config, str(tmp_path / 'killed')))
  # Nothing written before the kill is lost.
  straight = _resume_and_compare(config, straight_run, tmp_path / 'killed',
                                 stopped_at=2)
  # And training did move the parameters.
  experiment = builder.build(config)
  fresh = init_state(experiment.objective, experiment.optimizer,
                     experiment.train_data, config.seed)
  assert not np.array_equal(fresh.params['backbone']['conv0']['kernel'],
                            straight[0]['backbone']['conv0']['kernel'])


class _Terminated(Exception):
  pass


def test_sigterm_checkpoints_the_current_step_and_resumes(straight_run,
                                                          tmp_path,
                                                          monkeypatch):
  # SIGTERM between checkpoints (every 2 steps) arrives after step 3: the
  # trainer must save step 3, then stop by the previous handler.
  config = _tiny_config(steps=4)
  config.train.log_every = 1
  original_write = workdir_lib.MetricsLog.write

  def write_then_signal(self, step, **values):
    original_write(self, step, **values)
    if step == 3 and 'train_loss' in values:
      os.kill(os.getpid(), signal.SIGTERM)

  def raise_terminated(signum, frame):
    raise _Terminated(signum)

  monkeypatch.setattr(workdir_lib.MetricsLog, 'write', write_then_signal)
  previous = signal.signal(signal.SIGTERM, raise_terminated)
  try:
    with pytest.raises(_Terminated):
      harness.train_and_evaluate(config, str(tmp_path / 'stopped'))
    # The trainer put the test's handler back.
    assert signal.getsignal(signal.SIGTERM) is raise_terminated
  finally:
    signal.signal(signal.SIGTERM, previous)
  monkeypatch.setattr(workdir_lib.MetricsLog, 'write', original_write)
  _resume_and_compare(config, straight_run, tmp_path / 'stopped',
                      stopped_at=3)


def test_train_step_compiles_once():
  config = _tiny_config()
  experiment = builder.build(config)
  state = init_state(experiment.objective, experiment.optimizer,
                     experiment.train_data, 0)
  step_fn = make_train_step(experiment.objective, experiment.optimizer)
  step_fn = jax.jit(chex.assert_max_traces(step_fn, n=1), donate_argnums=0)
  losses = []
  for _ in range(3):
    state, metrics = step_fn(state, experiment.train_data)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 3 and np.isfinite(losses).all()


def test_objective_rejects_unknown_augmentation():
  config = _tiny_config()
  config.objective.augment = dict(rotate=10)
  with pytest.raises(ValueError, match="Unknown option.*'rotate'"):
    builder.build(config)


def test_checkpoint_of_another_architecture_is_a_clear_error(two_steps):
  config, workdir, _ = two_steps
  config = config.copy_and_resolve_references()
  config.backbone.filters = 4
  with pytest.raises(ValueError, match='another architecture.*has shape'):
    evaluation.evaluate_workdir(builder.build(config, pretrained=False),
                                  str(workdir))
  config.backbone.filters = 8
  config.backbone.norm = 'batch'  # no running statistics in this mode
  with pytest.raises(ValueError, match='another architecture'):
    evaluation.evaluate_workdir(builder.build(config, pretrained=False),
                                  str(workdir))


@pytest.mark.parametrize('section,key', [('algorithm', 'temperature'),
                                         ('backbone', 'width'),
                                         ('optimizer', 'beta'),
                                         ('objective', 'tasks'),
                                         ('data', 'colour')])
def test_unknown_config_option_is_a_clear_error(section, key):
  config = _tiny_config()
  config[section][key] = 1
  with pytest.raises(ValueError, match=f"Unknown option.*'{key}'"):
    builder.build(config)


def test_unknown_objective_and_missing_objective_are_clear_errors(tmp_path):
  config = _tiny_config()
  config.objective.name = 'reinforce'
  with pytest.raises(ValueError, match="Unknown objective 'reinforce'"):
    builder.build(config)
  config.objective.name = 'episodic'
  config.objective.algorithm = 'maml'  # the builder supplies the algorithm
  with pytest.raises(ValueError, match='objective.algorithm is set by the '
                     'builder'):
    builder.build(config)
  del config.objective['algorithm'], config.objective['queries']
  with pytest.raises(ValueError, match=r"needs \['queries'\]"):
    builder.build(config)
  del config['objective']
  with pytest.raises(ValueError, match='no objective section'):
    harness.train_and_evaluate(config, str(tmp_path))


def test_impossible_episodes_are_named(tmp_path):
  config = _tiny_config()
  config.eval.ways = 20
  with pytest.raises(ValueError, match='20-way.*meta-val split has only 5'):
    harness.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_evaluate_without_checkpoints_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoints'):
    evaluation.evaluate_workdir(builder.build(_tiny_config()), str(tmp_path))


def test_experiment_scripts_end_to_end(tmp_path):
  """train.py then evaluate.py as a user runs them; the last line is JSON."""
  # The processes share one compilation cache (this test's own): each
  # evaluate.py finds the backbone's initialisation and, for the episodes
  # protocol, the evaluation train.py compiled; with as many validation as
  # test episodes, train.py's validation and test are one program too.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'compilation_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  common = ['--config', str(REPO / 'configs' / 'protonet_synthetic.py:steps=3'),
            '--workdir', str(tmp_path / 'workdir'),
            '--config.eval.num_episodes=20', '--config.eval.val_episodes=20',
            '--config.backbone.filters=8']
  # Bad flags fail before any training: run beside the training and evaluation below.
  bad_key = subprocess.Popen(
      [sys.executable, str(REPO / 'experiments' / 'evaluate.py'), *common,
       '--config.train.no_such_key=1'], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  # A config argument of the wrong type is named, not read as something else.
  bad_type = subprocess.Popen(
      [sys.executable, str(REPO / 'experiments' / 'train.py'), '--config',
       str(REPO / 'configs' / 'protonet_synthetic.py:steps=three'),
       '--workdir', str(tmp_path / 'bad')], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
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
  stderr = bad_key.communicate(timeout=300)[1]
  assert bad_key.returncode != 0 and 'no_such_key' in stderr
  stderr = bad_type.communicate(timeout=300)[1]
  assert bad_type.returncode != 0 and "steps='three' is not of type int" in stderr
