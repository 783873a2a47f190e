"""Multi-task weighting and gradient surgery against closed forms, hand
derivations and naive loops."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot.multitask import (delta_p, gram_matrix, make_weighting,
                               task_gaps, task_gradients)
from fewshot.multitask.gradients import combine
from fewshot.multitask.simplex import (cagrad_objective, cagrad_weights,
                                       min_norm_weights, project_to_simplex)
from fewshot.multitask.weighting import pcgrad_coefficients

KEY = jax.random.key(0)


def _combination(name, losses, grads=None, key=KEY, steps=0, **options):
  """The weighting's shared coefficients after `steps` steps of `losses`."""
  weighting = make_weighting(name, **options)
  params, state = weighting.init(len(losses))
  gram = None if grads is None else jnp.asarray(grads @ grads.T)
  for _ in range(steps):
    state = weighting.combine(params, state, jnp.asarray(losses), gram,
                              key).state
  return weighting.combine(params, state, jnp.asarray(losses), gram, key)


@pytest.mark.parametrize('batched', [True, False])
def test_task_gradients_equal_separate_grads(batched):
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

  def losses(p):
    out = jnp.tanh(x @ p['w'] + p['b'][None, :])
    return jnp.stack([jnp.sum(out[:, t] ** 2) * (t + 1) for t in range(3)]), 0

  (values, _), grads = jax.jit(lambda p: task_gradients(
      losses, p, batched=batched))(params)
  for t in range(3):
    expected = jax.grad(lambda p: losses(p)[0][t])(params)
    for name in params:
      np.testing.assert_allclose(grads[name][t], expected[name], rtol=1e-5,
                                 atol=1e-6)
  flat = np.concatenate([np.asarray(grads['w']).reshape(3, -1),
                         np.asarray(grads['b'])], axis=1)
  np.testing.assert_allclose(gram_matrix(grads), flat @ flat.T, rtol=1e-5)
  np.testing.assert_allclose(combine(grads, jnp.asarray([1., 2., 3.]))['b'],
                             np.asarray([1, 2, 3]) @ np.asarray(grads['b']),
                             rtol=1e-5)
  np.testing.assert_allclose(values, losses(params)[0], rtol=1e-6)


def test_pcgrad_closed_form_and_aligned():
  g = np.array([[1.0, 0.0], [-1.0, 1.0]], np.float32)   # conflicting
  c = pcgrad_coefficients(jnp.asarray(g @ g.T), KEY)
  pc1 = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
  pc2 = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
  np.testing.assert_allclose(np.asarray(c) @ g, pc1 + pc2, atol=1e-6)
  aligned = np.array([[1.0, 0.2], [0.5, 1.0]], np.float32)
  c = pcgrad_coefficients(jnp.asarray(aligned @ aligned.T), KEY)
  np.testing.assert_allclose(c, [1.0, 1.0], atol=1e-7)


def test_pcgrad_matches_naive_loop_over_random_orders():
  rng = np.random.default_rng(1)
  g = rng.normal(size=(4, 6))
  key = jax.random.key(3)
  coefficients = pcgrad_coefficients(jnp.asarray(g @ g.T, jnp.float32), key)
  orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 4))(
      jax.random.split(key, 4)))
  total = np.zeros(6)
  for i in range(4):
    pc = g[i].copy()
    for j in orders[i]:
      if pc @ g[j] < 0:
        pc -= (pc @ g[j]) / (g[j] @ g[j]) * g[j]
    total += pc
  np.testing.assert_allclose(np.asarray(coefficients) @ g, total, rtol=1e-4,
                             atol=1e-5)


def test_uncertainty_gradient_is_the_hand_derived_formula():
  weighting = make_weighting('uncertainty')
  losses = jnp.asarray([0.7, 2.5])
  params = {'log_variance': jnp.asarray([0.3, -0.4])}
  grad = jax.grad(lambda p: weighting.combine(p, {}, losses, None,
                                              KEY).loss)(params)
  s = np.asarray(params['log_variance'])
  np.testing.assert_allclose(grad['log_variance'],
                             -np.asarray(losses) / (2 * np.exp(s)) + 0.5,
                             rtol=1e-6)
  combination = weighting.combine(params, {}, losses, None, KEY)
  np.testing.assert_allclose(combination.shared, 0.5 * np.exp(-s), rtol=1e-6)


def test_gradnorm_moves_weights_towards_equal_gradient_norms():
  weighting = make_weighting('gradnorm', period=1, alpha=0.0)
  params, state = weighting.init(2)
  gram = jnp.diag(jnp.asarray([1.0, 100.0]))   # |g| = 1 and 10
  losses = jnp.asarray([1.0, 1.0])
  state = weighting.combine(params, state, losses, gram, KEY).state  # L(0)

  def imbalance(p):
    w = 2 * jax.nn.softmax(p['logits'])
    return float(w[1] * 10 / (w[0] * 1))

  before = imbalance(params)
  grad_fn = jax.jit(jax.grad(lambda p: weighting.combine(p, state, losses,
                                                         gram, KEY).loss))
  for _ in range(50):
    grad = grad_fn(params)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad)
  assert before == pytest.approx(10.0)
  assert imbalance(params) < 0.5 * before
  combination = weighting.combine(params, state, losses, gram, KEY)
  assert float(combination.shared[0]) > float(combination.shared[1])
  np.testing.assert_allclose(np.sum(combination.shared), 2.0, rtol=1e-6)


def test_dwa_weights_from_the_last_two_windows():
  weighting = make_weighting('dwa', period=2, temperature=2.0)
  params, state = weighting.init(2)
  history = [[4.0, 1.0], [2.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
  for losses in history:   # windows: means [3, 1] then [1, 1]
    combination = weighting.combine(params, state, jnp.asarray(losses), None,
                                    KEY)
    np.testing.assert_allclose(combination.shared, [1.0, 1.0])
    state = combination.state
  ratios = np.array([1.0 / 3.0, 1.0])
  expected = 2 * np.exp(ratios / 2) / np.exp(ratios / 2).sum()
  combination = weighting.combine(params, state, jnp.asarray([1.0, 1.0]),
                                  None, KEY)
  np.testing.assert_allclose(combination.shared, expected, rtol=1e-6)


def test_cagrad_with_c_zero_is_the_mean_gradient():
  g = np.array([[1.0, 0.0, 2.0], [-3.0, 1.0, 0.5]], np.float32)
  combination = _combination('cagrad', np.ones(2, np.float32), g, c=0.0)
  np.testing.assert_allclose(np.asarray(combination.shared) @ g,
                             g.mean(axis=0), rtol=1e-6)


def test_cagrad_direction_from_its_definition():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(3, 5)).astype(np.float32)
  c = 0.5
  combination = _combination('cagrad', np.ones(3, np.float32), g, c=c,
                             rescale=0)
  gram = jnp.asarray(g @ g.T)
  radius = c * float(np.sqrt(np.mean(g @ g.T)))
  w = np.asarray(cagrad_weights(gram, radius))
  gw = w @ g
  expected = g.mean(0) + radius / np.linalg.norm(gw) * gw
  np.testing.assert_allclose(np.asarray(combination.shared) @ g, expected,
                             rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('tasks', [2, 3])
def test_simplex_solvers_match_a_grid_search(tasks):
  rng = np.random.default_rng(tasks)
  g = rng.normal(size=(tasks, 4))
  gram = g @ g.T
  grid = [np.array(w) / 50 for w in itertools.product(range(51),
                                                      repeat=tasks)
          if sum(w) == 50]
  norms = [w @ gram @ w for w in grid]
  w = np.asarray(min_norm_weights(jnp.asarray(gram, jnp.float32)))
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
  assert w.min() >= 0
  assert w @ gram @ w <= min(norms) + 1e-6
  c = 0.4 * np.sqrt(np.mean(gram))
  values = [float(cagrad_objective(jnp.asarray(v), jnp.asarray(gram), c))
            for v in grid]
  w = cagrad_weights(jnp.asarray(gram, jnp.float32), c)
  assert float(cagrad_objective(w, jnp.asarray(gram), c)) <= min(values) + 1e-3


def test_min_norm_two_tasks_closed_form():
  g = np.array([[2.0, 0.0], [0.0, 1.0]])
  w = np.asarray(min_norm_weights(jnp.asarray(g @ g.T, jnp.float32)))
  # argmin |a g1 + (1-a) g2|^2: a = |g2|^2 / |g1 - g2|^2 = 1/5.
  np.testing.assert_allclose(w, [0.2, 0.8], rtol=1e-5)


def test_project_to_simplex():
  y = jnp.asarray([0.5, 2.0, -1.0, 0.7])
  p = np.asarray(project_to_simplex(y))
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  grid = [np.array(w) / 20 for w in itertools.product(range(21), repeat=4)
          if sum(w) == 20]
  best = min(np.sum((w - np.asarray(y)) ** 2) for w in grid)
  assert np.sum((p - np.asarray(y)) ** 2) <= best + 1e-6


@pytest.mark.parametrize('name,options,expected', [
    ('equal', {}, 1.0), ('fixed', {'weights': (3.0,)}, 1.0),
    ('dwa', {'period': 1}, 1.0), ('gradnorm', {'period': 1}, 1.0),
    ('pcgrad', {}, 1.0), ('mgda', {}, 1.0), ('mgda', {'normalization': 'l2'},
                                              0.5),
    ('cagrad', {'rescale': 2}, 1.0), ('uncertainty', {}, 0.5)])
def test_a_single_task_is_single_task_training(name, options, expected):
  """With one task every method's update is that task's gradient (times
  1/(2 sigma^2) = 0.5 at initialisation for uncertainty weighting, and
  1/|g| for MGDA's l2 normalisation), whatever the history."""
  g = np.array([[2.0, 0.0]], np.float32)
  for steps in (0, 3):
    combination = _combination(name, np.ones(1, np.float32), g, steps=steps,
                               **options)
    np.testing.assert_allclose(combination.shared, [expected], rtol=1e-5)


def test_bad_weighting_options_are_named():
  with pytest.raises(ValueError, match='positive number'):
    make_weighting('fixed', weights=(0.0, 0.0))
  with pytest.raises(ValueError, match='non-negative'):
    make_weighting('fixed', weights=(1.0, -1.0))
  with pytest.raises(ValueError, match="Unknown multi-task weighting 'pc'.*"
                                       'pcgrad'):
    make_weighting('pc')
  with pytest.raises(ValueError, match='period'):
    make_weighting('dwa', period=0)
  with pytest.raises(ValueError, match='Unknown option'):
    make_weighting('pcgrad', alpha=1.0)


def test_delta_p_is_libmtl_count_improvement():
  baselines = {'left': {'accuracy': 0.80}, 'depth': {'abs_err': 0.5,
                                                     'rel_err': 0.2}}
  results = {'left': {'accuracy': 0.84}, 'depth': {'abs_err': 0.45,
                                                   'rel_err': 0.22}}
  higher = {'left': {'accuracy': True},
            'depth': {'abs_err': False, 'rel_err': False}}
  expected = 100 * np.mean([0.04 / 0.80, np.mean([0.05 / 0.5, -0.02 / 0.2])])
  assert delta_p(results, baselines, higher) == pytest.approx(expected)
  with pytest.raises(ValueError, match="No single-task baseline for task "
                                       "'right'"):
    delta_p({'right': {'accuracy': 1.0}}, baselines, higher)


def test_task_gaps_name_the_tasks_that_gain_and_lose():
  gaps = task_gaps({'left': [0.9, 0.91, 0.92], 'right': [0.7, 0.71, 0.69],
                    'loss': [1.0, 2.0, 3.0]},
                   {'left': [0.8, 0.81, 0.83], 'right': [0.8, 0.79, 0.8],
                    'loss': [1.1, 1.9, 3.2]},
                   {'left': True, 'right': True, 'loss': False})
  assert gaps['gain'] == ['left'] and gaps['lose'] == ['right']
  assert gaps['tasks']['left']['gap'] == pytest.approx(0.29 / 3)
  assert gaps['tasks']['loss']['seeds'] == 3
