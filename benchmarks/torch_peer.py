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
import subprocess
import sys


class TorchPeer:
  """`benchmarks/<script> --serve --threads N`; `peer(cmd, **request)`."""

  def __init__(self, script: str, threads: int):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    self.script = script
    self.process = subprocess.Popen(
        [sys.executable, path, '--serve', '--threads', str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def __call__(self, cmd: str, **request) -> dict:
    """The reply; RuntimeError with the peer's message if it failed."""
    self.process.stdin.write(json.dumps({'cmd': cmd, **request}) + '\n')
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.script} exited ({self.process.wait()})')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'{self.script} {cmd}: {reply["error"]}')
    return reply

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
      self.process.stdin.close()
    self.process.wait()


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
