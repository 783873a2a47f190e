"""Transfer toolkit: masks, layer rates, unfreezing, L2-SP, MMD, transfer tables."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fewshot import backbones
from fewshot import transfer


@functools.cache
def _params():
  """Conv-4 (2 blocks) parameters plus a new linear head (immutable arrays)."""
  backbone = backbones.create('conv4', filters=4, num_blocks=2)
  # The real parameter tree, filled with seeded values without running init.
  shapes, _ = jax.eval_shape(backbone.init, jax.random.key(0),
                             jnp.zeros((1, 8, 8, 1)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
  head = {'kernel': jnp.full((16, 3), 0.5, jnp.float32),
          'bias': jnp.full((3,), 0.25, jnp.float32)}
  return {'backbone': params, 'head': head}


def _gradients(params, seed=0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def _bits(x):
  return np.asarray(x).view(np.uint32)


def test_param_paths_and_path_mask():
  params = _params()
  assert transfer.param_paths(params)['backbone']['conv1']['kernel'] == (
      'backbone/conv1/kernel')
  flat = lambda mask: {path: value for path, value in zip(
      jax.tree.leaves(transfer.param_paths(params)), jax.tree.leaves(mask))}
  # A pattern selects whole subtrees at '/' boundaries, not substrings.
  assert flat(transfer.path_mask(params, ['head'])) == {
      'backbone/conv0/kernel': False, 'backbone/conv1/kernel': False,
      'backbone/norm0/bias': False, 'backbone/norm0/scale': False,
      'backbone/norm1/bias': False, 'backbone/norm1/scale': False,
      'head/bias': True, 'head/kernel': True}
  regex = flat(transfer.path_mask(params, [r'backbone/(conv|norm)1', 'head']))
  glob = flat(transfer.path_mask(params, ['backbone/*1', 'head'],
                                 syntax='glob'))
  assert regex == glob
  assert sorted(p for p, v in regex.items() if v) == [
      'backbone/conv1/kernel', 'backbone/norm1/bias', 'backbone/norm1/scale',
      'head/bias', 'head/kernel']
  assert not any(flat(transfer.path_mask(params, ['back'])).values())
  assert all(flat(transfer.path_mask(params, '.*')).values())


def test_freeze_keeps_frozen_leaves_bit_identical():
  params = _params()
  mask = transfer.path_mask(params, ['head', 'backbone/conv1'])
  # adamw's weight decay must not leak into the frozen leaves either.
  optimizer = transfer.freeze(optax.adamw(1e-2, weight_decay=0.1), mask)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, seed):
    grads = _gradients(params, seed)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new = params
  for seed in range(3):
    new, state = step(new, state, seed)
  for trainable, before, after in zip(jax.tree.leaves(mask),
                                      jax.tree.leaves(params),
                                      jax.tree.leaves(new)):
    assert np.array_equal(_bits(before), _bits(after)) != trainable


def test_layerwise_learning_rates_scale_sgd_updates_exactly():
  params = _params()
  scales = transfer.layerwise_lr_scales(
      params, [r'backbone/(conv|norm)0', r'backbone/(conv|norm)1', 'head'],
      decay=0.5)
  assert scales['head']['kernel'] == 1.0
  assert scales['backbone']['norm1']['scale'] == 0.5
  assert scales['backbone']['conv0']['kernel'] == 0.25
  with pytest.raises(ValueError, match='matches none of the layer groups'):
    transfer.layerwise_lr_scales(params, ['head'], decay=0.5)
  assert transfer.layerwise_lr_scales(
      params, ['head'], decay=0.5, default=0.0)['backbone']['conv0'][
          'kernel'] == 0.0

  grads = _gradients(params)
  scaled_tx = optax.chain(optax.sgd(0.1), transfer.scale_by_tree(scales))
  frozen_tx = transfer.freeze(scaled_tx, transfer.path_mask(params, 'head'))

  @jax.jit
  def all_updates(grads, params):
    return [tx.update(grads, tx.init(params), params)[0]
            for tx in (optax.sgd(0.1), scaled_tx, frozen_tx)]

  plain, scaled, updates = all_updates(grads, params)
  ratios = jax.tree.map(lambda s, p: np.asarray(s) / np.asarray(p), scaled,
                        plain)
  jax.tree.map(lambda r, m: np.testing.assert_allclose(r, m, rtol=1e-6),
               ratios, scales)
  # Inside `freeze`, the multipliers still line up with the trainable leaves.
  np.testing.assert_array_equal(updates['head']['kernel'],
                                plain['head']['kernel'])
  assert not np.any(np.asarray(updates['backbone']['conv0']['kernel']))


@pytest.mark.parametrize('wrapped', [True, False])
def test_gradual_unfreezing_switches_at_the_configured_steps(wrapped):
  params = _params()
  stages = [(0, ['head']), (2, ['head', 'backbone/conv1']), (4, ['.*'])]
  if wrapped:
    optimizer = transfer.gradual_unfreezing(
        stages, optax.adamw(1e-2, weight_decay=0.1))
  else:
    optimizer = optax.chain(optax.sgd(1e-2),
                            transfer.gradual_unfreezing(stages))
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = optimizer.update(_gradients(params), state, params)
    return optax.apply_updates(params, updates), state

  state = optimizer.init(params)
  moved = []  # per step: which of head, conv1, conv0 changed
  for _ in range(6):
    new, state = step(params, state)
    moved.append(tuple(
        not np.array_equal(_bits(a), _bits(b)) for a, b in (
            (new['head']['kernel'], params['head']['kernel']),
            (new['backbone']['conv1']['kernel'],
             params['backbone']['conv1']['kernel']),
            (new['backbone']['conv0']['kernel'],
             params['backbone']['conv0']['kernel']))))
    params = new
  assert moved == [(True, False, False)] * 2 + [(True, True, False)] * 2 + [
      (True, True, True)] * 2
  assert len(traces) == 1  # one compiled step serves every stage
  with pytest.raises(ValueError, match='increasing'):
    transfer.gradual_unfreezing([(5, ['head']), (5, ['.*'])])


def test_l2sp_pulls_toward_the_pretrained_weights():
  pretrained = _params()
  reference = {'backbone': pretrained['backbone'],
               'head': jax.tree.map(jnp.zeros_like, pretrained['head'])}
  strengths = {'backbone': jax.tree.map(lambda _: 1.0, pretrained['backbone']),
               'head': {'kernel': 0.5, 'bias': 0.0}}
  # The transformation adds exactly the gradient of the penalty.
  params = jax.tree.map(lambda p, g: p + g, pretrained, _gradients(pretrained))
  penalty_grads = jax.grad(transfer.l2sp_penalty)(params, reference, strengths)
  tx = transfer.l2sp(reference, strengths)
  zero_task_grads = jax.tree.map(jnp.zeros_like, params)
  added, _ = tx.update(zero_task_grads, tx.init(params), params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
               added, penalty_grads)
  # With no task gradient, SGD moves the backbone monotonically toward the
  # pretrained weights and the head kernel toward zero; the bias stays.
  optimizer = optax.chain(transfer.l2sp(reference, strengths), optax.sgd(0.3))
  state = optimizer.init(params)
  distance = lambda p: float(optax.tree.norm(
      jax.tree.map(jnp.subtract, p['backbone'], pretrained['backbone'])))
  distances, kernel_norms = [distance(params)], [
      float(jnp.linalg.norm(params['head']['kernel']))]
  for _ in range(5):
    updates, state = optimizer.update(zero_task_grads, state, params)
    params = optax.apply_updates(params, updates)
    distances.append(distance(params))
    kernel_norms.append(float(jnp.linalg.norm(params['head']['kernel'])))
  assert all(b < a for a, b in zip(distances, distances[1:]))
  assert all(b < a for a, b in zip(kernel_norms, kernel_norms[1:]))
  assert distances[-1] < 0.2 * distances[0]
  np.testing.assert_array_equal(params['head']['bias'],
                                (pretrained['head']['bias'] +
                                 _gradients(pretrained)['head']['bias']))


def test_early_stopping():
  stopper = transfer.EarlyStopping.create(patience=3)
  history = []
  for step, accuracy in enumerate([0.5, 0.6, 0.6, 0.55, 0.59, 0.7, 0.6, 0.6,
                                   0.6]):
    stopper = stopper.update(step, accuracy)
    history.append((bool(stopper.improved), bool(stopper.should_stop)))
  assert float(stopper.best) == pytest.approx(0.7)
  assert int(stopper.best_step) == 5
  assert [h[0] for h in history] == [True, True, False, False, False, True,
                                     False, False, False]
  assert [h[1] for h in history].index(True) == 4  # 3 steps after step 1
  assert history[-1][1]
  # The same state works inside a compiled loop.
  def body(stopper, step_and_value):
    return stopper.update(*step_and_value), None
  values = jnp.asarray([0.1, 0.3, 0.2, 0.2, 0.2, 0.2])
  final, _ = jax.jit(lambda s: jax.lax.scan(body, s, (jnp.arange(6), values)))(
      transfer.EarlyStopping.create(patience=3))
  assert int(final.best_step) == 1 and bool(final.should_stop)


def test_mmd_detects_shift_and_is_symmetric():
  rng = np.random.default_rng(0)
  source = rng.normal(size=(200, 8)).astype(np.float32)
  same = rng.normal(size=(200, 8)).astype(np.float32)
  shifted = same + np.float32(1.0)
  mmd = jax.jit(transfer.mmd)
  assert abs(float(mmd(source, same))) < 0.01
  assert float(mmd(source, shifted)) > 0.1
  np.testing.assert_allclose(mmd(source, shifted), mmd(shifted, source),
                             rtol=1e-5)
  # Against a naive unbiased estimate with fixed bandwidths.
  x, y = source[:6].astype(np.float64), shifted[:5].astype(np.float64)
  widths = (0.5, 2.0)
  k = lambda a, b: np.mean([np.exp(-np.sum((a - b) ** 2) / (2 * s * s))
                            for s in widths])
  xx = np.mean([k(a, b) for i, a in enumerate(x) for j, b in enumerate(x)
                if i != j])
  yy = np.mean([k(a, b) for i, a in enumerate(y) for j, b in enumerate(y)
                if i != j])
  xy = np.mean([k(a, b) for a in x for b in y])
  np.testing.assert_allclose(transfer.mmd(x, y, bandwidths=widths),
                             xx + yy - 2 * xy, rtol=1e-4, atol=1e-6)


def test_color_jitter():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
  jitter = jax.jit(transfer.color_jitter)
  out = jitter(jax.random.key(0), images)
  assert out.dtype == np.uint8 and out.shape == images.shape
  np.testing.assert_array_equal(out, jitter(jax.random.key(0), images))
  assert not np.array_equal(out, jitter(jax.random.key(1), images))
  assert not np.array_equal(out, images)
  identity = transfer.color_jitter(jax.random.key(0), images, brightness=0.0,
                                   contrast=0.0, saturation=0.0)
  np.testing.assert_array_equal(identity, images)
  # Saturation leaves gray pixels gray; floats stay in [0, 1].
  gray = jnp.repeat(jnp.asarray(rng.uniform(size=(2, 5, 5, 1)), jnp.float32),
                    3, axis=-1)
  out = transfer.color_jitter(jax.random.key(2), gray, brightness=0.0,
                              contrast=0.0, saturation=0.9)
  np.testing.assert_allclose(out, gray, atol=1e-6)
  out = transfer.color_jitter(jax.random.key(3), gray[0], brightness=2.0)
  assert out.shape == gray[0].shape
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_transfer_report_flags_negative_transfer():
  rng = np.random.default_rng(2)
  pretrained = lambda size: 0.8 + 0.01 * rng.normal(size=50) - (
      0.3 if size == 100 else 0.0)
  scratch = lambda size: 0.6 + 0.01 * rng.normal(size=50) + 0.001 * size
  report = transfer.transfer_report(pretrained, scratch, (1, 5, 100))
  assert [row['verdict'] for row in report.rows] == ['positive', 'positive',
                                                     'negative']
  assert report.negative_sizes == [100]
  table = str(report)
  assert table.count('\n') == 4 and '**negative transfer**' in table
  tie = transfer.transfer_report(lambda s: [0.5, 0.6], lambda s: [0.5, 0.6],
                                 (1,), paired=True)
  assert tie.rows[0]['verdict'] == 'inconclusive'


def test_fit_in_stages_equals_one_scan_and_skips_frozen_gradients():
  rng = np.random.default_rng(7)
  inputs = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  params = {'body': {'kernel': jnp.asarray(rng.normal(size=(3, 4)),
                                           jnp.float32)},
            'head': {'kernel': jnp.asarray(rng.normal(size=(4, 2)),
                                           jnp.float32)}}

  def loss_fn(p):
    hidden = jnp.tanh(inputs @ p['body']['kernel'])
    return jnp.mean(jnp.square(hidden @ p['head']['kernel'] - targets))

  schedule = [(0, ['head']), (3, ['.*'])]
  optimizer = transfer.gradual_unfreezing(schedule, optax.adam(0.05))
  whole, whole_losses = transfer.fit(loss_fn, params, optimizer, 6)
  stages = [(start, transfer.path_mask(params, patterns))
            for start, patterns in schedule]
  staged, staged_losses = jax.jit(lambda p: transfer.fit(
      loss_fn, p, optimizer, 6, stages=stages))(params)
  np.testing.assert_allclose(staged_losses, whole_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(staged), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The body moved only in the second stage; the first stage's backward pass
  # never reached it (its gradient under the stage mask is exactly zero).
  body_grad = jax.grad(lambda p: loss_fn(jax.tree.map(
      lambda x, m: x if m else jax.lax.stop_gradient(x), p, stages[0][1])))(
          params)['body']['kernel']
  assert float(jnp.abs(body_grad).max()) == 0.0
  assert not np.allclose(staged['body']['kernel'], params['body']['kernel'])
  with pytest.raises(ValueError, match='begin at 0'):
    transfer.fit(loss_fn, params, optimizer, 6, stages=[(1, stages[0][1])])
