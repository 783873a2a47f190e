"""Parameter-efficient fine-tuning: rules, LoRA, BitFit, adapters, counts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fewshot import backbones, peft
from fewshot.transfer.masks import path_string

# Test speed is compile time: each eager op on a new shape compiles. So the
# data and perturbations come from numpy, and the images have 4 channels
# (Conv-4's first layer then has the same kernel shape as its second, and
# uses one XLA convolution rather than the few-channel shifted sum).
RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.normal(size=(2, 8, 8, 4)), jnp.float32)
TOKENS = jnp.asarray(RNG.normal(size=(2, 3, 5)), jnp.float32)  # [B, L, D]
# An RBG key: threefry's random-bit programs take ~0.5 s each to compile per
# new shape, far longer than anything else these tiny models run.
KEY = jax.random.key(0, impl='rbg')


class MLP(nn.Module):
  """A tiny Dense backbone: `[..., 5] -> [..., 3]`."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    return nn.Dense(3, name='out')(nn.relu(nn.Dense(8, name='hidden')(x)))


def _conv4(**kwargs) -> backbones.Backbone:
  """A two-block Conv-4 of width 4 (`[2, 8, 8, 4]` images -> `[2, 16]`)."""
  return backbones.create('conv4', **{'filters': 4, 'num_blocks': 2,
                                      **kwargs})


def _flat(tree) -> dict[str, np.ndarray]:
  return {path_string(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _perturb_b(params, seed: int = 3):
  """Random nonzero LoRA `b` factors (they start at zero)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype)
      if path_string(p).endswith('/b') else x, params)


def _train(backbone, params, model_state, inputs, optimizer, steps):
  """A few optimizer steps on a regression loss of the features."""

  @jax.jit
  def step(params, opt_state, model_state):
    def loss_fn(params):
      features, new_state = backbone.apply(params, model_state, inputs, True)
      return jnp.mean(jnp.square(features - 1.0)), new_state
    grads, model_state = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, model_state

  opt_state = optimizer.init(params)
  for _ in range(steps):
    params, opt_state, model_state = step(params, opt_state, model_state)
  return params, model_state


def test_rules_first_match_wins_and_lora_presets_select_kernels_only():
  shapes = {'conv0': {'kernel': jax.ShapeDtypeStruct((3, 3, 1, 4), jnp.float32),
                      'bias': jax.ShapeDtypeStruct((4,), jnp.float32)},
            'conv1': {'kernel': jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32),
                      'bias': jax.ShapeDtypeStruct((4,), jnp.float32)}}
  rules = peft.resolve_rules(shapes, [('conv0', 'full'),
                                      ('conv./kernel', 'lora:2:6')])
  assert rules['conv0']['kernel'].action == 'full'
  assert rules['conv0']['bias'].action == 'full'
  assert rules['conv1']['kernel'] == peft.LeafRule('lora', 2, 6.0,
                                                   'conv./kernel')
  assert rules['conv1']['kernel'].scale == 3.0
  assert rules['conv1']['bias'].action == 'freeze'  # matched by no rule

  for target in ('conv1', 'conv1/kernel'):
    rules = peft.resolve_rules(shapes, peft.lora_rules([target], 2))
    assert rules['conv1']['kernel'].action == 'lora'
    assert rules['conv1']['kernel'].scale == 1.0  # alpha defaults to rank
    assert rules['conv1']['bias'].action == 'freeze'
  rules = peft.resolve_rules(shapes, peft.lora_rules(['conv.*'], 4, alpha=2,
                                                     train=['conv.*']))
  assert rules['conv0']['kernel'].scale == 0.5
  assert rules['conv0']['bias'].action == 'full'  # LoRA rules come first


def test_lora_factors_fit_any_kernel_rank_and_keep_its_dtype():
  kernel = jnp.asarray(RNG.normal(size=(3, 3, 1, 6)), jnp.bfloat16)  # depthwise
  factors = peft.init_factors(KEY, kernel, 2)
  assert factors['a'].shape == (9, 2) and factors['b'].shape == (2, 6)
  assert factors['a'].dtype == factors['b'].dtype == jnp.bfloat16
  assert not np.asarray(factors['b']).any()
  assert np.abs(np.asarray(factors['a'], np.float32)).max() <= 9 ** -0.5
  factors = {'a': factors['a'],
             'b': jnp.asarray(RNG.normal(size=(2, 6)), jnp.bfloat16)}
  merged = peft.merge(kernel, factors, 0.5)
  assert merged.dtype == jnp.bfloat16 and merged.shape == kernel.shape
  a, b = (np.asarray(factors[k], np.float32) for k in 'ab')
  np.testing.assert_allclose(
      np.asarray(merged, np.float32),
      np.asarray(kernel, np.float32) + 0.5 * (a @ b).reshape(3, 3, 1, 6),
      atol=0.05)


def test_lora_at_init_equals_the_base_model_exactly():
  for base, inputs in ((_conv4(norm='batch_running'), IMAGES),
                       (backbones.from_flax(MLP()), TOKENS)):
    wrapped = peft.peft_backbone(
        base, peft.lora_rules(['.*'], 2, alpha=8.0))
    params, state = wrapped.init(KEY, inputs)
    base_params, base_state = base.init(KEY, inputs)
    assert params['lora'] and not params['full'] and not params['adapters']
    for path, value in _flat(params['lora']).items():
      if path.endswith('/b'):
        assert not value.any()
    for train in (False, True):
      features, _ = wrapped.apply(params, state, inputs, train)
      expected, _ = base.apply(base_params, base_state, inputs, train)
      np.testing.assert_array_equal(features, expected)


def test_merged_params_equal_the_wrapped_model_and_differ_from_the_base():
  base = _conv4()
  rules = peft.lora_rules(['conv1'], 2, alpha=3.0, train=['norm1'])
  wrapped = peft.peft_backbone(base, rules)
  params, state = wrapped.init(KEY, IMAGES)
  params = _perturb_b(params)
  merged, inner = peft.merge_params(params, state, rules)
  base_params, base_state = base.init(KEY, IMAGES)
  assert (jax.tree.structure(merged) == jax.tree.structure(base_params)
          and inner == base_state)
  features, _ = wrapped.apply(params, state, IMAGES, False)
  exported, _ = base.apply(merged, inner, IMAGES, False)
  original, _ = base.apply(base_params, base_state, IMAGES, False)
  np.testing.assert_allclose(exported, features, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(features - original)).max() > 1e-3
  # Only the LoRA kernels moved; the rest is the base model bit for bit.
  flat_merged, flat_base = _flat(merged), _flat(base_params)
  for path in flat_base:
    same = np.array_equal(flat_merged[path], flat_base[path])
    assert same == (path != 'conv1/kernel'), path


def test_training_changes_only_lora_and_full_leaves_and_keeps_frozen_fixed():
  base = _conv4(norm='batch_running')
  wrapped = peft.peft_backbone(
      base, peft.lora_rules(['conv[0-2]'], 2, train=['norm0']))
  params, state = wrapped.init(KEY, IMAGES)
  trained, new_state = _train(wrapped, params, state, IMAGES,
                              optax.adam(1e-2), steps=3)
  before, after = _flat(params), _flat(trained)
  assert sorted(before) == sorted(after)
  assert {p.split('/')[0] for p in before} == {'full', 'lora'}
  for path in before:  # a moves from step 2 on: its gradient is 0 while b = 0
    assert not np.array_equal(before[path], after[path]), path
  for path, value in _flat(state['frozen']).items():
    np.testing.assert_array_equal(_flat(new_state['frozen'])[path], value)
  assert sorted(_flat(state['frozen'])) == [
      'conv0/kernel', 'conv1/kernel', 'norm1/bias', 'norm1/scale']
  # The inner state still trains: running statistics were updated.
  assert not np.array_equal(new_state['batch_stats']['norm0']['mean'],
                            state['batch_stats']['norm0']['mean'])


def test_bitfit_trains_exactly_the_biases():
  base = _conv4(norm='none')
  wrapped = peft.peft_backbone(base, peft.bitfit_rules())
  params, state = wrapped.init(KEY, IMAGES)
  trainable = _flat(params)
  assert sorted(trainable) == [f'full/conv{i}/bias' for i in range(2)]
  base_params, _ = base.init(KEY, IMAGES)
  trained, new_state = _train(wrapped, params, state, IMAGES,
                              optax.sgd(0.5), steps=2)
  merged, _ = peft.merge_params(trained, new_state, peft.bitfit_rules())
  for path, value in _flat(base_params).items():
    changed = not np.array_equal(_flat(merged)[path], value)
    assert changed == path.endswith('/bias'), path

  scales = peft.peft_backbone(_conv4(), peft.bitfit_rules(norm_scales=True))
  params, _ = scales.init(KEY, IMAGES)
  assert sorted(_flat(params)) == sorted(
      f'full/norm{i}/{name}' for i in range(2) for name in ('bias', 'scale'))


def test_parameter_counts_are_exact():
  wrapped = peft.peft_backbone(_conv4(), peft.lora_rules(['conv.*'], 2))
  params, state = wrapped.init(KEY, IMAGES)
  kernels = [(3, 3, 4, 4), (3, 3, 4, 4)]
  lora_count = sum(2 * (int(np.prod(s[:-1])) + s[-1]) for s in kernels)
  assert lora_count == 2 * 2 * (36 + 4) == 160
  base_params, _ = _conv4().init(KEY, IMAGES)
  base_total = _size(base_params)
  assert base_total == 2 * 36 * 4 + 2 * (4 + 4) == 304
  assert _size(params['full']) + _size(state['frozen']) == base_total
  count = peft.count_parameters(params, state)
  assert count == peft.ParameterCount(trainable=160, total=base_total + 160)
  assert count.fraction == pytest.approx(160 / 464)
  assert str(count) == 'trainable 160 of 464 parameters (34.48%)'

  mlp = peft.peft_backbone(backbones.from_flax(MLP()), [('out', 'full')],
                           adapters=['hidden'], adapter_size=2)
  params, state = mlp.init(KEY, TOKENS)
  adapter = 8 * 2 + 2 + 2 * 8 + 8
  mlp_base = 5 * 8 + 8 + 8 * 3 + 3
  assert peft.count_parameters(params, state) == (8 * 3 + 3 + adapter,
                                                  mlp_base + adapter)


def test_adapters_start_as_the_base_model_and_move_after_a_step():
  cases = ((backbones.from_flax(MLP()), TOKENS, ['hidden']),  # [B, L, D]
           (_conv4(), IMAGES, ['conv0', 'conv1']))           # [B, H, W, C]
  for base, inputs, paths in cases:
    wrapped = peft.peft_backbone(base, adapters=paths, adapter_size=3)
    params, state = wrapped.init(KEY, inputs)
    assert params['full'] == {} and params['lora'] == {}
    assert sorted(params['adapters']) == sorted(paths)
    base_params, base_state = base.init(KEY, inputs)
    assert jax.tree.all(jax.tree.map(np.array_equal, state['frozen'],
                                     base_params))
    features, _ = wrapped.apply(params, state, inputs, False)
    expected, _ = base.apply(base_params, base_state, inputs, False)
    np.testing.assert_array_equal(features, expected)
    if base.module.__class__ is MLP:  # one real step (compiles are slow)
      params, _ = _train(wrapped, params, state, inputs, optax.sgd(0.5), 1)
    else:
      params = jax.tree_util.tree_map_with_path(
          lambda p, x: x + 0.1 if path_string(p).endswith('up/kernel') else x,
          params)
    moved, _ = wrapped.apply(params, state, inputs, False)
    assert np.abs(np.asarray(moved - expected)).max() > 1e-4


def test_conv_lora_equals_a_naive_convolution_with_the_updated_kernel():
  base = _conv4(norm='none')  # [conv, bias, 2x2 max-pool, ReLU] x 2
  wrapped = peft.peft_backbone(base, [('conv1/kernel', 'lora:3:6')])
  params, state = wrapped.init(KEY, IMAGES)
  params = _perturb_b(params)
  frozen = jax.tree.map(lambda x: np.asarray(x, np.float64), state['frozen'])
  a = np.asarray(params['lora']['conv1']['kernel']['a'], np.float64)
  b = np.asarray(params['lora']['conv1']['kernel']['b'], np.float64)
  assert a.shape == (3 * 3 * 4, 3) and b.shape == (3, 4)
  updated = frozen['conv1']['kernel'] + (6 / 3) * (a @ b).reshape(3, 3, 4, 4)

  def block(x, kernel, bias):
    # A 'SAME' 3x3 convolution as a sum over the kernel taps, then the
    # bias, a 2x2 max-pool and the ReLU.
    batch, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(np.einsum('bhwc,co->bhwo', padded[:, i:i + height, j:j + width],
                      kernel[i, j]) for i in range(3) for j in range(3))
    y = (y + bias).reshape(batch, height // 2, 2, width // 2, 2, -1)
    return np.maximum(y.max(axis=(2, 4)), 0)

  x = block(np.asarray(IMAGES, np.float64), frozen['conv0']['kernel'],
            frozen['conv0']['bias'])
  expected = block(x, updated, frozen['conv1']['bias']).reshape(2, -1)
  features, _ = wrapped.apply(params, state, IMAGES, False)
  np.testing.assert_allclose(features, expected, atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem():
  conv4 = _conv4()
  with pytest.raises(ValueError, match=r"'conv9' matches no parameter.*"
                     r"'conv0/kernel'"):
    peft.peft_backbone(conv4, [('conv9', 'full')]).init(KEY, IMAGES)
  with pytest.raises(ValueError, match=r"too large for the kernel "
                     r"'conv0/kernel' of shape \(3, 3, 4, 4\).*largest "
                     r"allowed rank is 4"):
    peft.peft_backbone(conv4, peft.lora_rules(['conv0'], 5)).init(KEY,
                                                                  IMAGES)
  with pytest.raises(ValueError, match='Unknown rule action'):
    peft.peft_backbone(conv4, [('conv0', 'lorra:2')])
  with pytest.raises(ValueError, match='must be >= 1'):
    peft.lora_rules(['conv0'], 0)
  with pytest.raises(ValueError, match='at least 2 dimensions'):
    peft.peft_backbone(conv4, [('norm0', 'lora:1')]).init(KEY, IMAGES)
  with pytest.raises(ValueError, match=r"No submodule 'block3'.*'conv0'"):
    peft.peft_backbone(conv4, adapters=['block3']).init(KEY, IMAGES)
  with pytest.raises(ValueError, match='return one array'):
    # BatchNormAffine returns (multiplier, offset).
    peft.peft_backbone(conv4, adapters=['norm0']).init(KEY, IMAGES)
  mlp = backbones.from_flax(MLP())
  jitted_inner = backbones.Backbone(mlp.init, jax.jit(mlp.apply,
                                                      static_argnums=3), None)
  wrapped = peft.peft_backbone(jitted_inner, adapters=['hidden'])
  params, state = wrapped.init(KEY, TOKENS)  # traces the jitted apply
  with pytest.raises(ValueError, match=r"adapters \['hidden'\] were not "
                     'applied'):  # its cached trace has no adapter
    wrapped.apply(params, state, TOKENS, False)
  with pytest.raises(ValueError, match='cannot be folded'):
    peft.merge_params(params, state, None)
  with pytest.raises(ValueError, match='do not fit the rules'):
    peft.merge_params({**params, 'adapters': {}}, state,
                      peft.lora_rules(['hidden'], 2))
  with pytest.raises(ValueError, match=r"kernels of 'conv9'.*matches no "):
    peft.peft_backbone(conv4, peft.lora_rules(['conv9'], 2)).init(KEY, IMAGES)


def test_jit_and_grad_work_through_the_wrapped_apply():
  rules = peft.lora_rules(['hidden'], 2, train=['out/bias'])
  wrapped = peft.peft_backbone(backbones.from_flax(MLP()), rules,
                               adapters=['hidden'], adapter_size=2)
  params, state = wrapped.init(KEY, TOKENS)
  params = _perturb_b(params)
  eager, _ = wrapped.apply(params, state, TOKENS, False)
  jitted, _ = jax.jit(wrapped.apply, static_argnums=3)(params, state,
                                                       TOKENS, False)
  np.testing.assert_allclose(jitted, eager, atol=1e-6, rtol=1e-6)

  def loss(params):
    return jnp.sum(wrapped.apply(params, state, TOKENS, True)[0] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for path, grad in _flat(grads).items():
    assert np.isfinite(grad).all(), path
    if path.startswith('lora') or path.endswith('up/kernel'):
      assert np.abs(grad).max() > 0, path


def test_with_fixed_init_splits_given_weights_into_the_peft_layout():
  base = backbones.from_flax(MLP())
  weights, state = base.init(jax.random.key(7, impl='rbg'), TOKENS)
  rules = peft.lora_rules(['hidden'], 2, train=['out'])
  wrapped = peft.peft_backbone(peft.with_fixed_init(base, weights, state),
                               rules)
  params, peft_state = wrapped.init(KEY, TOKENS)
  np.testing.assert_array_equal(peft_state['frozen']['hidden']['kernel'],
                                weights['hidden']['kernel'])
  np.testing.assert_array_equal(params['full']['out']['kernel'],
                                weights['out']['kernel'])
  merged, _ = peft.merge_params(params, peft_state, rules)
  assert all(np.array_equal(merged_leaf, leaf) for merged_leaf, leaf in zip(
      jax.tree.leaves(merged), jax.tree.leaves(weights)))


def test_a_meta_batch_passes_the_frozen_weights_through_unaveraged():
  from fewshot.algorithms import protonet  # pylint: disable=g-import-not-at-top
  from fewshot.episodes import Episode  # pylint: disable=g-import-not-at-top
  from fewshot.losses import meta_batch_loss  # pylint: disable=g-import-not-at-top
  backbone = peft.peft_backbone(_conv4(norm='batch_running'),
                                peft.lora_rules(['conv1'], rank=2))
  algorithm = protonet(backbone)
  params, state = algorithm.init(KEY, IMAGES)
  labels = jnp.tile(jnp.arange(2, dtype=jnp.int32), (3, 1))
  images = jnp.stack([IMAGES * (t + 1) for t in range(3)])
  episodes = Episode(support_images=images, support_labels=labels,
                     query_images=images, query_labels=labels,
                     class_ids=labels, num_ways=2)
  _, (_, new_state) = meta_batch_loss(algorithm, params, state, episodes, KEY)
  for a, b in zip(jax.tree.leaves(new_state['frozen']),
                  jax.tree.leaves(state['frozen'])):
    assert a is b  # passed through, not a mean of three copies
  # The BatchNorm statistics are still the tasks' mean, and they moved.
  assert not np.allclose(new_state['batch_stats']['norm0']['mean'],
                         state['batch_stats']['norm0']['mean'])


def test_a_config_peft_section_builds_the_wrapped_backbone_and_counts_it():
  from fewshot import builder  # pylint: disable=g-import-not-at-top
  from helpers import load_config  # pylint: disable=g-import-not-at-top
  config = load_config('protonet_synthetic', 'steps=1')
  config.backbone.filters = 4
  with config.unlocked():
    config.backbone.peft = dict(method='lora', targets=['conv1'], rank=2)
  info = builder.build(config).info
  # Conv-4's conv1 kernel is 3x3x4x4: rank 2 adds 2 * (36 + 4) factors.
  assert info['peft'] == 'lora' and info['trainable_parameters'] == 80
  with config.unlocked():
    config.backbone.peft = dict(method='bitfit')
  assert builder.build(config).info['trainable_parameters'] == 4 * 4  # biases
  with config.unlocked():
    config.backbone.peft = dict(method='prefix')
  with pytest.raises(ValueError, match='backbone.peft.method must be one of'):
    builder.build(config)
