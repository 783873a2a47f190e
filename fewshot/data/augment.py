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


def random_affine(key: jax.Array, images: jax.Array, *,
                  rotation_degrees: float = 15.0,
                  scale: tuple[float, float] = (0.9, 1.1),
                  translate: float = 0.1) -> jax.Array:
  """Each image rotated, scaled and shifted at random about its centre.

  Angles are uniform in `+-rotation_degrees`, scales in `scale`, shifts in
  `+-translate` of the side; bilinear sampling, zeros outside the image.
  """
  batch, height, width, channels = images.shape
  angle_key, scale_key, shift_key = jax.random.split(key, 3)
  angles = jnp.deg2rad(jax.random.uniform(
      angle_key, (batch,), minval=-rotation_degrees, maxval=rotation_degrees))
  scales = jax.random.uniform(scale_key, (batch,), minval=scale[0],
                              maxval=scale[1])
  shifts = jax.random.uniform(shift_key, (batch, 2), minval=-translate,
                              maxval=translate) * jnp.array([[height, width]])
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32),
                            indexing='ij')
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2])

  def warp(image, angle, factor, shift):
    # Output pixel p samples the input at R(-angle) (p - c - shift) / s + c.
    y, x = rows - centre[0] - shift[0], cols - centre[1] - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source_y = (cos * y - sin * x) / factor + centre[0]
    source_x = (sin * y + cos * x) / factor + centre[1]
    sample = lambda plane: jax.scipy.ndimage.map_coordinates(
        plane, [source_y, source_x], order=1, mode='constant', cval=0.0)
    return jax.vmap(sample, in_axes=-1, out_axes=-1)(
        image.astype(jnp.float32))

  warped = jax.vmap(warp)(images, angles, scales, shifts)
  return _like(warped, images)


def random_brightness_contrast(key: jax.Array, images: jax.Array, *,
                               brightness: float = 0.4,
                               contrast: float = 0.4) -> jax.Array:
  """Each image's contrast scaled about its mean by `1 +- contrast` and its
  brightness shifted by `+- brightness` of the range (uniform draws)."""
  batch = images.shape[0]
  brightness_key, contrast_key = jax.random.split(key)
  top = 255.0 if images.dtype == jnp.uint8 else 1.0
  shift = jax.random.uniform(brightness_key, (batch, 1, 1, 1),
                             minval=-brightness, maxval=brightness) * top
  factor = jax.random.uniform(contrast_key, (batch, 1, 1, 1),
                              minval=1 - contrast, maxval=1 + contrast)
  x = images.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return _like(jnp.clip((x - mean) * factor + mean + shift, 0.0, top), images)


def random_cutout(key: jax.Array, images: jax.Array,
                  size_fraction: float = 0.5) -> jax.Array:
  """Each image with a square of side up to `size_fraction` of its height
  (uniform) set to mid-grey, centred anywhere in it (DeVries & Taylor)."""
  batch, height, width, _ = images.shape
  size_key, row_key, col_key = jax.random.split(key, 3)
  half = jax.random.uniform(size_key, (batch, 1, 1)) * size_fraction * height / 2
  row = jax.random.uniform(row_key, (batch, 1, 1)) * height
  col = jax.random.uniform(col_key, (batch, 1, 1)) * width
  rows = jnp.arange(height, dtype=jnp.float32)[None, :, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, None, :]
  inside = (jnp.abs(rows - row) < half) & (jnp.abs(cols - col) < half)
  grey = 128 if images.dtype == jnp.uint8 else 0.5
  return jnp.where(inside[..., None], jnp.asarray(grey, images.dtype), images)


def strong_augment(key: jax.Array, images: jax.Array, *,
                   flip: bool = False, rotation_degrees: float = 15.0,
                   translate: float = 0.125, brightness: float = 0.4,
                   contrast: float = 0.4, cutout: float = 0.5) -> jax.Array:
  """The strong view of self-training (a fixed-strength RandAugment stand-in).

  A random affine warp (`random_affine`), brightness and contrast
  (`random_brightness_contrast`), cutout (`random_cutout`) and, with
  `flip`, a random mirror; every draw per image.
  """
  flip_key, affine_key, colour_key, cutout_key = jax.random.split(key, 4)
  if flip:
    images = random_flip(flip_key, images)
  images = random_affine(affine_key, images, rotation_degrees=rotation_degrees,
                         translate=translate)
  images = random_brightness_contrast(colour_key, images,
                                      brightness=brightness,
                                      contrast=contrast)
  return random_cutout(cutout_key, images, cutout)


def _like(values: jax.Array, images: jax.Array) -> jax.Array:
  """Float `values` in the dtype of `images` (rounded and clipped for uint8)."""
  if images.dtype == jnp.uint8:
    return jnp.clip(jnp.round(values), 0, 255).astype(jnp.uint8)
  return values.astype(images.dtype)
