"""A thin orbax wrapper: atomic, bounded, resumable checkpoints of a pytree."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _path_string(path) -> str:
  parts = []
  for entry in path:
    for attr in ('name', 'key', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {_path_string(p): tuple(x.shape) for p, x in leaves}


class Checkpointer:
  """Saves and restores `(state, config)` under `directory`.

  orbax writes each checkpoint to a temporary folder and renames it when
  complete, so a run killed mid-save leaves the previous checkpoint intact.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, config: dict[str, Any]) -> None:
    """Writes `state` (a pytree of arrays) and a JSON-able `config`."""
    # A host copy: the caller may donate the device buffers to the next step
    # while orbax still writes in the background.
    host_state = jax.device_get(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host_state),
        config=ocp.args.JsonSave(config)))

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure of `abstract_state` (e.g. `jax.eval_shape`).

    Raises:
      ValueError: the checkpoint holds another architecture (different
        parameter names or shapes); the message names the first mismatch.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self._manager.directory}.')
    stored = _shapes(self._manager.item_metadata(step)['state'].tree)
    wanted = _shapes(abstract_state)
    if stored != wanted:
      missing = sorted(set(wanted) - set(stored))
      extra = sorted(set(stored) - set(wanted))
      differ = sorted(k for k in set(wanted) & set(stored)
                      if wanted[k] != stored[k])
      detail = (f'missing {missing[:3]}' if missing else
                f'unexpected {extra[:3]}' if extra else
                f'{differ[0]} has shape {stored[differ[0]]} in the checkpoint '
                f'but {wanted[differ[0]]} in the model')
      raise ValueError(
          f'The checkpoint at step {step} in {self._manager.directory} was '
          f'written for another architecture: {detail}.')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        config=ocp.args.JsonRestore()))
    return restored.state, restored.config

  def wait(self) -> None:
    """Blocks until background writes are finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
