"""Both backend paths (`fewshot.ops.paths`) run here and give the same values.

On a CPU the library takes its XLA:CPU-tuned implementations; GPU/TPU take
plain lax and the mean-loss gradient. Forcing the accelerator path on this
CPU exercises the code a GPU would run, on every CI run: whole training
steps and gradients, not only the ops one by one (tests/ops_test.py).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones, losses
from fewshot.algorithms import maml, protonet
from fewshot.backbones import efficientnet_lite
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.multitask.gradients import task_gradients
from fewshot.objectives import episodic, init_state, make_train_step
from fewshot.ops import conv as conv_lib
from fewshot.ops import paths
from fewshot.optimizers import make_optimizer

PATHS = ('cpu', 'accelerator')


def _traced_under(which: str, fn, *args):
  """`fn(*args)` jitted and traced under `force_paths(which)`; a fresh
  wrapper each time, so no trace is shared between the paths."""
  with paths.force_paths(which):
    return jax.jit(lambda *a: fn(*a))(*args)


def test_selection_default_forced_env_and_errors(monkeypatch):
  monkeypatch.delenv(paths.ENV_VAR, raising=False)
  assert paths.selected_paths() == (
      'cpu' if jax.default_backend() == 'cpu' else 'accelerator')
  with paths.force_paths('accelerator'):
    assert not paths.cpu_paths()
    with paths.force_paths('cpu'):
      assert paths.cpu_paths()
    assert not paths.cpu_paths()
  monkeypatch.setenv(paths.ENV_VAR, 'accelerator')
  assert paths.selected_paths() == 'accelerator'
  with paths.force_paths('cpu'):  # the context wins over the environment
    assert paths.cpu_paths()
  monkeypatch.setenv(paths.ENV_VAR, 'gpu')
  with pytest.raises(ValueError, match=r"\$FEWSHOT_PATHS must be one of"):
    paths.selected_paths()
  with pytest.raises(ValueError, match="paths must be one of"):
    with paths.force_paths('tpu'):
      pass


def test_the_forced_path_is_the_one_traced():
  # The accelerator path is plain lax: no custom_vjp in the jaxpr.
  x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
  jaxprs = {}
  for which in PATHS:
    with paths.force_paths(which):  # a new function each: traces are cached
      jaxprs[which] = str(jax.make_jaxpr(lambda x, k: conv_lib.conv2d(x, k))(
          x, k))
  assert 'custom_vjp' in jaxprs['cpu']
  assert 'custom_vjp' not in jaxprs['accelerator']
  assert 'conv_general_dilated' in jaxprs['accelerator']


@functools.lru_cache(maxsize=None)
def _data():
  splits = synthetic_splits(num_classes=(8, 2, 2), images_per_class=4,
                            image_size=12)
  return sampling.to_device(splits['train'])


def _train_step_results(objective):
  optimizer = make_optimizer(learning_rate=1e-2)
  data = _data()
  results = {}
  for which in PATHS:
    state = init_state(objective, optimizer, data, 0)
    with paths.force_paths(which):
      step = jax.jit(make_train_step(objective, optimizer))
      new_state, metrics = step(state, data)
    results[which] = (new_state, metrics)
  return results


def _assert_same_step(results, rtol):
  (cpu_state, cpu_metrics), (acc_state, acc_metrics) = (
      results['cpu'], results['accelerator'])
  np.testing.assert_allclose(cpu_metrics['loss'], acc_metrics['loss'],
                             rtol=rtol)
  np.testing.assert_allclose(cpu_metrics['grad_norm'],
                             acc_metrics['grad_norm'], rtol=rtol)
  assert float(cpu_metrics['grad_norm']) > 0
  chex.assert_trees_all_close(cpu_state.params, acc_state.params, rtol=rtol,
                              atol=1e-6)
  chex.assert_trees_all_close(cpu_state.model_state, acc_state.model_state,
                              rtol=rtol, atol=1e-6)


def test_protonet_training_step_is_the_same_on_both_paths():
  algorithm = protonet(backbones.create('conv4', filters=8, num_blocks=2,
                                        norm='batch_running'))
  objective = episodic(algorithm, ways=3, shots=1, queries=2)
  # Different conv algorithms: gradients agree to ~4e-5 relative.
  _assert_same_step(_train_step_results(objective), rtol=1e-4)


def test_second_order_maml_step_is_the_same_on_both_paths():
  # Two tasks: the CPU path runs the per-task kernels as unrolled convs and
  # averages per-task meta-gradients by a dot; the accelerator path is
  # lax's grouped conv under vmap and the mean loss's gradient.
  algorithm = maml(backbones.create('conv4', filters=8, num_blocks=2,
                                    norm='batch'),
                   num_ways=3, inner_steps=2, inner_learning_rate=0.3)
  objective = episodic(algorithm, ways=3, shots=1, queries=2,
                       meta_batch_size=2)
  _assert_same_step(_train_step_results(objective), rtol=1e-4)


def test_meta_gradient_default_follows_the_paths(monkeypatch):
  # Without `per_task`, the CPU path averages per-task meta-gradients
  # (`_mean_over_tasks`), the accelerator path differentiates the mean loss.
  splits = synthetic_splits(num_classes=(6, 2, 2), images_per_class=3,
                            image_size=8)
  data = sampling.to_device(splits['train'])
  episodes = sampling.sample_meta_batch(jax.random.key(0), data,
                                        sampling.EpisodeSpec(2, 1, 1), 2)
  algorithm = protonet(backbones.create('conv4', filters=4, num_blocks=1))
  params, state = algorithm.init(jax.random.key(1),
                                 episodes.support_images[0])
  calls = []
  mean_over_tasks = losses._mean_over_tasks  # pylint: disable=protected-access
  monkeypatch.setattr(losses, '_mean_over_tasks',
                      lambda tree: calls.append(1) or mean_over_tasks(tree))
  fn = functools.partial(losses.meta_batch_value_and_grad, algorithm)
  traced = {}
  for which in PATHS:
    calls.clear()
    with paths.force_paths(which):
      jax.make_jaxpr(fn)(params, state, episodes, jax.random.key(2))
    traced[which] = len(calls)
  assert traced == {'cpu': 1, 'accelerator': 0}


def test_efficientnet_blocks_forward_and_gradient_on_both_paths():
  # EfficientNet-Lite's MBConv blocks (1x1 convs and depthwise kxk at
  # strides 2 and 1, BatchNorm in training mode): shifted sums on the CPU
  # path, lax's grouped conv on the accelerator path.
  blocks = [efficientnet_lite.MBConvBlock(8, 16, 3, 2, 6),
            efficientnet_lite.MBConvBlock(16, 16, 5, 1, 6)]
  images = jax.random.uniform(jax.random.key(0), (2, 12, 12, 8))
  variables = [jax.jit(block.init)(jax.random.key(i), x) for i, (block, x)
               in enumerate(zip(blocks, (images, jnp.ones((2, 6, 6, 16)))))]
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]

  def loss(params, images):
    x = images
    for block, p, s in zip(blocks, params, stats):
      x, _ = block.apply({'params': p, 'batch_stats': s}, x, train=True,
                         mutable=['batch_stats'])
    return jnp.sum(jnp.sin(x)), x

  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (cpu_loss, cpu_out), cpu_grads = _traced_under(
      'cpu', value_and_grad, params, images)
  (acc_loss, acc_out), acc_grads = _traced_under(
      'accelerator', value_and_grad, params, images)
  assert cpu_out.shape == (2, 6, 6, 16)
  np.testing.assert_allclose(cpu_out, acc_out, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(cpu_loss, acc_loss, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(cpu_grads, acc_grads, rtol=1e-3, atol=1e-5)
  assert float(jnp.abs(cpu_grads[1]).max()) > 0


def test_multitask_task_gradients_on_both_paths():
  # T pullbacks (CPU) against one vmapped pullback (accelerator).
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
  images = jax.random.normal(jax.random.key(1), (3, 6, 6, 2))
  targets = jnp.array([1.0, -2.0, 0.5])

  def losses_fn(kernel):
    features = conv_lib.conv2d(images, kernel).mean(axis=(1, 2, 3))
    return (features - targets) ** 2, ()

  def gradients(kernel):
    return task_gradients(losses_fn, kernel)[1]

  cpu = _traced_under('cpu', gradients, kernel)
  accelerator = _traced_under('accelerator', gradients, kernel)
  assert cpu.shape == (3, 3, 3, 2, 4)
  np.testing.assert_allclose(cpu, accelerator, rtol=1e-5, atol=1e-6)
  for t in range(3):  # row t is the gradient of loss t alone
    np.testing.assert_allclose(
        cpu[t], jax.grad(lambda k, t=t: losses_fn(k)[0][t])(kernel),
        rtol=1e-5, atol=1e-6)
