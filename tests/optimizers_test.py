"""The outer-loop optimizer factory and the inner-loop rule table."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fewshot import optimizers


def test_cosine_after_decay_start_continues_a_constant_run():
  """The schedules share one optimizer state, and `decay_start` holds the
  rate until then: a constant-rate state continues under the cosine."""
  params = {'w': np.ones(3, np.float32)}
  constant = optimizers.make_optimizer(learning_rate=0.1, num_steps=10)
  cosine = optimizers.make_optimizer(learning_rate=0.1, schedule='cosine',
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
    optimizers.make_optimizer(schedule='cosine', num_steps=10, decay_start=10)
  with pytest.raises(ValueError, match='cosine schedule only'):
    optimizers.make_optimizer(schedule='constant', num_steps=10, decay_start=5)


def test_weight_decay_is_added_to_the_gradient_except_the_cosine_scale():
  params = {'kernel': np.full(3, 2.0, np.float32),
            'log_scale': np.float32(1.0)}
  zero = jax.tree.map(np.zeros_like, params)
  sgd = optimizers.make_optimizer(name='sgd', learning_rate=0.1,
                                  weight_decay=0.5)
  updates, _ = sgd.update(zero, sgd.init(params), params)
  # First SGD step: -lr * (grad + decay * param); no decay on log_scale.
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * 2.0, rtol=1e-6)
  assert float(updates['log_scale']) == 0.0
  adamw = optimizers.make_optimizer(name='adamw', learning_rate=0.1,
                                    weight_decay=0.5)
  updates, _ = adamw.update(zero, adamw.init(params), params)
  assert float(updates['log_scale']) != 0.0  # decoupled: decays everything


def test_inner_optimizer_table():
  grads, params = {'w': np.ones(2, np.float32)}, {'w': np.zeros(2, np.float32)}
  for rule, expected in (('sgd', -0.5), ('adam', -0.5)):
    tx = optimizers.inner_optimizer(rule, 0.5)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['w'], expected, rtol=1e-5)
  given = optax.sgd(0.25)
  assert optimizers.inner_optimizer(given, 0.5) is given
  tx = optimizers.inner_optimizer(lambda lr: optax.sgd(2 * lr), 0.5)
  np.testing.assert_allclose(tx.update(grads, tx.init(params))[0]['w'], -1.0)
  with pytest.raises(ValueError, match="rule must be one of.*got 'lbfgs'"):
    optimizers.inner_optimizer('lbfgs', 0.1, what='rule')


def test_weight_decay_comes_before_clipping():
  # Zero gradients, large weights: the decay term alone has norm 10 and is
  # clipped to 1 (the order of the optimizer state before they shared this
  # factory: decay, clip, update).
  params = {'w': np.full(4, 10.0, np.float32)}
  tx = optimizers.make_optimizer(name='sgd', learning_rate=0.1,
                                 weight_decay=0.5, clip_norm=1.0)
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params),
                         params)
  np.testing.assert_allclose(np.linalg.norm(updates['w']), 0.1, rtol=1e-5)


def test_rate_multipliers_scale_one_group_and_add_no_state():
  params = {'backbone': jnp.ones(3), 'loss': {'proxies': jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  plain = optimizers.make_optimizer(name='sgd', learning_rate=0.1)
  scaled = optimizers.make_optimizer(name='sgd', learning_rate=0.1,
                                     rate_multipliers={'loss': 100.0})
  plain_updates, _ = plain.update(grads, plain.init(params), params)
  scaled_updates, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(scaled_updates['backbone'],
                             plain_updates['backbone'])
  np.testing.assert_allclose(scaled_updates['loss']['proxies'],
                             100 * plain_updates['loss']['proxies'])
  assert (jax.tree.structure(scaled.init(params))
          == jax.tree.structure(plain.init(params)))
  with pytest.raises(ValueError, match=r"names \['head'\].*\['backbone', "
                     "'loss'\\]"):
    optimizers.make_optimizer(rate_multipliers={'head': 2.0}).init(params)
