"""A new objective is one value: the harness trains it unchanged.

The objective here (least-squares regression on minibatches) lives in this
test file, as a metric-learning or distillation objective will live in its
own module: the harness, the train step and the checkpoints do not know it.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fewshot import harness
from fewshot.checkpoint import Checkpointer
from fewshot.experiment import Experiment
from fewshot.objectives import Objective, init_state, make_train_step
from fewshot.objectives.base import TrainState
from helpers import killed_after_checkpoint


def regression(batch_size: int) -> Objective:
  """Least squares `y ~ x @ w + b` on minibatches drawn from the step key."""

  def init(key, data):
    init_key, run_key = jax.random.split(key)
    dim = data['x'].shape[1]
    params = {'w': 0.1 * jax.random.normal(init_key, (dim,)), 'b': jnp.zeros(())}
    return params, {}, run_key

  def sample(run_key, step, data):
    index = jax.random.randint(jax.random.fold_in(run_key, step),
                               (batch_size,), 0, data['x'].shape[0])
    return {'x': data['x'][index], 'y': data['y'][index]}

  def loss(params, model_state, batch, key):
    del key
    residual = batch['x'] @ params['w'] + params['b'] - batch['y']
    mse = jnp.mean(jnp.square(residual))
    return mse, ({'loss': mse}, model_state)

  return Objective(init=init, sample=sample, loss=loss, unit='rows')


def _experiment(seed=0):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3)).astype(np.float32)
  w = np.array([1.5, -2.0, 0.5], np.float32)
  data = {'x': x, 'y': x @ w + 0.3}

  def mse(params, model_state):
    del model_state
    residual = x @ np.asarray(params['w']) + float(params['b']) - data['y']
    return {'mse': float(np.mean(residual ** 2))}

  objective = regression(batch_size=8)
  return Experiment(
      objective=objective, optimizer=optax.sgd(0.1), train_data=data,
      learner=None, validate=mse, evaluators={'test': mse},
      initial=lambda: objective.init(jax.random.key(seed), data)[:2],
      seed=seed, info={}), (w, 0.3)


def _settings(steps):
  return ml_collections.ConfigDict(dict(
      num_steps=steps, log_every=5, eval_every=10, checkpoint_every_steps=10,
      checkpoint_every_secs=300, max_checkpoints=2))


def _final(experiment, workdir):
  state = init_state(experiment.objective, experiment.optimizer,
                     experiment.train_data, experiment.seed)
  checkpointer = Checkpointer(workdir / 'checkpoints')
  state, _ = checkpointer.restore(jax.eval_shape(lambda: state))
  checkpointer.close()
  return state


def test_the_harness_trains_an_objective_it_has_never_seen(tmp_path):
  experiment, (w, b) = _experiment()
  results = harness.train(experiment, str(tmp_path / 'run'),
                          settings=_settings(100), config_dict={'toy': 1})
  assert results['step'] == 100
  state = _final(experiment, tmp_path / 'run')
  np.testing.assert_allclose(state.params['w'], w, atol=0.05)
  np.testing.assert_allclose(state.params['b'], b, atol=0.05)
  assert results['test']['mse'] < 1e-3 < experiment.validate(
      *experiment.initial())['mse']


def test_a_killed_run_of_it_resumes_bit_identically(tmp_path, monkeypatch):
  experiment, _ = _experiment()
  harness.train(experiment, str(tmp_path / 'straight'), settings=_settings(20),
                config_dict={})
  killed_after_checkpoint(monkeypatch, 10, lambda: harness.train(
      experiment, str(tmp_path / 'killed'), settings=_settings(20),
      config_dict={}))
  harness.train(experiment, str(tmp_path / 'killed'), settings=_settings(20),
                config_dict={})
  straight = _final(experiment, tmp_path / 'straight')
  resumed = _final(experiment, tmp_path / 'killed')
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_the_step_uses_the_objectives_own_gradient_when_it_gives_one():
  experiment, _ = _experiment()
  objective = experiment.objective

  def half_gradient(params, model_state, batch, key):
    value, grads = jax.value_and_grad(objective.loss, has_aux=True)(
        params, model_state, batch, key)
    return value, jax.tree.map(lambda g: 0.5 * g, grads)

  states = []
  for variant in (objective, objective._replace(value_and_grad=half_gradient)):
    state = init_state(variant, optax.sgd(0.1), experiment.train_data, 0)
    step = jax.jit(make_train_step(variant, optax.sgd(0.1)))
    new_state, metrics = step(state, experiment.train_data)
    assert isinstance(new_state, TrainState) and 'grad_norm' in metrics
    states.append((state, new_state, float(metrics['grad_norm'])))
  (start, full, full_norm), (_, half, half_norm) = states
  np.testing.assert_allclose(
      np.asarray(half.params['w']) - np.asarray(start.params['w']),
      0.5 * (np.asarray(full.params['w']) - np.asarray(start.params['w'])),
      rtol=1e-5)
  np.testing.assert_allclose(half_norm, 0.5 * full_norm, rtol=1e-5)
