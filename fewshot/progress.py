"""Progress of long loops: durations as text and a rate-limited ETA log."""

from __future__ import annotations

import time

from absl import logging

_clock = time.monotonic  # (tests replace it)


def format_duration(seconds: float) -> str:
  """`'1h02m'`, `'4m10s'` or `'12s'`."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


class Progress:
  """Logs `'<what>: done/total, <rate>, <time> left'` at most every
  `every_secs` seconds (the first line once `every_secs` have passed, so a
  short loop logs nothing).

  `update(done)` after each unit of work; the estimate is the mean time per
  unit so far.
  """

  def __init__(self, total: int, what: str, every_secs: float = 30.0):
    self.total, self.what, self.every_secs = total, what, every_secs
    self._start = self._last = _clock()

  def update(self, done: int) -> None:
    now = _clock()
    if now - self._last < self.every_secs or done >= self.total:
      return
    self._last = now
    per_unit = (now - self._start) / max(done, 1)
    logging.info('%s: %d/%d, %s left', self.what, done, self.total,
                 format_duration(per_unit * (self.total - done)))


__all__ = ['Progress', 'format_duration']
