"""Episode sampler invariants."""

import jax
import numpy as np
import pytest

from fewshot.data import sampling
from fewshot.data.dataset import ClassDataset


def _dataset(num_classes=12, counts=None, size=4):
  counts = counts or [6 + (c % 3) for c in range(num_classes)]
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
  labels = labels[np.random.default_rng(0).permutation(len(labels))]
  # Every image encodes its own index, so we can trace it back.
  images = np.zeros((len(labels), size, size, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256
  images[:, 0, 1, 0] = np.arange(len(labels)) // 256
  return ClassDataset(images, labels,
                      tuple(f'c{i}' for i in range(num_classes)))


def _indices(images):
  images = np.asarray(images)
  return images[..., 0, 0, 0].astype(int) + 256 * images[..., 0, 1, 0].astype(int)


@pytest.mark.parametrize('ways,shots,queries', [(5, 1, 3), (12, 2, 4), (3, 5, 1)])
def test_episode_invariants(ways, shots, queries):
  ds = _dataset()
  data = sampling.to_device(ds)
  spec = sampling.EpisodeSpec(ways, shots, queries)
  sample = jax.jit(sampling.sample_episode, static_argnums=2)
  for seed in range(5):
    ep = sample(jax.random.key(seed), data, spec)
    support, query = _indices(ep.support_images), _indices(ep.query_images)
    class_ids = np.asarray(ep.class_ids)
    assert len(set(class_ids)) == ways
    assert ep.support_images.shape == (ways * shots, 4, 4, 1)
    assert ep.query_images.shape == (ways * queries, 4, 4, 1)
    # Support and query are disjoint, and no image repeats.
    assert len(set(support) | set(query)) == ways * (shots + queries)
    # Labels are in range, exactly balanced, and name the right class.
    for images, labels, per in ((support, ep.support_labels, shots),
                                (query, ep.query_labels, queries)):
      labels = np.asarray(labels)
      assert labels.min() >= 0 and labels.max() < ways
      np.testing.assert_array_equal(np.bincount(labels, minlength=ways),
                                    np.full(ways, per))
      np.testing.assert_array_equal(ds.labels[images], class_ids[labels])


def test_same_key_same_episode_and_keys_differ():
  data = sampling.to_device(_dataset())
  spec = sampling.EpisodeSpec(5, 1, 2)
  a = sampling.sample_episode(jax.random.key(3), data, spec)
  b = sampling.sample_episode(jax.random.key(3), data, spec)
  c = sampling.sample_episode(jax.random.key(4), data, spec)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(_indices(a.query_images), _indices(c.query_images))


def test_every_image_of_a_class_can_be_drawn():
  # A class with exactly K+Q images yields all of them: padding never leaks.
  ds = _dataset(num_classes=4, counts=[3, 3, 3, 3])
  data = sampling.to_device(ds)
  ep = sampling.sample_episode(jax.random.key(0), data,
                               sampling.EpisodeSpec(4, 1, 2))
  drawn = set(_indices(ep.support_images)) | set(_indices(ep.query_images))
  assert drawn == set(range(12))


def test_meta_batch_has_task_axis():
  data = sampling.to_device(_dataset())
  episodes = sampling.sample_meta_batch(jax.random.key(0), data,
                                        sampling.EpisodeSpec(5, 1, 2), 3)
  assert episodes.support_images.shape[:2] == (3, 5)
  assert episodes.num_tasks == 3
  assert not np.array_equal(episodes.class_ids[0], episodes.class_ids[1])


def test_clear_errors_for_impossible_episodes():
  ds = _dataset(num_classes=12)
  with pytest.raises(ValueError, match='20-way.*only 12 classes'):
    sampling.check_spec(sampling.EpisodeSpec(20, 1, 1), ds.class_counts())
  ds = _dataset(num_classes=4, counts=[8, 3, 8, 8])
  with pytest.raises(ValueError, match="5 shots.*class 'c1'.*only 3 images"):
    sampling.check_spec(sampling.EpisodeSpec(2, 5, 1), ds.class_counts(),
                        ds.class_names)
  with pytest.raises(ValueError, match='num_shots must be >= 1'):
    sampling.EpisodeSpec(5, 0, 1)


def test_host_sampler_is_deterministic_and_valid():
  ds = _dataset()
  sampler = sampling.HostSampler(ds, sampling.EpisodeSpec(4, 2, 3), seed=1)
  a, b = sampler.episode(7), sampler.episode(7)
  np.testing.assert_array_equal(a.query_images, b.query_images)
  support, query = _indices(a.support_images), _indices(a.query_images)
  assert not set(support) & set(query)
  np.testing.assert_array_equal(ds.labels[query],
                                a.class_ids[a.query_labels])
