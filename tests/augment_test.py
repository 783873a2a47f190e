"""In-step image augmentation: flips, crops and episode augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot.data import augment
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits


def _images(shape=(3, 8, 10, 2)):
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, shape),
                     jnp.uint8)


def test_flip_is_an_involution_and_mirrors_columns():
  images = _images()
  flipped = augment.flip_horizontal(images)
  np.testing.assert_array_equal(augment.flip_horizontal(flipped), images)
  np.testing.assert_array_equal(flipped[:, :, 0], images[:, :, -1])
  # random_flip mirrors some images and leaves the others unchanged.
  out = augment.random_flip(jax.random.key(0), _images((32, 4, 4, 1)))
  same = [np.array_equal(o, i) for o, i in zip(out, _images((32, 4, 4, 1)))]
  assert 0 < sum(same) < 32


def test_crop_keeps_shape_and_dtype_and_is_a_shifted_window():
  images = _images()
  out = augment.random_crop(jax.random.key(1), images, padding=2)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for o, p in zip(np.asarray(out), padded):
    windows = [(i, j) for i in range(5) for j in range(5)
               if np.array_equal(p[i:i + 8, j:j + 10], o)]
    assert windows, 'the crop is not a window of the zero-padded image'


@pytest.mark.parametrize('pad_mode', ['edge', 'reflect'])
def test_crop_of_a_constant_image_is_constant(pad_mode):
  images = jnp.full((4, 6, 6, 3), 77, jnp.uint8)
  out = augment.random_crop(jax.random.key(2), images, 3, pad_mode)
  np.testing.assert_array_equal(out, images)
  # Zero padding moves black borders in (for some offset among 4 images).
  zero = augment.random_crop(jax.random.key(2), images, 3)
  assert set(np.unique(zero)) <= {0, 77} and (np.asarray(zero) == 0).any()
  # Padding 0 is the identity.
  np.testing.assert_array_equal(
      augment.random_crop(jax.random.key(2), _images(), 0), _images())


def test_augmentation_is_deterministic_for_a_key():
  images = _images((16, 8, 8, 3))
  run = jax.jit(lambda k, x: augment.crop_and_flip(k, x, crop_padding=2,
                                                   flip=True))
  a, b = run(jax.random.key(5), images), run(jax.random.key(5), images)
  c = run(jax.random.key(6), images)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_augmented_episodes_are_shifted_copies():
  data = sampling.to_device(synthetic_splits(
      num_classes=(12, 5, 5), images_per_class=8)['train'])
  episodes = sampling.sample_meta_batch(
      jax.random.key(0), data, sampling.EpisodeSpec(5, 2, 2), 2)
  key = jax.random.key(1)
  augmented = augment.augment_episodes(key, episodes, crop_padding=2,
                                     pad_mode='edge')
  np.testing.assert_array_equal(augmented.support_labels,
                                episodes.support_labels)
  again = augment.augment_episodes(key, episodes, crop_padding=2,
                                 pad_mode='edge')
  np.testing.assert_array_equal(again.query_images, augmented.query_images)
  shifted = 0
  for before, after in [(episodes.support_images, augmented.support_images),
                        (episodes.query_images, augmented.query_images)]:
    before = np.asarray(before).reshape((-1,) + before.shape[-3:])
    after = np.asarray(after).reshape(before.shape)
    height, width = before.shape[1:3]
    for original, image in zip(before, after):
      padded = np.pad(original, ((2, 2), (2, 2), (0, 0)), mode='edge')
      offsets = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[dy:dy + height, dx:dx + width],
                                   image)]
      assert offsets, 'an augmented image is not a shifted copy'
      shifted += (2, 2) not in offsets
  assert shifted > 0  # not the identity
