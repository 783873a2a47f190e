"""Colour jitter for natural images (brightness, contrast, saturation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ITU-R 601 luma weights, as torchvision's and PIL's grayscale conversion.
_LUMA = (0.299, 0.587, 0.114)


def _grayscale(images_BxHxWxC: jax.Array) -> jax.Array:
  """`[B, H, W, 1]` luma of RGB images; single-channel images pass through."""
  if images_BxHxWxC.shape[-1] == 1:
    return images_BxHxWxC
  weights = jnp.asarray(_LUMA, images_BxHxWxC.dtype).reshape(1, 1, 1, 3)
  return jnp.sum(images_BxHxWxC * weights, axis=-1, keepdims=True)


def _factors(key: jax.Array, strength: float, batch: int) -> jax.Array:
  """`[B, 1, 1, 1]` factors uniform in `[max(0, 1 - s), 1 + s]`."""
  low = max(0.0, 1.0 - strength)
  return jax.random.uniform(key, (batch, 1, 1, 1), minval=low,
                            maxval=1.0 + strength)


def color_jitter(key: jax.Array, images: jax.Array, *,
                 brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4) -> jax.Array:
  """Randomly perturbs each image's brightness, contrast and saturation.

  Each image draws its own factors `f ~ U[max(0, 1-s), 1+s]` and the three
  adjustments are applied in that fixed order, each clipped to the valid
  range: brightness scales the pixels (`f * x`), contrast blends with the
  image's mean luma (`f * x + (1-f) * mean`), saturation blends with the
  pixel's luma (`f * x + (1-f) * gray`; a no-op on one-channel images).
  The result depends only on `key` and the images. A strength of 0 leaves
  that property unchanged.

  Args:
    key: PRNG key.
    images: `[B, H, W, C]` (or one `[H, W, C]` image), uint8 in 0..255 or
      float in [0, 1].
    brightness, contrast, saturation: jitter strengths `s`.

  Returns:
    Images of the input's shape and dtype (uint8 is rounded).
  """
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4:
    raise ValueError(f'color_jitter expects [B, H, W, C] or [H, W, C] '
                     f'images, got {images.shape}.')
  dtype = images.dtype
  top = 255.0 if dtype == jnp.uint8 else 1.0
  x = images.astype(jnp.float32)
  batch = x.shape[0]
  brightness_key, contrast_key, saturation_key = jax.random.split(key, 3)
  if brightness:
    x = jnp.clip(x * _factors(brightness_key, brightness, batch), 0.0, top)
  if contrast:
    mean = jnp.mean(_grayscale(x), axis=(1, 2, 3), keepdims=True)
    f = _factors(contrast_key, contrast, batch)
    x = jnp.clip(f * x + (1.0 - f) * mean, 0.0, top)
  if saturation:
    f = _factors(saturation_key, saturation, batch)
    x = jnp.clip(f * x + (1.0 - f) * _grayscale(x), 0.0, top)
  if dtype == jnp.uint8:
    x = jnp.round(x).astype(jnp.uint8)
  else:
    x = x.astype(dtype)
  return x[0] if single else x
