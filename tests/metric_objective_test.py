"""The metric objective: P x K batches, training through the harness with
the loss's parameters in the state, exact resume, retrieval of workdirs."""


import jax
import numpy as np
import pytest

from fewshot import builder
from fewshot import features as features_lib
from fewshot import harness
from fewshot import workdir as workdir_lib
from fewshot.data import sampling, synthetic
from fewshot.evaluators import workdir as evaluation
from helpers import killed_after_checkpoint, load_config, restore_train_state


def _config(arg='loss=proxy_anchor', steps=4):
  config = load_config('metric_synthetic', f'{arg},steps={steps},classes=4,'
                       'per_class=3')
  config.backbone.filters = 8
  config.train.log_every = 2
  config.train.eval_every = 100
  config.train.checkpoint_every_steps = 2
  config.eval.test_at_end = False
  config.eval.val_episodes = 4
  config.eval.num_episodes = 10
  return config


def test_class_balanced_batches_hold_p_classes_of_k_distinct_images():
  dataset = synthetic.synthetic_splits(num_classes=(9, 2, 2),
                                       images_per_class=7,
                                       image_size=4)['train']
  # Each image's pixels encode its index, so drawn images can be traced.
  images = np.arange(len(dataset.labels), dtype=np.uint8)[:, None, None, None]
  data = sampling.index_by_class(dataset)
  data = sampling.DeviceDataset(
      images=np.broadcast_to(images, (len(images), 4, 4, 1)).copy(),
      class_index=data.class_index, class_counts=data.class_counts)
  draw = jax.jit(sampling.sample_class_balanced, static_argnums=(2, 3))
  batch_images, labels = draw(jax.random.key(3), data, 5, 4)
  index = np.asarray(batch_images)[:, 0, 0, 0]
  labels = np.asarray(labels)
  assert labels.shape == (20,) and len(set(labels.tolist())) == 5
  np.testing.assert_array_equal(np.asarray(dataset.labels)[index], labels)
  assert len(set(index.tolist())) == 20  # K distinct images of each class
  np.testing.assert_array_equal(labels, np.repeat(labels[::4], 4))
  again, _ = draw(jax.random.key(3), data, 5, 4)
  np.testing.assert_array_equal(again, batch_images)
  with pytest.raises(ValueError, match=r'classes_per_batch=10 \(P\) exceeds '
                     'the 9 classes'):
    sampling.check_class_balanced(10, 2, dataset.class_counts())
  with pytest.raises(ValueError, match=r'images_per_class=8 \(K\) exceeds the '
                     '7 images'):
    sampling.check_class_balanced(2, 8, dataset.class_counts())


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('metric')
  config = _config()
  results = harness.train_and_evaluate(config, str(workdir))
  return config, workdir, results


def test_loss_parameters_train_and_a_killed_run_resumes_exactly(
    straight_run, tmp_path, monkeypatch):
  config, straight_dir, results = straight_run
  assert results['step'] == 4 and 0 <= results['val']['accuracy'] <= 1
  straight, _, initial = restore_train_state(config, straight_dir)
  proxies = straight.params['loss']['proxies']
  assert proxies.shape == (30, 16)  # training classes x embedding_dim
  assert not np.allclose(proxies, initial.params['loss']['proxies'])
  assert straight.params['projection']['output']['kernel'].shape[-1] == 16
  killed_after_checkpoint(monkeypatch, 2, lambda: harness.train_and_evaluate(
      config, str(tmp_path)))
  assert harness.train_and_evaluate(config, str(tmp_path))['step'] == 4
  resumed, *_ = restore_train_state(config, tmp_path)
  jax.tree.map(np.testing.assert_array_equal,
               (straight.params, straight.model_state, straight.opt_state),
               (resumed.params, resumed.model_state, resumed.opt_state))


def test_retrieval_and_episodes_evaluate_the_trained_embedding(straight_run):
  config, workdir, _ = straight_run
  experiment = builder.build(config, pretrained=False)
  result = evaluation.evaluate_workdir(experiment, str(workdir),
                                       protocol='retrieval')
  assert result['images'] == 200 and result['classes'] == 10
  assert result['embedding_dim'] == 16 and result['step'] == 4
  assert 0 < result['map_at_r'] <= result['r_precision'] <= 1
  assert set(result['recall_at_k']) == {'1', '2', '4', '8'}
  assert result['recall_at_k']['1'] == result['precision_at_1']
  assert 0 <= result['nmi'] <= 1  # k-means clusters against the classes
  episodes = evaluation.evaluate_workdir(experiment, str(workdir))
  assert episodes['episodes'] == 10 and 0 < episodes['accuracy'] <= 1
  # Without a workdir the projection would be random: refused.
  config = config.copy_and_resolve_references()
  config.backbone.weights = str(workdir)
  with pytest.raises(ValueError, match='projection head is trained'):
    evaluation.evaluate_workdir(builder.build(config), None)


def test_retrieval_evaluates_a_protonet_workdir(tmp_path):
  config = load_config('protonet_synthetic', 'steps=2')
  config.backbone.filters = 8
  config.eval.test_at_end = False
  config.train.eval_every = 100
  config.train.checkpoint_every_steps = 2
  harness.train_and_evaluate(config, str(tmp_path))
  result = evaluation.evaluate_workdir(builder.build(config), str(tmp_path),
                                       protocol='retrieval')
  # The backbone's own features: Conv-4 with 8 filters ends at 1x1x8.
  assert result['images'] == 200 and result['embedding_dim'] == 8
  config.backbone.norm = 'batch'
  with pytest.raises(ValueError, match="norm='batch' normalises each batch"):
    evaluation.evaluate_workdir(builder.build(config), str(tmp_path),
                                protocol='retrieval')


@pytest.mark.parametrize('arg, error', [
    ('loss=trplet', "Unknown metric loss 'trplet'; known:"),
    ('loss=triplet,miner=hardest', "Unknown miner 'hardest'; known:"),
    ('loss=arcface,miner=batch_hard', 'miners apply to the pair'),
])
def test_bad_losses_and_miners_are_named(arg, error):
  with pytest.raises(ValueError, match=error):
    builder.build(_config(arg))


def test_batches_larger_than_the_split_are_refused():
  config = _config()
  config.objective.classes_per_batch = 31
  with pytest.raises(ValueError, match=r'\(P\) exceeds the 30 classes of the '
                     'training split'):
    builder.build(config)
  config = _config()
  config.objective.images_per_class = 21
  with pytest.raises(ValueError, match=r'\(K\) exceeds the 20 images'):
    builder.build(config)


def _features_config(workdir, **backbone):
  """The metric config on the frozen features of `workdir`'s backbone."""
  config = _config()
  config.data.features = dict(name='conv4', weights=str(workdir), **backbone)
  config.backbone = dict(name='mlp', widths=())
  config.objective.augment = None
  return config


def test_a_metric_loss_trains_on_frozen_features_embedded_once(
    straight_run, tmp_path, monkeypatch):
  _, frozen_dir, _ = straight_run
  monkeypatch.delenv('FEWSHOT_DATA_DIR', raising=False)  # no cache at first
  config = _features_config(frozen_dir)
  images = builder.load_splits(_config().data)
  splits = builder.load_splits(config.data)
  # Each split is the frozen backbone's evaluation-mode features.
  loaded = workdir_lib.load_backbone(str(frozen_dir), 'conv4')
  for name in ('train', 'test'):
    expected, _ = loaded.backbone.apply(loaded.params, loaded.model_state,
                                        images[name].images, False)
    assert splits[name].is_features and splits[name].image_shape == (8,)
    np.testing.assert_allclose(splits[name].images, expected, atol=1e-5)
    np.testing.assert_array_equal(splits[name].labels, images[name].labels)
  results = harness.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 4
  state, *_ = restore_train_state(config, tmp_path)
  assert state.params['projection']['output']['kernel'].shape == (8, 16)
  retrieval = evaluation.evaluate_workdir(
      builder.build(config, pretrained=False), str(tmp_path),
      protocol='retrieval')
  assert retrieval['images'] == 200 and retrieval['embedding_dim'] == 16
  # Cached by data options, backbone, checkpoint and split: a second build
  # embeds nothing.
  monkeypatch.setenv('FEWSHOT_DATA_DIR', str(tmp_path / 'data'))
  first = builder.load_splits(config.data)
  monkeypatch.setattr(features_lib, 'embed_dataset', _no_embedding)
  again = builder.load_splits(config.data)
  np.testing.assert_array_equal(again['val'].images, first['val'].images)
  assert len(list((tmp_path / 'data').rglob('synthetic-*.npz'))) == 3
  # Without a workdir only the untrained features are a model: a network
  # on them would be scored at its random init.
  config.backbone.widths = (4,)
  with pytest.raises(ValueError, match='with no trained network on them'):
    evaluation.evaluate_workdir(builder.build(config), None)


def _no_embedding(*args, **kwargs):
  raise AssertionError('embedded again instead of reading the cache')


def test_features_need_pretrained_weights():
  config = _config()
  config.data.features = dict(name='conv4')
  with pytest.raises(ValueError, match='needs a name and pretrained weights'):
    builder.load_splits(config.data)


def test_features_of_a_batch_norm_workdir_are_refused(straight_run):
  _, frozen_dir, _ = straight_run
  # The workdir's stored norm is 'batch_running'; a transductive one is not
  # per-image, whether written in the section or stored in the workdir.
  config = _features_config(frozen_dir, norm='batch')
  with pytest.raises(ValueError, match="norm='batch' normalises each batch"):
    builder.load_splits(config.data)
