"""StopSignals: deferred SIGTERM/SIGINT, left alone where they must be."""

import signal
import threading

from fewshot.signals import StopSignals


def test_stop_signals_leave_ignored_signals_and_other_threads_alone():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with StopSignals() as stop:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) == stop._record  # pylint: disable=protected-access
    assert stop.received is None
    seen = {}

    def in_thread():
      with StopSignals():
        seen['handler'] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen['handler'] is signal.getsignal(signal.SIGTERM)
    with StopSignals(enabled=False):
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def test_a_second_signal_goes_to_the_previous_handler_at_once():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, _: seen.append(signum))
  try:
    with StopSignals() as stop:
      signal.raise_signal(signal.SIGTERM)
      assert stop.received == signal.SIGTERM and not seen  # deferred
      signal.raise_signal(signal.SIGTERM)
      assert seen == [signal.SIGTERM]  # passed on at once
    assert seen == [signal.SIGTERM]  # and not raised again on exit
  finally:
    signal.signal(signal.SIGTERM, previous)
