"""Small internal helpers."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Mapping


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


def tune_host_malloc() -> bool:
  """Makes glibc keep freed memory for reuse instead of returning it.

  XLA:CPU allocates and frees tens of MB of activations every step. With
  glibc's defaults, blocks that large are mmap-ed and munmap-ed each time and
  the kernel zero-fills fresh pages on every step: a third of a Conv-4
  training step went to system time. Raising the mmap and trim thresholds
  keeps those blocks in the heap. Same effect as MALLOC_MMAP_THRESHOLD_ and
  MALLOC_TRIM_THRESHOLD_; a no-op (returns False) where glibc is absent.
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import ctypes.util  # pylint: disable=g-import-not-at-top
  name = ctypes.util.find_library('c')
  if not name:
    return False
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  # glibc caps the mmap threshold at 32 MiB on 64-bit (HEAP_MAX/2 is larger,
  # but values above DEFAULT_MMAP_THRESHOLD_MAX are rejected); use the cap.
  ok_mmap = mallopt(m_mmap_threshold, 32 * 1024 * 1024)
  ok_trim = mallopt(m_trim_threshold, 2 ** 31 - 1)
  return bool(ok_mmap and ok_trim)
