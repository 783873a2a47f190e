"""Small internal helpers."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Mapping

import jax


def tree_size(tree: Any) -> int:
  """The number of scalars in a pytree of arrays or `ShapeDtypeStruct`s."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def check_options(fn: Callable[..., Any], options: Mapping[str, Any],
                  what: str) -> None:
  """Raises ValueError naming any option that `fn` does not accept."""
  parameters = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
    return
  unknown = sorted(set(options) - set(parameters))
  if unknown:
    known = sorted(n for n, p in parameters.items()
                   if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    raise ValueError(f'Unknown option(s) {unknown} for {what}; '
                     f'it accepts {known}.')


class _DropInfoFrom(logging.Filter):
  """Drops INFO-and-below records logged from files under `fragment`."""

  def __init__(self, fragment: str):
    super().__init__()
    self._fragment = fragment

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno > logging.INFO or
            self._fragment not in record.pathname)


def quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the training log."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_DropInfoFrom('/orbax/'))

