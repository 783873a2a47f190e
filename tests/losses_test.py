"""The generic loss, its meta-batch version and both of its gradient paths."""

import functools

import chex
import jax
import numpy as np
import pytest

from fewshot import backbones, losses
from fewshot.algorithms import maml, protonet
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits


@functools.lru_cache(maxsize=None)
def _episodes():
  """Three 3-way 1-shot tasks of small generated images (shared)."""
  splits = synthetic_splits(num_classes=(10, 2, 2), images_per_class=5,
                            image_size=12)
  data = sampling.to_device(splits['train'])
  spec = sampling.EpisodeSpec(3, 1, 2)
  return sampling.sample_meta_batch(jax.random.key(0), data, spec, 3)


def _backbone(norm):
  # Two conv blocks: compiling a second-order program costs about as much
  # per block, and none of these identities depends on the depth.
  return backbones.create('conv4', filters=8, norm=norm, num_blocks=2)


def test_meta_batch_loss_is_the_mean_of_episode_losses():
  episodes = _episodes()
  algorithm = protonet(_backbone('batch'))
  params, state = algorithm.init(jax.random.key(1), episodes.support_images[0])
  key = jax.random.key(5)
  # Compiled: eager op-by-op dispatch of the vmapped custom ops is slow.
  meta_batch_loss = jax.jit(losses.meta_batch_loss, static_argnums=0)
  episode_loss = jax.jit(losses.episode_loss, static_argnums=0)
  loss, (metrics, _) = meta_batch_loss(algorithm, params, state, episodes, key)
  keys = jax.random.split(key, 3)
  singles = [episode_loss(
      algorithm, params, state, jax.tree.map(lambda x, t=t: x[t], episodes),
      keys[t])[0] for t in range(3)]
  np.testing.assert_allclose(loss, np.mean(singles), rtol=1e-5)
  assert 0 <= float(metrics['accuracy']) <= 1
  grads = jax.jit(jax.grad(lambda p: losses.meta_batch_loss(
      algorithm, p, state, episodes, key)[0]))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


@pytest.fixture(scope='module')
def maml_meta_batch():
  """MAML (second order) with running BatchNorm statistics on an odd number
  of tasks, and jax.value_and_grad of its averaged loss (the reference)."""
  episodes = _episodes()
  algorithm = maml(_backbone('batch_running'), num_ways=3, inner_steps=2,
                   inner_learning_rate=0.3)
  params, state = algorithm.init(jax.random.key(1), episodes.support_images[0])
  key = jax.random.key(5)
  reference = jax.jit(jax.value_and_grad(
      lambda p: losses.meta_batch_loss(algorithm, p, state, episodes, key),
      has_aux=True))(params)
  return algorithm, params, state, episodes, key, reference


@pytest.mark.parametrize('per_task', [True, False])
def test_meta_batch_value_and_grad_equals_grad_of_meta_batch_loss(
    per_task, maml_meta_batch):
  # The per-task meta-gradients averaged by a dot (per_task=True, the CPU
  # default) and the mean loss's gradient (False, the default elsewhere)
  # must each equal jax.grad of the averaged loss, whatever the backend,
  # and the new states agree.
  algorithm, params, state, episodes, key, reference = maml_meta_batch
  (loss, (metrics, new_state)), grads = jax.jit(functools.partial(
      losses.meta_batch_value_and_grad, algorithm, per_task=per_task))(
          params, state, episodes, key)
  (ref_loss, (ref_metrics, ref_state)), ref_grads = reference
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['accuracy'], ref_metrics['accuracy'])
  assert jax.tree.leaves(new_state)  # running statistics exist and moved
  chex.assert_trees_all_close(new_state, ref_state, rtol=1e-6)
  assert not np.allclose(jax.tree.leaves(new_state)[0],
                         jax.tree.leaves(state)[0])
  # Second order through batch statistics: rounding differs by ~5e-7 on
  # gradients of ~0.3 (summation order).
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=2e-6)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
