"""XLA:CPU's convolution library, picked for the CPU before JAX starts.

jaxlib 0.10's XLA:CPU hands convolutions and dots to YNNPACK by default. On
the AVX-512/AMX Xeon of earlier sessions that made the Conv-4 MAML step 2x
faster than XLA's own kernels. On an AVX2 CPU without AVX-512 (a 2-core AMD
EPYC) YNNPACK's convolutions ran at half the speed of XLA's own (50 against
120 GFLOP/s at 80x14x14x64, `benchmarks/conv_micro.py`): with YNNPACK off the
ProtoNet training step ran 1.3-1.7x as fast at 5-way 1-shot (1.0-1.35x at
60-way 5-shot), its evaluation 2.4x and feature extraction 1.15-2.7x, but
second-order MAML (one inner step, 32 tasks) 1.3x slower and probes on stored
features 5-53% slower (WORKSPACE.md, "XLA:CPU's convolutions on AVX2").

So it is opt-in: with `FEWSHOT_TUNE_XLA_CPU=1`, `tune_xla_cpu` turns YNNPACK
off on x86 CPUs without AVX-512 and leaves every other machine, and any
`XLA_FLAGS` that already choose the fusion types, alone. XLA reads
`XLA_FLAGS` once, when the first computation starts the backend, so call it
before that (`experiments/*.py` and the benchmarks do, via `tune_cpu`).
"""

from __future__ import annotations

import os
import platform
import warnings

_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
YNN_OFF = f'{_YNN_FLAG}='
ENV_VAR = 'FEWSHOT_TUNE_XLA_CPU'


def cpu_flags() -> frozenset[str]:
  """The instruction-set flags of the first CPU in /proc/cpuinfo (or none)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:
    pass
  return frozenset()


def flags_to_add(machine: str, instruction_sets: frozenset[str],
                 xla_flags: str) -> str:
  """The XLA flags `tune_xla_cpu` adds on this machine ('' for none).

  Args:
    machine: `platform.machine()`, e.g. 'x86_64' or 'aarch64'.
    instruction_sets: the CPU's flags, e.g. {'avx2', 'avx512f', ...}.
    xla_flags: the current $XLA_FLAGS; a fusion-type choice there wins.
  """
  if _YNN_FLAG in xla_flags:
    return ''
  if machine.lower() not in ('x86_64', 'amd64'):
    return ''  # not measured: keep XLA's default
  if 'avx512f' in instruction_sets:
    return ''
  return YNN_OFF


def tune_xla_cpu() -> str:
  """Adds this CPU's convolution-library flag to $XLA_FLAGS; returns it.

  Returns '' when nothing was added: $FEWSHOT_TUNE_XLA_CPU not 1, an AVX-512
  or non-x86 CPU, a fusion-type choice already in $XLA_FLAGS, or a JAX
  backend already started (then with a warning: the flag could no longer
  take effect).
  """
  if os.environ.get(ENV_VAR, '0') != '1':
    return ''
  current = os.environ.get('XLA_FLAGS', '')
  added = flags_to_add(platform.machine(), cpu_flags(), current)
  if not added:
    return ''
  if _backends_started():
    warnings.warn('fewshot.ops.tune_xla_cpu() was called after the first JAX '
                  f'computation; {added} can no longer take effect. Call it '
                  'first, or set it in $XLA_FLAGS.', stacklevel=2)
    return ''
  os.environ['XLA_FLAGS'] = f'{current} {added}'.strip()
  return added


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # another JAX: assume not started
    return False


__all__ = ['ENV_VAR', 'YNN_OFF', 'cpu_flags', 'flags_to_add',
           'tune_xla_cpu']
