"""The Episode pytree: one N-way few-shot task, or a meta-batch of them.

Dimension letters used across the library:
  T  tasks in a meta-batch        N  ways (classes in an episode)
  K  shots (support images/class) Q  queries per class
  D  embedding dimension          H, W, C  image height, width, channels
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Episode:
  """One N-way task; a meta-batch is the same type with a leading `T` axis.

  Labels are episode-relative in `[0, num_ways)`; `class_ids` are the
  dataset-global class indices of the episode's classes, in label order.
  Images stay uint8 0..255 until a backbone scales them.
  """

  support_images: jax.Array  # [N*K, H, W, C]
  support_labels: jax.Array  # [N*K] int32
  query_images: jax.Array    # [N*Q, H, W, C]
  query_labels: jax.Array    # [N*Q] int32
  class_ids: jax.Array       # [N] int32
  num_ways: int = flax.struct.field(pytree_node=False)

  @property
  def num_shots(self) -> int:
    return self.support_labels.shape[-1] // self.num_ways

  @property
  def num_queries(self) -> int:
    return self.query_labels.shape[-1] // self.num_ways

  @property
  def num_tasks(self) -> int | None:
    """`T` for a meta-batch, None for a single episode."""
    return self.support_labels.shape[0] if self.support_labels.ndim == 2 else None


def episode_labels(num_ways: int, per_class: int) -> jax.Array:
  """`[num_ways * per_class]` labels `0,..,0,1,..,1,...` (class-major order)."""
  return jnp.repeat(jnp.arange(num_ways, dtype=jnp.int32), per_class)
