"""Config drift: what changed between a workdir's config.json and a new config.

A workdir with checkpoints was trained with its `config.json`; resuming it
with a config that computes something else is an error unless allowed,
and an allowed change is recorded in `config_changes.jsonl`. Configs are
compared as JSON would write them, flattened to dotted fields.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from fewshot import workdir as workdir_lib
from fewshot.records import flatten_config


class ConfigDriftError(ValueError):
  """A workdir was trained with a config that computes something else."""


# Config fields a resume may change: they say what is logged, saved or
# evaluated and where the data are read from, not what is trained.
# (`train.num_steps` too, unless the learning-rate schedule or the
# objective depends on it: see `_drift`.)
_FREE_TO_CHANGE = ('train.log_every', 'train.eval_every',
                   'train.checkpoint_every_steps',
                   'train.checkpoint_every_secs', 'train.max_checkpoints',
                   'train.tensorboard', 'train.nonfinite',
                   'train.max_consecutive_nonfinite', 'eval.',
                   'data.manual_dir', 'data.data_dir')
CONFIG_CHANGES = 'config_changes.jsonl'


def _drift(stored: dict[str, Any], new: dict[str, Any]
           ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """`(computational, free)` changes `{field: (stored, new)}` between two
  configs (as JSON would write them)."""
  old_flat = flatten_config(stored)
  new_flat = flatten_config(json.loads(json.dumps(new)))
  missing = object()
  changes = {k: (old_flat.get(k, missing), new_flat.get(k, missing))
             for k in sorted(set(old_flat) | set(new_flat))
             if old_flat.get(k, missing) != new_flat.get(k, missing)}
  changes = {k: tuple(None if v is missing else v for v in pair)
             for k, pair in changes.items()}
  steps_matter = (new_flat.get('optimizer.schedule') == 'cosine' or
                  new_flat.get('objective.name') == 'adaptation')
  free = {k: v for k, v in changes.items()
          if k.startswith(_FREE_TO_CHANGE) or
          (k == 'train.num_steps' and not steps_matter)}
  return {k: v for k, v in changes.items() if k not in free}, free


def check_config_drift(workdir: str, config_dict: dict[str, Any], *,
                       allow_change: bool = False) -> dict[str, Any]:
  """The changes from `workdir`'s config.json to `config_dict`, checked.

  Only a workdir with checkpoints has a config to keep to (a run that
  never saved one trained nothing). Fields that change the computation
  raise unless `allow_change`; logging, evaluation and data-path fields
  (`_FREE_TO_CHANGE`) may always change.

  Returns:
    `{field: [stored, new]}` of every change (empty for a new workdir).

  Raises:
    ConfigDriftError (a ValueError): a computational change without
      `allow_change`; the message lists the fields with both values.
  """
  path = os.path.join(workdir, workdir_lib.CONFIG)
  if not (workdir_lib.has_checkpoints(workdir) and os.path.exists(path)):
    return {}
  with open(path) as f:
    stored = json.load(f)
  computational, free = _drift(stored, config_dict)
  if computational and not allow_change:
    listed = '\n'.join(f'  {k}: {old!r} in the workdir, {new!r} now'
                        for k, (old, new) in computational.items())
    raise ConfigDriftError(
        f'{workdir} was trained with another config; resuming it with this '
        f'one would change the computation in {len(computational)} '
        f'field(s):\n{listed}\nUse a new --workdir, or pass '
        '--allow_config_change to resume with the new values (the change is '
        f'recorded in {CONFIG_CHANGES}).')
  return {k: list(v) for k, v in {**computational, **free}.items()}


def record_config(workdir: str, config_dict: dict[str, Any],
                   changes: dict[str, Any], step: int) -> None:
  """config.json becomes the config of this (re)start; a resume that
  changed it appends `{step, time, changes}` to config_changes.jsonl."""
  if changes:
    with open(os.path.join(workdir, CONFIG_CHANGES), 'a') as f:
      f.write(json.dumps({'step': step, 'time': time.time(),
                          'changes': changes}) + '\n')
  path = os.path.join(workdir, workdir_lib.CONFIG)
  if changes or not os.path.exists(path) or not workdir_lib.has_checkpoints(
      workdir):
    workdir_lib.write_json_atomic(path, dict(config_dict))


__all__ = ['CONFIG_CHANGES', 'ConfigDriftError', 'check_config_drift',
           'record_config']
