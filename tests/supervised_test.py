"""The supervised objective: pretraining through the harness, resuming, loading."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import builder
from fewshot import harness
from fewshot import workdir as workdir_lib
from fewshot.checkpoint import Checkpointer
from fewshot.data import sampling
from fewshot.evaluators import episode_accuracies
from fewshot.evaluators import workdir as evaluation
from helpers import killed_after_checkpoint, load_config, restore_train_state


def _tiny_config(steps=4):
  config = load_config('pretrain_synthetic', f'steps={steps}')
  # Equal widths: few distinct kernel shapes, so the random init compiles fast.
  config.backbone.widths = (4, 4, 4, 4)
  config.train.log_every = 2
  config.train.eval_every = 100
  config.train.checkpoint_every_steps = 2
  config.eval.test_at_end = False
  config.eval.val_episodes = 4
  return config


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """Four uninterrupted steps; shared by the tests that only read it."""
  workdir = tmp_path_factory.mktemp('straight')
  config = _tiny_config(steps=4)
  results = harness.train_and_evaluate(config, str(workdir))
  return config, workdir, results


def test_run_writes_metrics_and_config(straight_run):
  config, workdir, results = straight_run
  assert results['step'] == 4 and 0 <= results['val']['accuracy'] <= 1
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert any(r.get('images_per_second', 0) > 0 for r in records)
  assert all(np.isfinite(r['train_loss']) for r in records
             if 'train_loss' in r)
  saved = json.load(open(workdir / 'config.json'))
  assert saved['backbone']['name'] == 'resnet12'
  assert saved['train']['num_steps'] == config.train.num_steps


def test_resume_after_a_kill_equals_an_uninterrupted_run(straight_run,
                                                         tmp_path,
                                                         monkeypatch):
  config, straight_dir, _ = straight_run
  killed_after_checkpoint(monkeypatch, 2, lambda: harness.train_and_evaluate(
      config, str(tmp_path)))
  _resume_and_compare(config, straight_dir, tmp_path, stopped_at=2)


def _resume_and_compare(config, straight_dir, workdir, stopped_at):
  """Checks the stopped run kept `stopped_at`, resumes it to the end and
  compares its state with the uninterrupted run's, bit for bit."""
  checkpointer = Checkpointer(workdir / 'checkpoints')
  assert checkpointer.latest_step() == stopped_at
  checkpointer.close()
  assert harness.train_and_evaluate(config, str(workdir))['step'] == 4
  straight, *_ = restore_train_state(config, straight_dir)
  resumed, *_ = restore_train_state(config, workdir)
  jax.tree.map(np.testing.assert_array_equal,
               (straight.params, straight.model_state, straight.opt_state),
               (resumed.params, resumed.model_state, resumed.opt_state))


def test_ctrl_c_checkpoints_the_current_step_and_resumes(straight_run,
                                                         tmp_path,
                                                         monkeypatch):
  # SIGINT after step 3 (checkpoints are every 2 steps): the run must save
  # step 3, then raise KeyboardInterrupt as Ctrl-C does.
  config, straight_dir, _ = straight_run
  config = config.copy_and_resolve_references()
  config.train.log_every = 1
  original_write = workdir_lib.MetricsLog.write

  def write_then_interrupt(self, step, **values):
    original_write(self, step, **values)
    if step == 3 and 'train_loss' in values:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(workdir_lib.MetricsLog, 'write', write_then_interrupt)
  # Python's own Ctrl-C handler, whatever pytest was started with.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      harness.train_and_evaluate(config, str(tmp_path))
    # The loop put the handler back.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)
  monkeypatch.setattr(workdir_lib.MetricsLog, 'write', original_write)
  _resume_and_compare(config, straight_dir, tmp_path, stopped_at=3)


def test_batches_are_labelled_dataset_images_and_the_loss_is_their_cross_entropy():
  config = _tiny_config()
  config.objective.augment = {}
  experiment = builder.build(config)
  objective, data = experiment.objective, experiment.train_data
  params, model_state, run_key = objective.init(jax.random.key(0), data)
  images, labels = np.asarray(data.images), np.asarray(data.labels)
  seen = []
  for step in range(2):  # 50 images, batch 16: both inside the first epoch
    batch = objective.sample(run_key, jnp.int32(step), data)
    assert batch.images.shape[0] == config.objective.batch_size
    for image, label in zip(np.asarray(batch.images), np.asarray(batch.labels)):
      index = int(np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0])
      assert labels[index] == label
      seen.append(index)
  assert len(set(seen)) == len(seen)  # without replacement
  loss, (metrics, _) = objective.loss(params, model_state, batch,
                                      jax.random.key(1))
  features, _ = builder.build_backbone(config.backbone).apply(
      params['backbone'], model_state, batch.images, True)
  logits = (np.asarray(features) @ np.asarray(params['head']['kernel']) +
            np.asarray(params['head']['bias']))
  log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + (
      logits.max(1))
  expected = np.mean(log_z - logits[np.arange(len(logits)),
                                    np.asarray(batch.labels)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], np.mean(
      logits.argmax(1) == np.asarray(batch.labels)))


def test_a_pretraining_workdir_is_evaluated_with_its_trained_backbone(
    straight_run):
  config, workdir, _ = straight_run
  result = evaluation.evaluate_workdir(builder.build(config, pretrained=False),
                                       str(workdir))
  # Directly: the evaluating ProtoNet's own parameters (its cosine scale)
  # with the trained backbone's in place, on the seeded test episodes.
  state, *_ = restore_train_state(config, workdir)
  test = builder.load_splits(config.data)['test']
  algorithm = builder.build_algorithm(config.algorithm,
                                      builder.build_backbone(config.backbone))
  meta_params = dict(algorithm.init(jax.random.key(0),
                                    jnp.asarray(test.images[:2]))[0],
                     backbone=state.params['backbone'])
  spec = sampling.EpisodeSpec(config.eval.ways, config.eval.shots,
                              config.eval.queries)
  accuracies = jax.jit(episode_accuracies(
      algorithm, spec, config.eval.num_episodes))(
          meta_params, state.model_state, sampling.to_device(test),
          jax.random.key(config.eval.seed))
  np.testing.assert_allclose(result['accuracy'], np.mean(accuracies),
                             rtol=1e-6)
  assert (result['step'], result['weights'], result['episodes']) == (
      4, str(workdir), config.eval.num_episodes)
