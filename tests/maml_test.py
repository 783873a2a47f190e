"""MAML family: meta-gradients against finite differences and exact identities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fewshot import backbones
from fewshot.algorithms import anil, maml, metasgd, proto_maml, protonet
from fewshot.algorithms.maml import path_mask
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.losses import episode_loss, meta_batch_loss, query_logits

WAYS, SHOTS, QUERIES = 3, 2, 2


@functools.lru_cache(maxsize=None)
def _episodes(num_tasks=3, image_size=8):
  splits = synthetic_splits(num_classes=(6, 2, 2), images_per_class=6,
                            image_size=image_size)
  data = sampling.to_device(splits['train'])
  spec = sampling.EpisodeSpec(WAYS, SHOTS, QUERIES)
  return sampling.sample_meta_batch(jax.random.key(0), data, spec, num_tasks)


def _first(episodes):
  return jax.tree.map(lambda x: x[0], episodes)


def _backbone(norm='batch', filters=4, num_blocks=2):
  return backbones.create('conv4', filters=filters, norm=norm,
                          num_blocks=num_blocks)


@functools.partial(jax.jit, static_argnums=0)  # compiled: far faster than eager
def _loss(algorithm, params, state, episode):
  return episode_loss(algorithm, params, state, episode, jax.random.key(0))[0]


def test_meta_gradient_matches_finite_differences():
  """Second-order meta-gradient of 2 inner steps, in float64."""
  with jax.enable_x64(True):
    episode = _first(_episodes())
    episode = episode.replace(
        support_images=episode.support_images.astype(jnp.float64) / 255,
        query_images=episode.query_images.astype(jnp.float64) / 255)
    algorithm = maml(_backbone(), num_ways=WAYS, inner_steps=2,
                     inner_learning_rate=0.5)
    params, state = algorithm.init(jax.random.key(1), episode.support_images)
    # float64 numpy leaves: the shifted points and dot products below are
    # numpy arithmetic, not an eager op (and its compilation) per shape.
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    loss = lambda p: _loss(algorithm, p, state, episode)
    grads = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))
    rng = np.random.default_rng(0)
    for _ in range(3):
      direction = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
      eps = 1e-5
      shifted = lambda s: jax.tree.map(lambda p, d: p + s * d, params,
                                       direction)
      numeric = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
      analytic = sum(np.vdot(g, d) for g, d in zip(
          jax.tree.leaves(grads), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_zero_inner_steps_is_the_plain_forward_pass():
  episode = _first(_episodes())
  backbone = _backbone()
  algorithm = maml(backbone, num_ways=WAYS, inner_steps=0)
  params, state = algorithm.init(jax.random.key(1), episode.support_images)
  logits, _ = query_logits(algorithm, params, state, episode,
                           jax.random.key(0), train=True)
  features, _ = backbone.apply(params['backbone'], state,
                               episode.query_images, True)
  expected = features @ params['head']['kernel'] + params['head']['bias'][None]
  np.testing.assert_array_equal(logits, expected)


def test_one_inner_step_is_one_sgd_step_on_the_support_loss():
  episode = _first(_episodes())
  backbone = _backbone()
  algorithm = maml(backbone, num_ways=WAYS, inner_steps=1,
                   inner_learning_rate=0.3)
  params, state = algorithm.init(jax.random.key(1), episode.support_images)

  def support_loss(model_params):
    features, _ = backbone.apply(model_params['backbone'], state,
                                 episode.support_images, True)
    logits = (features @ model_params['head']['kernel'] +
              model_params['head']['bias'][None])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, episode.support_labels).mean()

  grads = jax.grad(support_loss)(params)
  expected = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
  adapted, _ = algorithm.adapt(params, state, episode, jax.random.key(0), True)
  for a, e in zip(jax.tree.leaves(adapted), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_evaluation_uses_its_own_steps_and_learning_rate():
  episode = _first(_episodes())
  backbone = _backbone()
  evaluation = maml(backbone, num_ways=WAYS, inner_steps=1,
                    inner_learning_rate=0.4, eval_inner_steps=3,
                    eval_inner_learning_rate=0.1)
  reference = maml(backbone, num_ways=WAYS, inner_steps=3,
                   inner_learning_rate=0.1)
  params, state = evaluation.init(jax.random.key(1), episode.support_images)
  adapted_eval, _ = evaluation.adapt(params, state, episode, None, False)
  adapted_ref, _ = reference.adapt(params, state, episode, None, False)
  adapted_train, _ = evaluation.adapt(params, state, episode, None, True)
  for a, b in zip(jax.tree.leaves(adapted_eval), jax.tree.leaves(adapted_ref)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(adapted_eval['head']['kernel'],
                         adapted_train['head']['kernel'])


def test_first_order_equals_the_query_gradient_at_the_adapted_parameters():
  episode = _first(_episodes())
  backbone = _backbone()
  second = maml(backbone, num_ways=WAYS, inner_steps=2, inner_learning_rate=0.5)
  first = maml(backbone, num_ways=WAYS, inner_steps=2, inner_learning_rate=0.5,
               first_order=True)
  params, state = second.init(jax.random.key(1), episode.support_images)
  grad_second = jax.grad(lambda p: _loss(second, p, state, episode))(params)
  grad_first = jax.grad(lambda p: _loss(first, p, state, episode))(params)
  adapted, _ = first.adapt(params, state, episode, None, True)

  def query_loss(task_params):
    logits, _ = first.predict(params, state, task_params, episode.query_images,
                              True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, episode.query_labels).mean()

  at_adapted = jax.grad(query_loss)(adapted)
  for a, b in zip(jax.tree.leaves(grad_first), jax.tree.leaves(at_adapted)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  difference = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(grad_first), jax.tree.leaves(grad_second)))
  assert difference > 1e-3


def test_remat_gives_the_same_meta_gradient():
  episodes = _episodes()
  backbone = _backbone()
  plain = maml(backbone, num_ways=WAYS, inner_steps=3)
  rematted = maml(backbone, num_ways=WAYS, inner_steps=3, remat=True)
  params, state = plain.init(jax.random.key(1), episodes.support_images[0])
  # Compiled (one program each): eager dispatch of the second-order scan
  # compiled some 200 small programs.
  grad = lambda alg: jax.jit(jax.grad(lambda p: meta_batch_loss(
      alg, p, state, episodes, jax.random.key(0))[0]))(params)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(rematted))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_anil_adapts_only_the_head():
  episode = _first(_episodes())
  algorithm = anil(_backbone(), num_ways=WAYS, inner_steps=3)
  params, state = algorithm.init(jax.random.key(1), episode.support_images)
  adapted, _ = algorithm.adapt(params, state, episode, None, True)
  for a, b in zip(jax.tree.leaves(adapted['backbone']),
                  jax.tree.leaves(params['backbone'])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(adapted['head']['kernel'], params['head']['kernel'])
  # The body is still trained in the outer loop.
  grads = jax.grad(lambda p: _loss(algorithm, p, state, episode))(params)
  assert all(float(jnp.abs(g).sum()) > 0
             for g in jax.tree.leaves(grads['backbone']))


def test_outer_partition_holds_parameters_outside_it():
  episode = _first(_episodes())
  algorithm = maml(_backbone(), num_ways=WAYS, outer_params=('head/.*',))
  params, state = algorithm.init(jax.random.key(1), episode.support_images)
  grads = jax.grad(lambda p: _loss(algorithm, p, state, episode))(params)
  assert all(float(jnp.abs(g).max()) == 0
             for g in jax.tree.leaves(grads['backbone']))
  assert float(jnp.abs(grads['head']['kernel']).max()) > 0


def test_metasgd_learns_per_parameter_rates():
  episode = _first(_episodes())
  algorithm = metasgd(_backbone(), num_ways=WAYS, inner_learning_rate=0.2,
                      inner_params=('head/.*', 'backbone/conv1/.*'))
  params, state = algorithm.init(jax.random.key(1), episode.support_images)
  rates = params['inner_rates']
  assert sorted(rates) == ['backbone', 'head']
  assert list(rates['backbone']) == ['conv1']
  np.testing.assert_array_equal(rates['head']['kernel'],
                                np.full_like(params['head']['kernel'], 0.2))
  grads = jax.grad(lambda p: _loss(algorithm, p, state, episode))(params)
  for g in jax.tree.leaves(grads['inner_rates']):
    assert float(jnp.abs(g).max()) > 0
  # With every rate equal, Meta-SGD's adaptation is MAML's.
  reference = maml(_backbone(), num_ways=WAYS, inner_learning_rate=0.2,
                   inner_params=('head/.*', 'backbone/conv1/.*'))
  adapted, _ = algorithm.adapt(params, state, episode, None, True)
  expected, _ = reference.adapt(
      {k: v for k, v in params.items() if k != 'inner_rates'}, state, episode,
      None, True)
  for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_proto_maml_without_steps_ranks_like_protonet():
  episode = _first(_episodes())
  backbone = _backbone()
  algorithm = proto_maml(backbone, inner_steps=0)
  reference = protonet(backbone)
  params, state = algorithm.init(jax.random.key(1), episode.support_images)
  logits, _ = query_logits(algorithm, params, state, episode, None, True)
  proto_logits, _ = query_logits(reference, params, state, episode, None, True)
  features, _ = backbone.apply(params['backbone'], state, episode.query_images,
                               True)
  # -|x - c|^2 = (2 c.x - |c|^2) - |x|^2
  np.testing.assert_allclose(
      logits - jnp.sum(features ** 2, axis=-1, keepdims=True), proto_logits,
      rtol=1e-4, atol=1e-3)


def test_vmap_over_tasks_equals_a_loop_over_tasks():
  episodes = _episodes()
  algorithm = maml(_backbone(norm='batch_running'), num_ways=WAYS,
                   inner_steps=2)
  params, state = algorithm.init(jax.random.key(1), episodes.support_images[0])
  key = jax.random.key(3)
  # Compiled: the vmapped meta-batch, and one program for a single task
  # called on each task in turn.
  (loss, (_, new_state)), grads = jax.jit(jax.value_and_grad(
      lambda p: meta_batch_loss(algorithm, p, state, episodes, key),
      has_aux=True))(params)
  one_task = jax.jit(jax.value_and_grad(
      lambda p, episode, k: episode_loss(algorithm, p, state, episode, k),
      has_aux=True))
  keys = jax.random.split(key, 3)
  losses, loop_grads, states = [], [], []
  for t in range(3):
    (task_loss, (_, task_state)), task_grads = one_task(
        params, jax.tree.map(lambda x: x[t], episodes), keys[t])
    losses.append(task_loss)
    loop_grads.append(task_grads)
    states.append(task_state)
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-6)
  mean_grads = jax.tree.map(lambda *g: sum(g) / 3, *loop_grads)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  mean_state = jax.tree.map(lambda *s: sum(s) / 3, *states)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(mean_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_path_mask_matches_full_paths():
  params = {'backbone': {'conv0': {'kernel': 1}, 'conv1': {'kernel': 2}},
            'head': {'bias': 3, 'kernel': 4}}
  mask = path_mask(params, ['head/.*', 'backbone/conv1/kernel'])
  assert mask == {'backbone': {'conv0': {'kernel': False},
                               'conv1': {'kernel': True}},
                  'head': {'bias': True, 'kernel': True}}


def test_clear_errors():
  episode = _first(_episodes())
  with pytest.raises(ValueError, match='num_ways'):
    maml(_backbone())
  with pytest.raises(ValueError, match='inner_optimizer'):
    maml(_backbone(), num_ways=WAYS, inner_optimizer='lbfgs2')
  with pytest.raises(ValueError, match="inner_params pattern 'body/.*'"):
    maml(_backbone(), num_ways=WAYS, inner_params=('body/.*',)).init(
        jax.random.key(0), episode.support_images)
  algorithm = maml(_backbone(), num_ways=WAYS + 2)
  params, state = algorithm.init(jax.random.key(0), episode.support_images)
  with pytest.raises(ValueError, match='5 ways but the episode has 3'):
    algorithm.adapt(params, state, episode, None, True)
