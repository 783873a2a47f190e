"""Episode sampling as a pure function of a PRNG key.

`DeviceDataset` holds a class-grouped dataset as device arrays, so that
episodes are drawn inside a compiled training step with no host round trip.
`sample_episode` is written for one episode; `sample_meta_batch` vmaps it.
`HostSampler` draws the same kind of episode with numpy for datasets too large
to place on the device.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fewshot.data.dataset import ClassDataset
from fewshot.episodes import Episode, episode_labels


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  """The shape of an N-way K-shot episode with Q queries per class."""
  num_ways: int
  num_shots: int
  num_queries: int

  def __post_init__(self):
    for name in ('num_ways', 'num_shots', 'num_queries'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}.')


@flax.struct.dataclass
class DeviceDataset:
  """A class-grouped dataset as arrays (a pytree, so it can be a jit argument).

  `to_device` places it on a device; `index_by_class` keeps it on the host
  for the caller to place (replicated over a mesh, say).

  Attributes:
    images: `[M, H, W, C]` uint8.
    class_index: `[num_classes, P]` int32; row c lists the indices into
      `images` of class c, padded with 0 beyond `class_counts[c]`.
    class_counts: `[num_classes]` int32 images per class.
  """
  images: jax.Array
  class_index: jax.Array
  class_counts: jax.Array

  @property
  def num_classes(self) -> int:
    return self.class_index.shape[0]


def to_device(dataset: ClassDataset, device=None) -> DeviceDataset:
  """Builds the per-class index and places the dataset's arrays on a device."""
  return jax.device_put(index_by_class(dataset), device)


def index_by_class(dataset: ClassDataset) -> DeviceDataset:
  """The `DeviceDataset` of `dataset` as host (numpy) arrays.

  Place it with `jax.device_put(data, sharding)`, e.g. replicated over a
  mesh, without a first copy on the default device.
  """
  counts = dataset.class_counts()
  if (counts == 0).any():
    raise ValueError(f'Class {dataset.class_names[int(np.argmin(counts))]!r} '
                     'has no images.')
  order = np.argsort(dataset.labels, kind='stable')
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  width = int(counts.max())
  position = np.arange(width)[None, :]
  gather = np.minimum(starts[:, None] + position, len(order) - 1)
  index = np.where(position < counts[:, None], order[gather], 0)
  return DeviceDataset(images=np.asarray(dataset.images),
                       class_index=index.astype(np.int32),
                       class_counts=counts.astype(np.int32))


def check_spec(spec: EpisodeSpec, class_counts: np.ndarray,
               class_names=None, split: str = 'dataset') -> None:
  """Raises a clear error if `spec` cannot be drawn from these classes."""
  class_counts = np.asarray(class_counts)
  num_classes = len(class_counts)
  if spec.num_ways > num_classes:
    raise ValueError(f'Asked for {spec.num_ways}-way episodes but the {split} '
                     f'has only {num_classes} classes.')
  needed = spec.num_shots + spec.num_queries
  # Episodes pick any classes, so every class must hold K + Q images.
  smallest = int(np.argmin(class_counts))
  if class_counts[smallest] < needed:
    name = class_names[smallest] if class_names is not None else smallest
    raise ValueError(
        f'Asked for {spec.num_shots} shots + {spec.num_queries} queries = '
        f'{needed} images per class, but class {name!r} of the {split} has '
        f'only {class_counts[smallest]} images.')


def _draw_classes_and_images(key: jax.Array, data: DeviceDataset,
                             num_drawn: int, per_class: int
                             ) -> tuple[jax.Array, jax.Array]:
  """`num_drawn` distinct classes and `per_class` distinct images of each.

  Returns `class_ids [N]` and indices into `data.images` `[N, per_class]`.
  """
  class_key, image_key = jax.random.split(key)
  class_ids = jax.random.choice(class_key, data.num_classes, (num_drawn,),
                                replace=False).astype(jnp.int32)
  counts = data.class_counts[class_ids]                       # [N]
  width = data.class_index.shape[1]
  # A random permutation of each class's valid positions: sort random keys,
  # pushing padding positions to the end.
  scores = jax.random.uniform(image_key, (num_drawn, width))
  scores = jnp.where(jnp.arange(width)[None, :] < counts[:, None], scores, 2.)
  _, positions = jax.lax.top_k(-scores, per_class)            # [N, per_class]
  chosen = jnp.take_along_axis(data.class_index[class_ids], positions, axis=1)
  return class_ids, chosen


def sample_episode(key: jax.Array, data: DeviceDataset,
                   spec: EpisodeSpec) -> Episode:
  """Draws one episode: N distinct classes, K + Q distinct images of each.

  Pure and jit-able. `check_spec` must have passed for `data`: inside a
  compiled program shapes cannot be validated.

  Returns:
    An `Episode` with support `[N*K, H, W, C]` and query `[N*Q, H, W, C]`
    images (uint8), in class-major order.
  """
  n, k, q = spec.num_ways, spec.num_shots, spec.num_queries
  class_ids, chosen = _draw_classes_and_images(key, data, n, k + q)
  support_index = chosen[:, :k].reshape(-1)
  query_index = chosen[:, k:].reshape(-1)
  return Episode(
      support_images=data.images[support_index],
      support_labels=episode_labels(n, k),
      query_images=data.images[query_index],
      query_labels=episode_labels(n, q),
      class_ids=class_ids,
      num_ways=n)


def check_class_balanced(classes_per_batch: int, images_per_class: int,
                         class_counts: np.ndarray, class_names=None,
                         split: str = 'dataset') -> None:
  """Raises a clear error if P x K batches cannot be drawn from these classes."""
  class_counts = np.asarray(class_counts)
  for name, value in (('classes_per_batch', classes_per_batch),
                      ('images_per_class', images_per_class)):
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}.')
  if classes_per_batch > len(class_counts):
    raise ValueError(f'classes_per_batch={classes_per_batch} (P) exceeds the '
                     f'{len(class_counts)} classes of the {split}.')
  smallest = int(np.argmin(class_counts))
  if class_counts[smallest] < images_per_class:
    name = class_names[smallest] if class_names is not None else smallest
    raise ValueError(
        f'images_per_class={images_per_class} (K) exceeds the '
        f'{class_counts[smallest]} images of class {name!r} of the {split}.')


def sample_class_balanced(key: jax.Array, data: DeviceDataset,
                          classes_per_batch: int, images_per_class: int
                          ) -> tuple[jax.Array, jax.Array]:
  """A P x K batch: P distinct classes, K distinct images of each.

  The device-side analogue of pytorch-metric-learning's `MPerClassSampler`;
  pure and jit-able (`check_class_balanced` first).

  Returns:
    `images [P*K, H, W, C]` (class-major) and their dataset class ids
    `labels [P*K]` int32.
  """
  class_ids, chosen = _draw_classes_and_images(key, data, classes_per_batch,
                                               images_per_class)
  labels = jnp.repeat(class_ids, images_per_class)
  return data.images[chosen.reshape(-1)], labels


def sample_meta_batch(key: jax.Array, data: DeviceDataset, spec: EpisodeSpec,
                      num_tasks: int) -> Episode:
  """`num_tasks` independent episodes stacked on a leading `T` axis."""
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(sample_episode, in_axes=(0, None, None))(keys, data, spec)


class HostSampler:
  """Numpy episode sampler for datasets that do not fit on the device.

  Deterministic in `(seed, step)`, like the device sampler, so a resumed run
  draws the same episodes. (The random streams differ from `sample_episode`.)
  """

  def __init__(self, dataset: ClassDataset, spec: EpisodeSpec, seed: int):
    check_spec(spec, dataset.class_counts(), dataset.class_names)
    self._dataset = dataset
    self._spec = spec
    self._seed = seed
    self._by_class = [np.flatnonzero(dataset.labels == c)
                      for c in range(dataset.num_classes)]

  def episode(self, step: int) -> Episode:
    """The episode for `step`, as numpy arrays."""
    n, k, q = (self._spec.num_ways, self._spec.num_shots,
               self._spec.num_queries)
    rng = np.random.default_rng([self._seed, step])
    class_ids = rng.choice(self._dataset.num_classes, n, replace=False)
    chosen = np.stack([rng.choice(self._by_class[c], k + q, replace=False)
                       for c in class_ids])
    images = self._dataset.images
    return Episode(
        support_images=images[chosen[:, :k].reshape(-1)],
        support_labels=np.repeat(np.arange(n, dtype=np.int32), k),
        query_images=images[chosen[:, k:].reshape(-1)],
        query_labels=np.repeat(np.arange(n, dtype=np.int32), q),
        class_ids=class_ids.astype(np.int32),
        num_ways=n)
