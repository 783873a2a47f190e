"""A thin orbax wrapper: atomic, bounded, resumable checkpoints of a pytree.

The only module that imports orbax. `Checkpointer` saves and restores a
whole train state; `restore_subset` reads chosen subtrees of the newest
readable one (a pretrained backbone without its optimizer state). Both
check the stored shapes against the wanted ones with `shape_mismatch`, and
skip, with a warning, checkpoints whose files cannot be read.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


def _path_string(path) -> str:
  parts = []
  for entry in path:
    for attr in ('name', 'key', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{'params/backbone/conv0/kernel': shape, ...}` of a pytree of arrays,
  `ShapeDtypeStruct`s or orbax metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {_path_string(p): tuple(x.shape) for p, x in leaves}


def shape_mismatch(stored: Mapping[str, tuple[int, ...]],
                   wanted: Mapping[str, tuple[int, ...]], *,
                   exact: Sequence[str] | None = None) -> str | None:
  """What differs between stored and wanted `{path: shape}`, or None.

  A wanted path that is not stored is 'missing'; a stored one that is not
  wanted is 'unexpected' (only under the path prefixes `exact`, if given;
  the rest of a checkpoint may hold more than is read). Parameter shapes
  are named first: they say the most about an architecture.
  """
  missing = sorted(set(wanted) - set(stored))
  extra = sorted(k for k in set(stored) - set(wanted)
                 if exact is None or any(k.startswith(p) for p in exact))
  differ = sorted((k for k in set(wanted) & set(stored)
                   if wanted[k] != stored[k]),
                  key=lambda k: (not k.startswith('params/'), k))
  if missing:
    return f'missing {missing[:3]}'
  if extra:
    return f'unexpected {extra[:3]}'
  if differ:
    return (f'{differ[0]} has shape {stored[differ[0]]} in the checkpoint but '
            f'{wanted[differ[0]]} in the model')
  return None


class ArchitectureMismatch(ValueError):
  """A checkpoint holds other parameter names or shapes than wanted."""


class UnreadableCheckpoints(RuntimeError):
  """No checkpoint in a directory could be read (truncated, empty, corrupt)."""


UNREADABLE = 'unreadable'  # where `Checkpointer` moves unreadable steps


def _newest_readable(manager: ocp.CheckpointManager, directory, read, *,
                     move_aside=None):
  """`(step, read(step))` for the newest step whose `read` succeeds.

  A step whose files cannot be read (truncated, empty, failing OCDBT's
  checksums) is skipped with a warning naming it, and passed to
  `move_aside` if given; `ArchitectureMismatch` and `SubsetMismatch` are
  not read errors and propagate.

  Raises:
    FileNotFoundError: no checkpoint in `directory`.
    UnreadableCheckpoints: none of them could be read.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {directory}.')
  failures = []
  for step in steps:
    try:
      return step, read(step)
    except (ArchitectureMismatch, SubsetMismatch):
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {str(e)[:200]}'
      failures.append(f'step {step} ({reason})')
      where = move_aside(step) if move_aside else None
      logging.warning(
          'The checkpoint at step %d in %s cannot be read (%s)%s; trying the '
          'one before it.', step, directory, reason,
          f'; moved it to {where}' if where else '')
  raise UnreadableCheckpoints(
      f'None of the checkpoints in {directory} can be read: '
      + '; '.join(failures) + '. Their files are truncated or corrupt '
      '(a full disk, or a copy that did not finish?).')


class Checkpointer:
  """Saves and restores `(state, config)` under `directory`.

  orbax writes each checkpoint to a temporary folder and renames it when
  complete, so a run killed mid-save leaves the previous checkpoint intact.
  A checkpoint whose files were damaged later (truncated, emptied, bits
  changed: OCDBT checksums its data) is found on restore, moved aside to
  `directory/unreadable/` (never deleted) and the one before it is used.
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

  def restore(self, abstract_state: Any, step: int | None = None, *,
              move_unreadable: bool = True) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure of `abstract_state` (e.g. `jax.eval_shape`).

    Without `step`, the newest readable checkpoint: newer ones that cannot
    be read are skipped with a warning and, if `move_unreadable` (a run
    about to write new checkpoints), moved to `directory/unreadable/<step>`.

    Raises:
      ArchitectureMismatch (a ValueError): the checkpoint holds another
        architecture (different parameter names or shapes); the message
        names the first mismatch.
      FileNotFoundError: no checkpoint.
      UnreadableCheckpoints: none can be read.
    """
    wanted = tree_shapes(abstract_state)

    def read(step: int):
      stored = tree_shapes(self._manager.item_metadata(step)['state'].tree)
      detail = shape_mismatch(stored, wanted)
      if detail:
        raise ArchitectureMismatch(
            f'The checkpoint at step {step} in {self._manager.directory} was '
            f'written for another architecture: {detail}.')
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          config=ocp.args.JsonRestore()))
      return restored.state, restored.config

    if step is not None:
      return read(step)
    _, restored = _newest_readable(
        self._manager, self._manager.directory, read,
        move_aside=self._move_aside if move_unreadable else None)
    return restored

  def _move_aside(self, step: int) -> str:
    """Moves step `step`'s folder to `unreadable/<step>[-N]`; its new path."""
    source = os.path.join(os.fspath(self._manager.directory), str(step))
    target_dir = os.path.join(os.fspath(self._manager.directory), UNREADABLE)
    os.makedirs(target_dir, exist_ok=True)
    target, n = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(target_dir, f'{step}-{n}'), n + 1
    os.replace(source, target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until background writes are finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class SubsetMismatch(ValueError):
  """`restore_subset`'s stored shapes differ from the wanted ones."""

  def __init__(self, step: int, detail: str):
    super().__init__(f'the checkpoint at step {step} differs: {detail}')
    self.step, self.detail = step, detail


def stored_shapes(directory: str | os.PathLike
                  ) -> tuple[int, dict[str, tuple[int, ...]]]:
  """`(step, {path: shape})` of the latest checkpoint's state in `directory`."""
  manager = _reader(directory)
  try:
    return _newest_readable(
        manager, directory,
        lambda step: tree_shapes(manager.item_metadata(step)['state'].tree))
  finally:
    manager.close()


def restore_subset(directory: str | os.PathLike, abstract: Any, *,
                   exact: Sequence[str] = ()) -> tuple[int, Any]:
  """Reads the subtrees of `abstract` from the latest checkpoint's state.

  Only those arrays are read (e.g. `{'params': {'backbone': ...},
  'model_state': ...}`, not the optimizer state), as numpy arrays.

  Args:
    directory: a `checkpoints/` folder written by `Checkpointer`.
    abstract: nested dicts of `jax.ShapeDtypeStruct` shaped like the part
      of the stored state to read.
    exact: path prefixes under which the checkpoint may hold nothing that
      `abstract` lacks (see `shape_mismatch`).

  Returns:
    `(step, tree)` with the structure of `abstract`.

  Raises:
    FileNotFoundError: no checkpoint in `directory`.
    UnreadableCheckpoints: none can be read (newer unreadable ones are
      skipped with a warning, and left where they are).
    SubsetMismatch: the stored shapes differ from the wanted ones.
  """
  manager = _reader(directory)

  def read(step: int):
    stored = tree_shapes(manager.item_metadata(step)['state'].tree)
    detail = shape_mismatch(stored, tree_shapes(abstract), exact=exact)
    if detail:
      raise SubsetMismatch(step, detail)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract, restore_args=jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
            partial_restore=True))).state

  try:
    return _newest_readable(manager, directory, read)
  finally:
    manager.close()


def _reader(directory) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler()})


__all__ = ['ArchitectureMismatch', 'Checkpointer', 'SubsetMismatch',
           'UNREADABLE', 'UnreadableCheckpoints', 'restore_subset',
           'shape_mismatch', 'stored_shapes', 'tree_shapes']
