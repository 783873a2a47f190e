"""Conv-4 (fused norm + ReLU + pool blocks) against a plain, unfused reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot.backbones.conv4 import Conv4
from fewshot.ops import affine_relu_max_pool


def _reference_conv4(variables, images, norm, train):
  """Conv (lax) -> BatchNorm (two-pass variance) -> ReLU -> max-pool (flax).

  Returns `(features, new_batch_stats)`; written independently of
  `fewshot.ops` and `Conv4`'s block code.
  """
  params = variables['params']
  stats = variables.get('batch_stats', {})
  new_stats = {}
  x = images.astype(jnp.float32) / 255.0
  for block in range(sum(name.startswith('conv') for name in params)):
    conv = params[f'conv{block}']
    x = jax.lax.conv_general_dilated(
        x, conv['kernel'], (1, 1), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if norm == 'none':
      x = x + conv['bias'][None, None, None, :]
    else:
      bn = params[f'norm{block}']
      if norm == 'batch_running' and not train:
        mean, var = stats[f'norm{block}']['mean'], stats[f'norm{block}']['var']
      else:
        mean = x.mean(axis=(0, 1, 2))
        var = jnp.square(x - mean[None, None, None, :]).mean(axis=(0, 1, 2))
        if norm == 'batch_running':
          old = stats[f'norm{block}']
          new_stats[f'norm{block}'] = {
              'mean': 0.9 * old['mean'] + 0.1 * mean,
              'var': 0.9 * old['var'] + 0.1 * var}
      x = ((x - mean[None, None, None, :]) /
           jnp.sqrt(var + 1e-5)[None, None, None, :] *
           bn['scale'][None, None, None, :] + bn['bias'][None, None, None, :])
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding='VALID')
  return x.reshape(x.shape[0], -1), new_stats


def _random_variables(model, images, seed):
  """Init, then random BN scales (of both signs) and running stats."""
  variables = model.init(jax.random.key(seed), images)
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  perturbed = [leaf + 0.5 * jax.random.normal(k, leaf.shape)
               for leaf, k in zip(leaves, keys)]
  variables = jax.tree.unflatten(treedef, perturbed)
  for name, layer in variables['params'].items():  # scales of both signs
    if name.startswith('norm'):
      layer['scale'] = layer['scale'] - 1.0
  if 'batch_stats' in variables:  # variances must stay positive
    variables['batch_stats'] = jax.tree.map(
        lambda v: jnp.abs(v) + 0.1, variables['batch_stats'])
  return variables


@pytest.mark.parametrize('norm', ['batch', 'batch_running', 'none'])
@pytest.mark.parametrize('train', [True, False])
def test_conv4_matches_unfused_reference(norm, train):
  # Two blocks on 14x14 images: the second pools an odd 7x7 map (to 3x3),
  # as Conv-4's third block does on 28x28 images, with half the layer
  # shapes to compile.
  images = jax.random.randint(jax.random.key(0), (6, 14, 14, 1), 0, 256,
                              jnp.int32).astype(jnp.uint8)
  model = Conv4(filters=8, norm=norm, num_blocks=2)
  variables = _random_variables(model, images, 1)
  # Some BN scales are negative, so the sign folding is exercised.
  if norm != 'none':
    assert any(float(v['scale'].min()) < 0 for k, v in
               variables['params'].items() if k.startswith('norm'))

  def fused(params):
    out, updates = model.apply({**variables, 'params': params}, images,
                               train=train, mutable=['batch_stats'])
    return out, updates.get('batch_stats', {})

  def reference(params):
    return _reference_conv4({**variables, 'params': params}, images, norm,
                            train)

  (out, stats), (ref_out, ref_stats) = (fused(variables['params']),
                                        reference(variables['params']))
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
  if norm == 'batch_running' and train:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-6),
                 stats, ref_stats)
  cotangent = jax.random.normal(jax.random.key(3), out.shape)
  grads = jax.grad(lambda p: jnp.vdot(fused(p)[0], cotangent))(
      variables['params'])
  ref_grads = jax.grad(lambda p: jnp.vdot(reference(p)[0], cotangent))(
      variables['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3,
                                                       atol=2e-4),
               grads, ref_grads)


def test_affine_relu_max_pool_matches_plain_order_with_either_sign():
  x = jax.random.normal(jax.random.key(0), (3, 6, 8, 5))
  multiplier = jnp.array([1.5, -2.0, 1e-3, -0.3, 0.7])
  offset = jnp.array([0.1, -0.2, 0.3, 0.0, -1.0])

  def plain(x, m, b):
    return nn.max_pool(nn.relu(x * m[None, None, None, :] +
                               b[None, None, None, :]), (2, 2), strides=(2, 2))

  g = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))

  @jax.jit  # one program for both values and both gradients
  def both(x, m, b):
    (y, vjp), (ref_y, ref_vjp) = (jax.vjp(affine_relu_max_pool, x, m, b),
                                  jax.vjp(plain, x, m, b))
    return (y, vjp(g)), (ref_y, ref_vjp(g))

  (y, grads), (ref_y, ref_grads) = both(x, multiplier, offset)
  np.testing.assert_allclose(y, ref_y, rtol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_affine_relu_max_pool_rejects_mismatched_channels():
  with pytest.raises(ValueError, match='must be'):
    affine_relu_max_pool(jnp.zeros((1, 4, 4, 3)), jnp.ones(4), jnp.ones(4))
