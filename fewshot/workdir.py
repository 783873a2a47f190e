"""A run's workdir: its layout, `config.json`, `metrics.jsonl` and checkpoints.

```
<workdir>/config.json     the config the run first started with
<workdir>/metrics.jsonl   one JSON object per log line
<workdir>/checkpoints/    orbax checkpoints of the TrainState (fewshot.checkpoint)
<workdir>/tensorboard/    the same scalars as TensorBoard events (train.tensorboard)
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

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fewshot import backbones
from fewshot.backbones.loading import lists_to_tuples
from fewshot.checkpoint import (Checkpointer, SubsetMismatch, restore_subset,
                                stored_shapes, tree_shapes)

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
TENSORBOARD = 'tensorboard'


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


_NON_FINITE = {'NaN': float('nan'), 'Infinity': float('inf'),
               '-Infinity': float('-inf')}


def _json_value(value: Any) -> Any:
  """A scalar as a JSON value: a non-finite float becomes the string
  'NaN', 'Infinity' or '-Infinity' (strict JSON has no such numbers)."""
  if isinstance(value, (bool, str)) or value is None:
    return value
  if np.ndim(value) == 0:
    value = float(value)
    if not np.isfinite(value):
      return 'NaN' if np.isnan(value) else ('Infinity' if value > 0
                                             else '-Infinity')
    return value
  return value


class MetricsLog:
  """Appends one JSON object per line to `workdir/metrics.jsonl`.

  Every record has `step` and `time`; non-finite scalars are written as the
  strings 'NaN', 'Infinity', '-Infinity' (the file stays strict JSON;
  `read_metrics` turns them back into floats). With `tensorboard=True`
  every numeric scalar is also written as a TensorBoard event under
  `workdir/tensorboard/` (needs `tensorboardX`, not TensorFlow).
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = False):
    self._path = os.path.join(workdir, METRICS)
    self._events = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError('TensorBoard logging needs tensorboardX: pip '
                          'install tensorboardX (or set '
                          'train.tensorboard=False).') from e
      self._events = SummaryWriter(os.path.join(workdir, TENSORBOARD),
                                   flush_secs=10)

  def write(self, step: int, **values: Any) -> None:
    record = {'step': int(step), 'time': time.time()}
    record.update({k: _json_value(v) for k, v in values.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(record, allow_nan=False) + '\n')
    if self._events is not None:
      for name, value in values.items():
        if (np.ndim(value) == 0 and not isinstance(value, (bool, str))
            and value is not None):
          self._events.add_scalar(name.replace('_', '/', 1)
                                  if name.startswith(('train_', 'val_',
                                                      'test_')) else name,
                                  float(value), int(step),
                                  walltime=record['time'])

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl`, in the order written.

  The strings 'NaN', 'Infinity' and '-Infinity' (how `MetricsLog` writes
  non-finite values) are read back as floats. A resumed run may repeat
  steps after its last checkpoint; the later record is the one that led to
  the final state. A line cut short by a kill is skipped with a warning.

  Raises:
    FileNotFoundError: the workdir has no metrics.jsonl.
  """
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no {METRICS}: is it a workdir of '
                            'experiments/train.py?')
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning('%s, line %d is not JSON (a write cut short by a '
                        'kill?); skipped.', path, number)
        continue
      records.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v
                      for k, v in record.items()})
  return records


def restore_state(workdir: str | os.PathLike, state: Any) -> Any:
  """The newest readable checkpoint of `workdir`, restored into the
  structure of `state` (newer, unreadable ones are skipped with a warning
  and left where they are).

  Raises:
    FileNotFoundError: `workdir` has no checkpoints.
    ValueError: they were written for another architecture.
  """
  if not has_checkpoints(workdir):
    raise FileNotFoundError(f'No checkpoints in {workdir}: train first with '
                            f'experiments/train.py --workdir {workdir}.')
  checkpointer = Checkpointer(checkpoint_dir(workdir))
  try:
    restored, _ = checkpointer.restore(jax.eval_shape(lambda: state),
                                       move_unreadable=False)
  finally:
    checkpointer.close()
  return restored


def checkpoint_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
  """What identifies a workdir's newest checkpoint without reading it: the
  workdir, the step and the step folder's modification time (a cache of
  anything computed from the checkpoint is stale when this changes)."""
  workdir = _resolve(path)
  directory = checkpoint_dir(workdir)
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  if not steps:
    raise FileNotFoundError(f'{workdir} has no checkpoint yet.')
  stat = os.stat(os.path.join(directory, str(steps[-1])))
  return dict(workdir=workdir, step=steps[-1], mtime_ns=stat.st_mtime_ns)


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


def _abstract_variables(module, shapes: Mapping[str, tuple[int, ...]]):
  """`module`'s variables as `ShapeDtypeStruct`s, for the stored input channels.

  The variables depend on the image size only through the input channels,
  which the stored kernels do not name (a depthwise kernel has 1 input
  channel too): try RGB, grayscale, then each kernel's input channels, and
  keep the first whose parameter shapes are the stored ones (else RGB's,
  for the error message).
  """
  stored = {k: v for k, v in shapes.items() if k.startswith('params/backbone/')}
  candidates = [3, 1] + sorted({v[2] for v in stored.values() if len(v) == 4})
  first = None
  for channels in dict.fromkeys(candidates):
    sample = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
    abstract = dict(jax.eval_shape(module.init, jax.random.key(0), sample))
    first = first or abstract
    wanted = tree_shapes({'params': {'backbone': abstract['params']}})
    if wanted == stored:
      return abstract
  return first


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
  abstract = _abstract_variables(module, shapes)
  wanted = {'params': {'backbone': abstract.pop('params')}}
  # State collections (running BatchNorm statistics) are the model state,
  # or its 'backbone' part where the objective keeps more (multitask).
  nested = any(k.startswith('model_state/backbone/') for k in shapes)
  if abstract:
    wanted['model_state'] = {'backbone': abstract} if nested else abstract
  try:
    _, restored = restore_subset(directory, wanted,
                                 exact=('params/backbone/',))
  except SubsetMismatch as e:
    raise ValueError(
        f'The checkpoint (step {e.step}) in {workdir} was written for another '
        f'architecture: it holds {_describe(stored_name, stored)}, but '
        f'{_describe(name, merged)} was asked for ({e.detail}).') from e
  model_state = restored.get('model_state', {})
  variables = {'params': restored['params']['backbone'],
               **(model_state.get('backbone', {}) if nested else model_state)}
  return backbones.Loaded(module, jax.tree.map(jnp.asarray, variables))


def stored_backbone_name(path: str | os.PathLike) -> str:
  """The backbone name a workdir's `config.json` records."""
  with open(os.path.join(_resolve(path), CONFIG)) as f:
    return json.load(f)['backbone']['name']


def load_head(path: str | os.PathLike) -> dict[str, jax.Array] | None:
  """The classifier head a workdir trained (`params['head']`: a supervised
  pretraining or distillation run), or None if its objective has none.

  Raises a ValueError for a head behind a bottleneck layer (an adaptation
  run with `bottleneck_dim`): the head alone would not classify backbone
  features.
  """
  workdir = _resolve(path)
  directory = checkpoint_dir(workdir)
  _, shapes = stored_shapes(directory)
  if any(k.startswith('params/bottleneck/') for k in shapes):
    raise ValueError(f'{workdir} classifies through a bottleneck layer, so '
                     'its head alone cannot be a teacher; train one without '
                     'bottleneck_dim.')
  prefix = 'params/head/'
  head = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
  if not head or any('/' in k for k in head):
    return None
  wanted = {'params': {'head': {k: jax.ShapeDtypeStruct(v, jnp.float32)
                                for k, v in head.items()}}}
  _, restored = restore_subset(directory, wanted)
  return jax.tree.map(jnp.asarray, restored['params']['head'])


__all__ = ['CHECKPOINTS', 'CONFIG', 'METRICS', 'MetricsLog', 'checkpoint_dir',
           'has_checkpoints', 'load_backbone', 'load_head', 'read_metrics',
           'stored_backbone_name', 'restore_state',
           'write_json_atomic']
