"""Feature extraction, input adapters, and evaluating a pretrained backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot import builder
from fewshot import features
from fewshot import harness
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.evaluators import workdir as evaluation
from helpers import load_config


def test_adapt_images_resizes_and_repeats_channels():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)),
                       jnp.uint8)
  out = backbones.adapt_images(images, 16, 3)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  # A constant image stays constant, in range, at any size.
  constant = jnp.full((1, 7, 7, 3), 200, jnp.uint8)
  np.testing.assert_array_equal(backbones.adapt_images(constant, 12), 200)
  # Upsampling by 2 and back keeps a smooth image close to itself.
  smooth = jnp.asarray(np.add.outer(np.arange(8.0), np.arange(8.0))[None, :, :,
                                                                    None])
  back = backbones.adapt_images(backbones.adapt_images(smooth, 16), 8)
  np.testing.assert_allclose(back[0, 2:-2, 2:-2], smooth[0, 2:-2, 2:-2],
                             atol=0.3)
  with pytest.raises(ValueError, match='only 1-channel'):
    backbones.adapt_images(jnp.zeros((1, 4, 4, 2)), channels=3)


def test_input_adapter_feeds_the_module_resized_images():
  plain = backbones.create('conv4', filters=4, num_blocks=2, norm='none')
  adapted = backbones.create('conv4', filters=4, num_blocks=2, norm='none',
                             input_size=12, input_channels=3)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 6, 6, 1)),
                       jnp.uint8)
  params, state = adapted.init(jax.random.key(0), images)
  assert params['conv0']['kernel'].shape[2] == 3  # built for RGB
  got, _ = adapted.apply(params, state, images, False)
  want, _ = plain.apply(params, state,
                        backbones.adapt_images(images, 12, 3), False)
  np.testing.assert_array_equal(got, want)


def test_extract_features_equals_one_big_batch():
  backbone = backbones.create('conv4', filters=4, num_blocks=2,
                              norm='batch_running')
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256,
                                                         (23, 8, 8, 1)),
                       jnp.uint8)
  params, state = backbone.init(jax.random.key(0), images[:2])
  want, _ = backbone.apply(params, state, images, False)
  got = jax.jit(lambda x: features.extract_features(
      backbone, params, state, x, batch_size=5))(images)  # 5 batches, padded
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_embed_dataset_in_chunks_keeps_classes_and_equals_one_batch():
  backbone = backbones.create('conv4', filters=4, num_blocks=2,
                              norm='batch_running')
  dataset = synthetic_splits(num_classes=(3, 1, 1), images_per_class=7,
                             image_size=8)['train']
  params, state = backbone.init(jax.random.key(0),
                                jnp.asarray(dataset.images[:2]))
  want, _ = backbone.apply(params, state, jnp.asarray(dataset.images), False)
  got = features.embed_dataset(backbone, params, state, dataset,
                               batch_size=3, chunk=8)  # 3 chunks, padded
  assert got.is_features and not got.is_text and got.image_shape == (16,)
  np.testing.assert_allclose(got.images, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.labels, dataset.labels)
  assert got.class_names == dataset.class_names
  empty = type(dataset)(dataset.images[:0], dataset.labels[:0],
                        dataset.class_names)
  assert features.embed_dataset(backbone, params, state,
                                empty).images.shape == (0, 16)
  with pytest.raises(ValueError, match='must be finite'):
    type(got)(np.full((2, 3), np.nan, np.float32), np.zeros(2, np.int32),
              ('a',))


def test_mlp_backbone_is_the_identity_or_a_map_of_feature_vectors():
  vectors = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6)),
                        jnp.float32)
  identity = backbones.create('mlp')
  params, state = identity.init(jax.random.key(0), vectors)
  assert not jax.tree.leaves(params)
  np.testing.assert_array_equal(identity.apply(params, state, vectors,
                                               True)[0], vectors)
  mlp = backbones.create('mlp', widths=(7, 3))
  params, state = mlp.init(jax.random.key(0), vectors)
  out, _ = mlp.apply(params, state, vectors, False)
  hidden = jax.nn.relu(vectors @ params['dense0']['kernel'] +
                       params['dense0']['bias'][None])
  np.testing.assert_allclose(
      out, hidden @ params['dense1']['kernel'] + params['dense1']['bias'][None],
      rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='MLP takes feature vectors'):
    mlp.init(jax.random.key(0), jnp.zeros((2, 4), jnp.int32))


@pytest.fixture(scope='module')
def pretrained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pretrained')
  config = load_config('pretrain_synthetic', 'steps=2')
  # Equal widths: few distinct kernel shapes, so the random init compiles
  # fast (the evaluations read them from the workdir).
  config.backbone.widths = (4, 4, 4, 4)
  config.train.eval_every = 100
  config.eval.test_at_end = False
  config.eval.val_episodes = 2
  harness.train_and_evaluate(config, str(workdir))
  return config, str(workdir)


def _evaluation_config(pretrain_config, workdir, algorithm, precompute):
  config = load_config('pretrain_synthetic')
  for section in ('objective', 'optimizer', 'train'):  # evaluation only
    del config[section]
  config.backbone = dict(name='resnet12', weights=workdir)
  config.algorithm = algorithm
  config.eval = dict(ways=3, shots=2, queries=3, num_episodes=12,
                     images_per_chunk=64, seed=5,
                     precompute_features=precompute, feature_batch_size=7)
  del pretrain_config
  return config


def _evaluate(config):
  return evaluation.evaluate_workdir(builder.build(config), None)


@pytest.mark.parametrize('algorithm', [
    dict(name='protonet', distance='sqeuclidean'),
    dict(name='linear_probe', solver='ridge'),
])
def test_precomputed_features_give_the_same_accuracies(pretrained_workdir,
                                                       algorithm):
  pretrain_config, workdir = pretrained_workdir
  results = [_evaluate(
      _evaluation_config(pretrain_config, workdir, algorithm, precompute))
             for precompute in (False, True)]
  assert results[1]['precomputed_features']
  assert results[0]['episodes'] == results[1]['episodes'] == 12
  assert abs(results[0]['accuracy'] - results[1]['accuracy']) < 1e-6
  assert results[0]['weights'] == workdir


def test_evaluation_without_a_model_is_a_clear_error(pretrained_workdir):
  pretrain_config, workdir = pretrained_workdir
  config = _evaluation_config(pretrain_config, workdir,
                              dict(name='fine_tune', steps=1), True)
  with pytest.raises(ValueError, match='frozen-feature algorithm'):
    _evaluate(config)
  config = _evaluation_config(pretrain_config, workdir,
                              dict(name='protonet'), False)
  config.backbone = dict(name='resnet12')
  with pytest.raises(ValueError, match='Nothing to evaluate'):
    _evaluate(config)


def test_precompute_keeps_the_class_index():
  data = sampling.to_device(synthetic_splits(num_classes=(3, 1, 1),
                                             images_per_class=4,
                                             image_size=8)['train'])
  backbone = backbones.create('conv4', filters=4, num_blocks=1)
  params, state = backbone.init(jax.random.key(0), data.images[:2])
  stored = features.precompute(backbone, params, state, data, batch_size=5)
  assert stored.images.shape == (data.images.shape[0], 4 * 4 * 4)
  np.testing.assert_array_equal(stored.class_index, data.class_index)
  episode = sampling.sample_episode(jax.random.key(3), stored,
                                    sampling.EpisodeSpec(2, 1, 1))
  assert episode.support_images.shape == (2, 64)
