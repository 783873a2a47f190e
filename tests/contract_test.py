"""One contract every registered algorithm passes (ProtoNet, the MAML family, baselines)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot.algorithms import ALGORITHMS
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.losses import meta_batch_loss, query_logits

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 2

# Options that make every algorithm meta-trainable and quick on a tiny model.
OPTIONS = {
    'maml': dict(num_ways=WAYS, inner_steps=1),
    'fomaml': dict(num_ways=WAYS, inner_steps=1),
    'anil': dict(num_ways=WAYS, inner_steps=2),
    'metasgd': dict(num_ways=WAYS, inner_steps=1),
    'proto_maml': dict(inner_steps=1),
    'linear_probe': dict(freeze_backbone=False),
    'simpleshot': dict(freeze_backbone=False),
    'baseline_pp': dict(freeze_backbone=False, steps=2),
    'fine_tune': dict(steps=2, meta_gradient=True),
    'setfit': dict(steps=2, probe_steps=2, meta_gradient=True),
    # Full-context embeddings: the LSTMs get gradients too (the plain
    # attention is the special case tests/matching_relation_test.py checks).
    'matching_net': dict(fce=True),
    # The contract's backbone keeps 2x2x4 maps of its 8x8 images.
    'relation_net': dict(channels=4, relation_filters=4),
}


@functools.lru_cache(maxsize=None)
def _episodes():
  splits = synthetic_splits(num_classes=(6, 2, 2), images_per_class=6,
                            image_size=8)
  data = sampling.to_device(splits['train'])
  return sampling.sample_meta_batch(
      jax.random.key(0), data, sampling.EpisodeSpec(WAYS, SHOTS, QUERIES), TASKS)


def test_every_algorithm_has_contract_options():
  assert sorted(ALGORITHMS) == sorted(['protonet', *OPTIONS])


@pytest.mark.parametrize('name', sorted(ALGORITHMS))
def test_algorithm_contract(name):
  chex.clear_trace_counter()  # trace counts are kept per code location
  episodes = _episodes()
  backbone = backbones.create('conv4', filters=4, num_blocks=2, norm='batch')
  algorithm = ALGORITHMS[name](backbone, **OPTIONS.get(name, {}))
  params, state = algorithm.init(jax.random.key(1), episodes.support_images[0])

  episode = jax.tree.map(lambda x: x[0], episodes)
  logits, _ = query_logits(algorithm, params, state, episode,
                           jax.random.key(2), train=False)
  chex.assert_shape(logits, (WAYS * QUERIES, WAYS))
  assert np.all(np.isfinite(logits))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, episodes, key):
    return jax.value_and_grad(
        functools.partial(meta_batch_loss, algorithm), has_aux=True)(
            params, state, episodes, key)

  for seed in range(2):
    (loss, (metrics, _)), grads = step(params, state, episodes,
                                       jax.random.key(seed))
  assert np.isfinite(loss) and 0.0 <= metrics['accuracy'] <= 1.0
  grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2)
                                 for g in jax.tree.leaves(grads))))
  assert np.isfinite(grad_norm) and grad_norm > 0, grad_norm
