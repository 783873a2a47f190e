"""Batch image augmentation written in JAX, for use inside a compiled step.

Every function takes images `[B, H, W, C]` (any dtype; uint8 stays uint8)
and a PRNG key, draws independent choices per image, and returns images of
the same shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fewshot.episodes import Episode

PAD_MODES = ('constant', 'edge', 'reflect')


def flip_horizontal(images: jax.Array) -> jax.Array:
  """Mirrors `[B, H, W, C]` images left-right (an involution)."""
  return images[:, :, ::-1, :]


def random_flip(key: jax.Array, images: jax.Array,
                probability: float = 0.5) -> jax.Array:
  """Mirrors each image left-right with `probability`."""
  flip_B = jax.random.bernoulli(key, probability, (images.shape[0],))
  return jnp.where(flip_B[:, None, None, None], flip_horizontal(images),
                   images)


def random_crop(key: jax.Array, images: jax.Array, padding: int,
                pad_mode: str = 'constant') -> jax.Array:
  """Pads each side by `padding` pixels, then crops a random `H x W` window.

  `pad_mode` 'constant' fills with zeros (torchvision's `RandomCrop(size,
  padding)`), 'edge' repeats the border pixel, 'reflect' mirrors without
  repeating it. Each window offset is uniform in `[0, 2 * padding]`.
  """
  if pad_mode not in PAD_MODES:
    raise ValueError(f'pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.')
  if padding < 0:
    raise ValueError(f'padding must be >= 0, got {padding}.')
  if padding == 0:
    return images
  batch, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                            (0, 0)), mode=pad_mode)
  offsets_Bx2 = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, channels))

  return jax.vmap(crop)(padded, offsets_Bx2)


def crop_and_flip(key: jax.Array, images: jax.Array, *, crop_padding: int = 0,
                  pad_mode: str = 'constant', flip: bool = False) -> jax.Array:
  """The standard natural-image training augmentation: pad-and-crop, then flip.

  Args:
    key: PRNG key; the same key gives the same augmentation.
    images: `[B, H, W, C]`.
    crop_padding: pixels of padding per side for `random_crop` (0: no crop).
    pad_mode: see `random_crop`.
    flip: mirror half of the images left-right.

  Returns:
    `[B, H, W, C]` augmented images, same dtype.
  """
  crop_key, flip_key = jax.random.split(key)
  images = random_crop(crop_key, images, crop_padding, pad_mode)
  if flip:
    images = random_flip(flip_key, images)
  return images


def augment_episodes(key: jax.Array, episodes: Episode,
                     **options: Any) -> Episode:
  """Applies `crop_and_flip(**options)` to every support and query image.

  Each image draws its own crop offset and flip; shapes and labels are
  unchanged, so `episodes` may be one episode or a meta-batch `[T, ...]`.
  """
  if not options:
    return episodes
  support_key, query_key = jax.random.split(key)

  def augment(key, images):
    flat = images.reshape((-1,) + images.shape[-3:])
    return crop_and_flip(key, flat, **options).reshape(images.shape)

  return episodes.replace(
      support_images=augment(support_key, episodes.support_images),
      query_images=augment(query_key, episodes.query_images))


def rotate_quarter_turns(images: jax.Array, turns: jax.Array) -> jax.Array:
  """Each `[B, H, W, C]` image rotated by `turns[b]` * 90 degrees (H == W).

  Counter-clockwise, as `jnp.rot90`; `turns` is `[B]` int in 0..3.
  """
  if images.shape[1] != images.shape[2]:
    raise ValueError(f'Quarter-turn rotation needs square images, got '
                     f'{images.shape[1]}x{images.shape[2]}.')
  rotations = jnp.stack([jnp.rot90(images, k, axes=(1, 2))
                         for k in range(4)])              # [4, B, H, W, C]
  return rotations[turns, jnp.arange(images.shape[0])]
