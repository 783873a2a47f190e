"""A PyTorch peer process for the JAX benchmarks, and the machine's name.

`TorchPeer` starts `benchmarks/torch_<name>.py --serve` and sends it one JSON
request per line. The peer blocks on its pipe while JAX runs and JAX waits
on the pipe while the peer runs, so the two alternate in one sitting without
sharing a process (their thread pools never compete).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys


class PeerExited(RuntimeError):
  """The peer process died mid-request (killed for memory, a crash)."""


class TorchPeer:
  """`benchmarks/<script> --serve --threads N`; `peer(cmd, **request)`."""

  def __init__(self, script: str, threads: int):
    self.script = script
    self.threads = threads
    self.process = self._start()

  def _start(self) -> subprocess.Popen:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        self.script)
    return subprocess.Popen(
        [sys.executable, path, '--serve', '--threads', str(self.threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def restart(self) -> None:
    """A fresh peer process after `PeerExited` (the old one is reaped)."""
    self.close()
    self.process = self._start()

  def __call__(self, cmd: str, **request) -> dict:
    """The reply; RuntimeError with the peer's message if it failed.

    PeerExited if the process died (its exit status or signal named).
    """
    try:
      self.process.stdin.write(json.dumps({'cmd': cmd, **request}) + '\n')
      self.process.stdin.flush()
      line = self.process.stdout.readline()
    except BrokenPipeError:
      line = ''
    if not line:
      raise PeerExited(f'{self.script} {cmd}: the peer process '
                       f'{exit_reason(self.process.wait())}')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'{self.script} {cmd}: {reply["error"]}')
    return reply

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self.process.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
        self.process.stdin.close()
      except BrokenPipeError:
        pass
    self.process.wait()


def exit_reason(returncode: int) -> str:
  """'exited with status 1' / 'was killed by SIGKILL (out of memory?)'."""
  if returncode >= 0:
    return f'exited with status {returncode}'
  name = signal.Signals(-returncode).name
  hint = ' (out of memory?)' if name == 'SIGKILL' else ''
  return f'was killed by {name}{hint}'


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
