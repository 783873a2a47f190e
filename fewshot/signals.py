"""Deferring SIGTERM and SIGINT so a training loop can checkpoint first."""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging


class StopSignals:
  """Defers SIGTERM and SIGINT while training, so the loop can checkpoint.

  Inside the `with` block a first signal is only recorded (`received`); the
  training loop checks it after every step (validation is then skipped),
  saves a checkpoint and leaves the block, whose exit restores the previous
  handlers and raises the signal again (SIGTERM then ends the process as
  usual, SIGINT raises KeyboardInterrupt). A second signal before that is
  passed to the previous handler at once. A signal whose handler is
  `SIG_IGN` or not a Python one stays as it was. Nothing is installed
  outside the main thread (Python cannot) or when `enabled` is False
  (multi-process runs: the processes would stop at different steps).
  A signal is seen between steps, not inside a compiled step or the first
  step's compilation.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.received: int | None = None
    self._previous: dict[int, Any] = {}
    self._passed_on = False

  def __enter__(self) -> 'StopSignals':
    if self.enabled and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        previous = signal.getsignal(signum)
        if previous is None or previous is signal.SIG_IGN:
          continue
        signal.signal(signum, self._record)
        self._previous[signum] = previous
    return self

  def _record(self, signum, frame) -> None:
    del frame
    if self.received is not None:
      self._restore()
      self._passed_on = True
      signal.raise_signal(signum)
      return
    self.received = signum
    logging.warning('Received %s: stopping after this step with a checkpoint '
                    '(send it again to stop at once).',
                    signal.Signals(signum).name)

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __exit__(self, *exc_info) -> None:
    self._restore()
    if (self.received is not None and exc_info[0] is None
        and not self._passed_on):
      signal.raise_signal(self.received)


__all__ = ['StopSignals']
