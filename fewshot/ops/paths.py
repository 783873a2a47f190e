"""Which of the library's backend-dependent implementations run.

A few computations have two implementations with the same values: one tuned
for XLA:CPU and a plain one for GPU/TPU, picked by `jax.default_backend()`.

  what                                 CPU path                 accelerator path
  `ops.conv2d`, `ops.depthwise_conv2d` custom-VJP kernels, per-  `lax.conv_general_dilated`
                                       task kernels unrolled
  `losses.meta_batch_value_and_grad`   per-task meta-gradients  grad of the mean loss
                                       averaged by a dot
  `multitask.task_gradients`           T pullbacks              one vmapped pullback

`force_paths('accelerator')` (or the environment variable `FEWSHOT_PATHS`)
runs the accelerator path on a CPU, and `force_paths('cpu')` the CPU path
anywhere, so both are tested on every machine (tests/backend_paths_test.py)
and a user can compare them on theirs. The choice is read when a function is
traced: jit a new function (or call a jitted one for the first time) under
it; a compiled function keeps the paths it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import jax

PATHS = ('auto', 'cpu', 'accelerator')
ENV_VAR = 'FEWSHOT_PATHS'

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'fewshot_paths', default=None)


def _check(paths: str, source: str) -> str:
  if paths not in PATHS:
    raise ValueError(f'{source} must be one of {PATHS}, got {paths!r}')
  return paths


def selected_paths() -> str:
  """'cpu' or 'accelerator': `force_paths`'s choice, else $FEWSHOT_PATHS,
  else by `jax.default_backend()` ('auto')."""
  paths = _forced.get()
  if paths is None:
    paths = _check(os.environ.get(ENV_VAR, 'auto') or 'auto', f'${ENV_VAR}')
  if paths == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'accelerator'
  return paths


def cpu_paths() -> bool:
  """Whether the XLA:CPU-tuned implementations run (see the module doc)."""
  return selected_paths() == 'cpu'


@contextlib.contextmanager
def force_paths(paths: str) -> Iterator[None]:
  """Within the block, functions traced take `paths` ('cpu', 'accelerator'
  or 'auto': by backend) wherever the library picks by backend."""
  token = _forced.set(_check(paths, 'paths'))
  try:
    yield
  finally:
    _forced.reset(token)


__all__ = ['ENV_VAR', 'PATHS', 'cpu_paths', 'force_paths', 'selected_paths']
