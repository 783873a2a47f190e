"""The device mesh every sharded step uses: one axis over all devices."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

# The mesh axis a batch's (or meta-batch's task) axis is split over.
TASK_AXIS = 'data'


def task_mesh() -> Mesh:
  """A 1-D mesh named `TASK_AXIS` over all devices."""
  return Mesh(np.asarray(jax.devices()), (TASK_AXIS,))


__all__ = ['TASK_AXIS', 'task_mesh']
