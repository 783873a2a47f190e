"""A run's workdir: its layout, `config.json`, `metrics.jsonl` and checkpoints.

```
<workdir>/config.json     the config the run first started with
<workdir>/metrics.jsonl   one JSON object per log line
<workdir>/checkpoints/    orbax checkpoints of the TrainState (fewshot.checkpoint)
```

`load_backbone` reads the trained backbone of any workdir whose parameters
hold it under `params['backbone']` (supervised pretraining, episodic
meta-training), with the backbone's options from its `config.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fewshot import backbones
from fewshot.backbones.loading import lists_to_tuples
from fewshot.checkpoint import (Checkpointer, SubsetMismatch, restore_subset,
                                stored_shapes)

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def has_checkpoints(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds at least one finished checkpoint."""
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as JSON to a temporary file, then renames it over `path`."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def write_config_once(workdir: str | os.PathLike,
                      config: Mapping[str, Any]) -> None:
  """`config.json`, unless the workdir has one (the run's first config)."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    write_json_atomic(path, dict(config))


class MetricsLog:
  """Appends one JSON object per line to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str | os.PathLike):
    self._path = os.path.join(workdir, METRICS)

  def write(self, step: int, **values: Any) -> None:
    record = {'step': step, 'time': time.time()}
    record.update({k: float(v) if np.ndim(v) == 0 else v
                   for k, v in values.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def restore_state(workdir: str | os.PathLike, state: Any) -> Any:
  """The latest checkpoint of `workdir`, restored into the structure of `state`.

  Raises:
    FileNotFoundError: `workdir` has no checkpoints.
    ValueError: they were written for another architecture.
  """
  if not has_checkpoints(workdir):
    raise FileNotFoundError(f'No checkpoints in {workdir}: train first with '
                            f'experiments/train.py --workdir {workdir}.')
  checkpointer = Checkpointer(checkpoint_dir(workdir))
  try:
    restored, _ = checkpointer.restore(jax.eval_shape(lambda: state))
  finally:
    checkpointer.close()
  return restored


def _describe(name: str, options: Mapping[str, Any]) -> str:
  listed = ', '.join(f'{k}={v!r}' for k, v in sorted(options.items()))
  return f'{name}({listed})'


def _resolve(path: str | os.PathLike) -> str:
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.basename(path) == CHECKPOINTS:
    path = os.path.dirname(path)
  for needed in (CONFIG, CHECKPOINTS):
    if not os.path.exists(os.path.join(path, needed)):
      raise FileNotFoundError(f'{path} is not a workdir of '
                              f'experiments/train.py: it has no {needed}.')
  return path


def _input_channels(shapes: Mapping[str, tuple[int, ...]]) -> int:
  """Input channels of the backbone's first 4-D kernel (HWIO)."""
  for path in sorted(shapes):
    if path.startswith('params/backbone/') and len(shapes[path]) == 4:
      return shapes[path][2]
  return 3


def load_backbone(path: str | os.PathLike, name: str | None = None,
                  **options: Any) -> backbones.Loaded:
  """The trained backbone of a workdir: `Loaded(module, variables)`.

  Args:
    path: a workdir (or its `checkpoints/` folder) whose state holds
      `params['backbone']`: any run of `experiments/train.py`.
    name: the backbone expected (default: the stored one).
    **options: module attributes; they default to the stored ones and must
      describe the same parameter shapes (the `norm` mode may change).

  Raises:
    ValueError: the workdir holds another backbone or architecture (the
      message names both).
    FileNotFoundError: `path` is not a workdir.
  """
  workdir = _resolve(path)
  with open(os.path.join(workdir, CONFIG)) as f:
    stored = dict(lists_to_tuples(json.load(f)['backbone']))
  stored_name = stored.pop('name')
  stored.pop('weights', None)  # where that run started from; not architecture
  for adapter in ('input_size', 'input_channels'):  # not module attributes
    stored.pop(adapter, None)
  name = stored_name if name is None else name
  if stored_name != name:
    raise ValueError(
        f'{workdir} holds a {_describe(stored_name, stored)} backbone, not '
        f'the {_describe(name, options)} asked for.')
  merged = {**stored, **lists_to_tuples(dict(options))}
  module = backbones.create(name, **merged).module
  directory = checkpoint_dir(workdir)
  _, shapes = stored_shapes(directory)
  sample = jax.ShapeDtypeStruct((1, 32, 32, _input_channels(shapes)),
                                jnp.float32)
  abstract = dict(jax.eval_shape(module.init, jax.random.key(0), sample))
  wanted = {'params': {'backbone': abstract.pop('params')}}
  if abstract:  # state collections, e.g. running BatchNorm statistics
    wanted['model_state'] = abstract
  try:
    _, restored = restore_subset(directory, wanted,
                                 exact=('params/backbone/',))
  except SubsetMismatch as e:
    raise ValueError(
        f'The checkpoint (step {e.step}) in {workdir} was written for another '
        f'architecture: it holds {_describe(stored_name, stored)}, but '
        f'{_describe(name, merged)} was asked for ({e.detail}).') from e
  variables = {'params': restored['params']['backbone'],
               **restored.get('model_state', {})}
  return backbones.Loaded(module, jax.tree.map(jnp.asarray, variables))


__all__ = ['CHECKPOINTS', 'CONFIG', 'METRICS', 'MetricsLog', 'checkpoint_dir',
           'has_checkpoints', 'load_backbone', 'restore_state',
           'write_config_once', 'write_json_atomic']
