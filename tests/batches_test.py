"""Epoch minibatches drawn on the device."""

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.data import batches


def test_batch_indices_cover_an_epoch_without_repeats():
  key = jax.random.key(0)
  epoch = np.concatenate([batches.batch_indices(key, jnp.int32(s), 50, 10)
                          for s in range(5)])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(50))
  next_epoch = batches.batch_indices(key, jnp.int32(5), 50, 10)
  assert not np.array_equal(next_epoch, epoch[:10])
  # 53 images in batches of 10: each epoch skips 3 images, never repeats.
  epoch = np.concatenate([batches.batch_indices(key, jnp.int32(s), 53, 10)
                          for s in range(5)])
  assert len(set(epoch.tolist())) == 50
