"""Labelled minibatches on the device: epochs without replacement.

`LabelledImages` holds a supervised training set as device arrays, and
`batch_indices` draws step `s`'s minibatch as a pure function of a key and
`s`, so a training step samples inside the compiled program and a resumed
run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fewshot.data.dataset import ClassDataset


@flax.struct.dataclass
class LabelledImages:
  """Images and their class labels (a pytree; a jit argument).

  Attributes:
    images: `[M, H, W, C]` uint8.
    labels: `[M]` int32 class index.
  """
  images: jax.Array
  labels: jax.Array

  @property
  def num_images(self) -> int:
    return self.images.shape[0]


@flax.struct.dataclass
class MultiLabelImages:
  """Images with several named label sets (a pytree; a jit argument).

  Attributes:
    images: `[M, H, W, C]` uint8.
    labels: `{name: [M] int32 class index or [M, D] float32 target}`.
  """
  images: jax.Array
  labels: dict[str, jax.Array]

  @property
  def num_images(self) -> int:
    return self.images.shape[0]


def labelled_images(dataset: ClassDataset) -> LabelledImages:
  """A dataset's images and labels as host (numpy) arrays.

  Place them with `jax.device_put(data, sharding)`.
  """
  return LabelledImages(images=np.asarray(dataset.images),
                        labels=np.asarray(dataset.labels))


def batch_indices(key: jax.Array, step: jax.Array, num_images: int,
                  batch_size: int) -> jax.Array:
  """`[batch_size]` image indices of `step`: epochs without replacement.

  Each epoch is a fresh permutation `permutation(fold_in(key, epoch))`; the
  `num_images % batch_size` images left over at its end are skipped.
  """
  steps_per_epoch = num_images // batch_size
  epoch, position = jnp.divmod(step, steps_per_epoch)
  order = jax.random.permutation(jax.random.fold_in(key, epoch), num_images)
  return jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))


__all__ = ['LabelledImages', 'MultiLabelImages', 'batch_indices',
           'labelled_images']
