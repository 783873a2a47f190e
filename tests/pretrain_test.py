"""Supervised pretraining: augmentation, resuming, and loading the backbone."""

import importlib.util
import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot import pretrain
from fewshot import train
from fewshot.checkpoint import Checkpointer
from fewshot.data import augment

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(steps=4):
  spec = importlib.util.spec_from_file_location(
      'pretrain_synthetic', REPO / 'configs' / 'pretrain_synthetic.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'steps={steps}')
  # Equal widths: few distinct kernel shapes, so the random init compiles fast.
  config.backbone.widths = (4, 4, 4, 4)
  config.train.log_every = 2
  config.train.eval_every = 100
  config.train.checkpoint_every_steps = 2
  config.eval.test_at_end = False
  config.eval.val_episodes = 4
  return config


def _restore_state(config, workdir):
  """The latest train state of `workdir`, via the trainer's own Checkpointer."""
  splits, backbone, _, optimizer, _ = pretrain.build(config)
  state = pretrain.init_pretrain_state(
      backbone, optimizer, splits['train'].images[:2],
      splits['train'].num_classes, config.seed, dict(config.head))
  checkpointer = Checkpointer(pathlib.Path(workdir) / 'checkpoints')
  restored, _ = checkpointer.restore(jax.eval_shape(lambda: state))
  checkpointer.close()
  return restored, backbone, splits, state


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """Four uninterrupted steps; shared by the tests that only read it."""
  workdir = tmp_path_factory.mktemp('straight')
  config = _tiny_config(steps=4)
  results = pretrain.pretrain_and_evaluate(config, str(workdir))
  return config, workdir, results


# --- augmentation -----------------------------------------------------------

def _images(shape=(3, 8, 10, 2)):
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, shape),
                     jnp.uint8)


def test_flip_is_an_involution_and_mirrors_columns():
  images = _images()
  flipped = augment.flip_horizontal(images)
  np.testing.assert_array_equal(augment.flip_horizontal(flipped), images)
  np.testing.assert_array_equal(flipped[:, :, 0], images[:, :, -1])
  # random_flip mirrors some images and leaves the others unchanged.
  out = augment.random_flip(jax.random.key(0), _images((32, 4, 4, 1)))
  same = [np.array_equal(o, i) for o, i in zip(out, _images((32, 4, 4, 1)))]
  assert 0 < sum(same) < 32


def test_crop_keeps_shape_and_dtype_and_is_a_shifted_window():
  images = _images()
  out = augment.random_crop(jax.random.key(1), images, padding=2)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for o, p in zip(np.asarray(out), padded):
    windows = [(i, j) for i in range(5) for j in range(5)
               if np.array_equal(p[i:i + 8, j:j + 10], o)]
    assert windows, 'the crop is not a window of the zero-padded image'


@pytest.mark.parametrize('pad_mode', ['edge', 'reflect'])
def test_crop_of_a_constant_image_is_constant(pad_mode):
  images = jnp.full((4, 6, 6, 3), 77, jnp.uint8)
  out = augment.random_crop(jax.random.key(2), images, 3, pad_mode)
  np.testing.assert_array_equal(out, images)
  # Zero padding moves black borders in (for some offset among 4 images).
  zero = augment.random_crop(jax.random.key(2), images, 3)
  assert set(np.unique(zero)) <= {0, 77} and (np.asarray(zero) == 0).any()
  # Padding 0 is the identity.
  np.testing.assert_array_equal(
      augment.random_crop(jax.random.key(2), _images(), 0), _images())


def test_augmentation_is_deterministic_for_a_key():
  images = _images((16, 8, 8, 3))
  run = jax.jit(lambda k, x: augment.crop_and_flip(k, x, crop_padding=2,
                                                   flip=True))
  a, b = run(jax.random.key(5), images), run(jax.random.key(5), images)
  c = run(jax.random.key(6), images)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_batch_indices_cover_an_epoch_without_repeats():
  key = jax.random.key(0)
  epoch = np.concatenate([pretrain.batch_indices(key, jnp.int32(s), 50, 10)
                          for s in range(5)])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(50))
  next_epoch = pretrain.batch_indices(key, jnp.int32(5), 50, 10)
  assert not np.array_equal(next_epoch, epoch[:10])


def test_cosine_head_logits_are_bounded_by_its_scale():
  head = pretrain.init_head(jax.random.key(0), 6, 4, kind='cosine',
                            init_scale=3.0)
  features = jax.random.normal(jax.random.key(1), (5, 6)) * 100
  logits = pretrain.head_logits(head, features)
  assert logits.shape == (5, 4) and np.abs(logits).max() <= 3.0 + 1e-4
  with pytest.raises(ValueError, match='head kind'):
    pretrain.init_head(jax.random.key(0), 6, 4, kind='mlp')


# --- the trainer ------------------------------------------------------------

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
  original_save = Checkpointer.save

  def save_then_die(self, step, state, config_dict):
    original_save(self, step, state, config_dict)
    if step == 2:
      self.wait()
      raise KeyboardInterrupt('simulated pre-emption after step 2')

  monkeypatch.setattr(Checkpointer, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    pretrain.pretrain_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(Checkpointer, 'save', original_save)
  _resume_and_compare(config, straight_dir, tmp_path, stopped_at=2)


def _resume_and_compare(config, straight_dir, workdir, stopped_at):
  """Checks the stopped run kept `stopped_at`, resumes it to the end and
  compares its state with the uninterrupted run's, bit for bit."""
  checkpointer = Checkpointer(workdir / 'checkpoints')
  assert checkpointer.latest_step() == stopped_at
  checkpointer.close()
  assert pretrain.pretrain_and_evaluate(config, str(workdir))['step'] == 4
  straight, *_ = _restore_state(config, straight_dir)
  resumed, *_ = _restore_state(config, workdir)
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
  original_write = train.MetricsLog.write

  def write_then_interrupt(self, step, **values):
    original_write(self, step, **values)
    if step == 3 and 'train_loss' in values:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(train.MetricsLog, 'write', write_then_interrupt)
  # Python's own Ctrl-C handler, whatever pytest was started with.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      pretrain.pretrain_and_evaluate(config, str(tmp_path))
    # The loop put the handler back.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)
  monkeypatch.setattr(train.MetricsLog, 'write', original_write)
  _resume_and_compare(config, straight_dir, tmp_path, stopped_at=3)


def test_load_returns_the_trained_backbone(straight_run):
  config, workdir, _ = straight_run
  state, backbone, splits, fresh = _restore_state(config, workdir)
  loaded = backbones.load('resnet12', weights=str(workdir))
  assert loaded.module == backbone.module
  assert set(loaded.variables) == {'params', 'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, loaded.params,
               state.params['backbone'])
  jax.tree.map(np.testing.assert_array_equal, loaded.model_state,
               state.model_state)
  # Training moved the parameters away from the initialisation.
  first_kernel = lambda params: params['layer1']['conv1']['kernel']
  assert not np.array_equal(first_kernel(fresh.params['backbone']),
                            first_kernel(loaded.params))
  images = jnp.asarray(splits['val'].images[:6])
  features = jax.jit(loaded.module.apply)(loaded.variables, images)
  expected, _ = jax.jit(backbone.apply, static_argnums=3)(
      state.params['backbone'], state.model_state, images, False)
  assert features.shape == (6, 4)
  np.testing.assert_array_equal(features, expected)
  # `create(..., weights=...)`, i.e. `config.backbone.weights`, starts from it.
  started = backbones.create('resnet12', weights=str(workdir / 'checkpoints'))
  params, model_state = started.init(jax.random.key(123), images)
  jax.tree.map(np.testing.assert_array_equal, (params, model_state),
               (loaded.params, loaded.model_state))


def test_loading_another_architecture_is_a_clear_error(straight_run):
  _, workdir, _ = straight_run
  with pytest.raises(ValueError, match=r'holds a resnet12\(.*'
                     r'widths=\(4, 4, 4, 4\).*not the resnet18'):
    backbones.load('resnet18', weights=str(workdir))
  with pytest.raises(ValueError, match=r'another architecture.*'
                     r'widths=\(4, 4, 4, 8\).*'
                     r'has shape \(4,\) in the checkpoint but \(8,\)'):
    backbones.load('resnet12', weights=str(workdir), widths=(4, 4, 4, 8))
  # The BN mode may change: transductive BN simply ignores running stats.
  assert list(backbones.load('resnet12', weights=str(workdir),
                             norm='batch').variables) == ['params']
  with pytest.raises(FileNotFoundError, match='no config.json'):
    backbones.load('resnet12', weights=str(workdir / 'nothing_here'))


def test_load_reads_a_meta_training_workdir(tmp_path):
  """`experiments/train.py` workdirs hold the backbone at params['backbone']."""
  from fewshot import train  # pylint: disable=g-import-not-at-top
  import train_test  # pylint: disable=g-import-not-at-top
  config = train_test._tiny_config(steps=2)  # pylint: disable=protected-access
  config.eval.test_at_end = False
  train.train_and_evaluate(config, str(tmp_path))
  _, params, model_state, *_ = train.restore_workdir(config, str(tmp_path))
  loaded = backbones.load('conv4', weights=str(tmp_path))
  assert loaded.module.filters == 8 and loaded.module.norm == 'batch_running'
  jax.tree.map(np.testing.assert_array_equal,
               (loaded.params, loaded.model_state),
               (params['backbone'], model_state))
