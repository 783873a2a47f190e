"""ResNet-12 and ResNet-18: shapes, parameter counts, residual path, `load`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot.backbones.resnet import (BasicBlock, ConvNoBias, ResNet12,
                                      ResNet12Block, ResNet18)

EPS = 1e-5


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_variables(module, image_shape):
  return jax.eval_shape(module.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((2, *image_shape), jnp.uint8))


def _resnet12_count(widths, channels=3):
  """Per block: three 3x3 convs, a 1x1 shortcut conv, four BNs (scale, bias)."""
  total, cin = 0, channels
  for c in widths:
    total += 9 * cin * c + 2 * 9 * c * c + cin * c + 4 * 2 * c
    cin = c
  return total


def _resnet18_count(stem_kernel, widths=(64, 128, 256, 512), channels=3):
  """Stem conv+BN, then per stage two BasicBlocks (two 3x3 conv+BN each),
  the first with a 1x1 conv+BN shortcut when the width changes."""
  total = stem_kernel ** 2 * channels * widths[0] + 2 * widths[0]
  cin = widths[0]
  for c in widths:
    for block in range(2):
      block_in = cin if block == 0 else c
      total += 9 * block_in * c + 9 * c * c + 2 * 2 * c
      if block == 0 and block_in != c:
        total += block_in * c + 2 * c
    cin = c
  return total


@pytest.mark.parametrize('module,image_shape,expected,dim', [
    (ResNet12(), (84, 84, 3), 12_424_320, 640),
    # torchvision's resnet18 has 11,689,512 parameters; its classifier
    # (512 x 1000 + 1000) is not part of the backbone.
    (ResNet18(), (224, 224, 3), 11_689_512 - 513_000, 512),
    (ResNet18(small_images=True), (32, 32, 3), 11_168_832, 512),
], ids=['resnet12', 'resnet18', 'resnet18_small'])
def test_parameter_counts_and_feature_shapes(module, image_shape, expected,
                                             dim):
  variables = _abstract_variables(module, image_shape)
  count = _count(variables['params'])
  assert count == expected
  if isinstance(module, ResNet12):
    assert count == _resnet12_count(module.widths)
  else:
    assert count == _resnet18_count(3 if module.small_images else 7)
  features = jax.eval_shape(module.apply, variables,
                            jax.ShapeDtypeStruct((2, *image_shape), jnp.uint8))
  assert features.shape == (2, dim)
  # Running statistics: a mean and a variance per BN channel.
  assert set(variables) == {'params', 'batch_stats'}


def _numpy_variables(module, images, seed=0):
  """Variables of `module` filled from numpy's RNG.

  Skips flax's random init, whose threefry draws take seconds to compile on
  a CPU; BN scales and variances are kept positive.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(shapes)
  leaves = []
  for path, leaf in flat[0]:
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      fan_in = np.prod(leaf.shape[:-1])
      value = rng.normal(0, fan_in ** -0.5, leaf.shape)
    elif 'scale' in name or 'var' in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.uniform(-0.5, 0.5, leaf.shape)
    leaves.append(jnp.asarray(value, leaf.dtype))
  return jax.tree.unflatten(flat[1], leaves)


@pytest.mark.parametrize('name,options', [
    ('resnet12', dict(widths=(4, 4, 8, 8))),
    ('resnet18', dict(small_images=True, widths=(4, 4, 8, 8))),
])
def test_forward_train_and_eval(name, options):
  backbone = backbones.create(name, **options)
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (3, 20, 20, 3)), jnp.uint8)
  variables = _numpy_variables(backbone.module, images)
  params = variables.pop('params')
  state = variables
  apply = jax.jit(backbone.apply, static_argnums=3)
  eval_features, same_state = apply(params, state, images, False)
  train_features, new_state = apply(params, state, images, True)
  assert eval_features.shape == train_features.shape == (3, 8)
  assert np.isfinite(np.asarray(train_features)).all()
  jax.tree.map(np.testing.assert_array_equal, same_state, state)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_state,
                         state)
  assert all(jax.tree.leaves(changed))
  # BatchNorm in evaluation mode: each image's features ignore the others.
  np.testing.assert_allclose(
      apply(params, state, images[:1], False)[0], eval_features[:1],
      rtol=1e-4, atol=1e-5)


def test_transductive_norm_has_no_state():
  variables = jax.eval_shape(
      ResNet12(widths=(2, 2, 2, 2), norm='batch').init, jax.random.key(0),
      jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.uint8))
  assert list(variables) == ['params']
  with pytest.raises(ValueError, match='norm must be one of'):
    backbones.load('resnet12', image_shape=(8, 8, 3), norm='group')


def _bn_eval(x, bn_params, stats):
  x, bn_params, stats = jax.tree.map(np.asarray, (x, bn_params, stats))
  return ((x - stats['mean']) / np.sqrt(stats['var'] + EPS) * bn_params['scale']
          + bn_params['bias'])


def _zero_last_norm(variables, name):
  params = jax.tree.map(lambda x: x, variables['params'])
  params[name] = {'scale': jnp.zeros_like(params[name]['scale']),
                  'bias': jnp.zeros_like(params[name]['bias'])}
  return {**variables, 'params': params}


def test_resnet12_block_with_zero_last_scale_is_its_shortcut():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 3)),
                  jnp.float32)
  block = ResNet12Block(5)
  variables = _numpy_variables(block, x)
  full = block.apply(variables, x)
  variables = _zero_last_norm(variables, 'bn3')
  out = block.apply(variables, x)
  p, s = variables['params'], variables['batch_stats']
  shortcut = jnp.einsum('bhwi,io->bhwo', x,
                        p['downsample_conv']['kernel'][0, 0])
  shortcut = _bn_eval(shortcut, p['downsample_bn'], s['downsample_bn'])
  shortcut = np.where(shortcut > 0, shortcut, 0.1 * shortcut)
  expected = shortcut.reshape(2, 3, 2, 3, 2, 5).max(axis=(2, 4))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(full, expected, atol=1e-3)  # the test can fail


@pytest.mark.parametrize('strides,features', [(2, 5), (1, 3)],
                         ids=['projection', 'identity'])
def test_basic_block_with_zero_last_scale_is_its_shortcut(strides, features):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 3)),
                  jnp.float32)
  block = BasicBlock(features, strides)
  variables = _numpy_variables(block, x)
  full = block.apply(variables, x)
  out = block.apply(_zero_last_norm(variables, 'bn2'), x)
  p, s = variables['params'], variables['batch_stats']
  if 'downsample_conv' in p:
    shortcut = jnp.einsum('bhwi,io->bhwo', x[:, ::strides, ::strides],
                          p['downsample_conv']['kernel'][0, 0])
    shortcut = _bn_eval(shortcut, p['downsample_bn'], s['downsample_bn'])
  else:
    shortcut = x
  np.testing.assert_allclose(out, np.maximum(shortcut, 0), rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(full, np.maximum(shortcut, 0), atol=1e-3)


def test_strided_conv_pads_like_pytorch():
  """Stride-2 3x3 conv: padding 1 on both sides (not SAME's 0/1 split)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 2)),
                  jnp.float32)
  conv = ConvNoBias(4, 3, 2)
  variables = _numpy_variables(conv, x)
  kernel = variables['params']['kernel']
  y = conv.apply(variables, x)
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((1, 3, 3, 4), np.float32)
  for i in range(3):
    for j in range(3):
      patch = padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
      expected[0, i, j] = np.einsum('hwi,hwio->o', patch, kernel)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_load_without_weights_needs_an_image_shape_and_is_seeded():
  with pytest.raises(ValueError, match='image_shape'):
    backbones.load('resnet12')
  with pytest.raises(ValueError, match="Unknown option.*'depth'"):
    backbones.load('resnet12', image_shape=(8, 8, 3), depth=50)
  # One block (widths=(2,)) keeps the two random inits cheap to compile.
  a = backbones.load('resnet12', image_shape=(16, 16, 3), widths=(2,), seed=3)
  b = backbones.load('resnet12', sample_images=np.zeros((1, 16, 16, 3)),
                     widths=(2,), seed=3)
  jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
  module, variables = a  # unpacks as (module, variables)
  assert isinstance(module, ResNet12) and set(variables) == {'params',
                                                             'batch_stats'}
  assert set(a.model_state) == {'batch_stats'}


def test_mean_std_normalise_per_channel():
  mean, std = (0.5, 0.25, 0.75), (0.5, 0.5, 0.25)
  plain = ResNet12(widths=(2, 2, 2, 2))
  normalised = ResNet12(widths=(2, 2, 2, 2), mean=mean, std=std)
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)),
                       jnp.float32)
  variables = _numpy_variables(plain, images)
  by_hand = (images - jnp.asarray(mean).reshape(1, 1, 1, 3)) / jnp.asarray(
      std).reshape(1, 1, 1, 3)
  np.testing.assert_allclose(
      jax.jit(normalised.apply)(variables, images),
      jax.jit(plain.apply)(variables, by_hand), rtol=1e-5, atol=1e-6)
