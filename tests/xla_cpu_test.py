"""fewshot.ops.xla_cpu: which CPUs get YNNPACK off, and that the flag works."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from fewshot.ops import xla_cpu

AVX2 = frozenset({'sse4_2', 'avx', 'avx2', 'fma'})
AVX512 = AVX2 | {'avx512f', 'avx512bw'}


@pytest.mark.parametrize('machine, isa, xla_flags, expected', [
    ('x86_64', AVX2, '', xla_cpu.YNN_OFF),
    ('x86_64', AVX2, '--xla_force_host_platform_device_count=4',
     xla_cpu.YNN_OFF),
    ('x86_64', AVX512, '', ''),
    ('aarch64', frozenset({'asimd'}), '', ''),
    # The user's own choice of fusion types wins, whatever it is.
    ('x86_64', AVX2, '--xla_cpu_experimental_ynn_fusion_type=+dot', ''),
])
def test_flags_to_add(machine, isa, xla_flags, expected):
  assert xla_cpu.flags_to_add(machine, isa, xla_flags) == expected


def test_cpu_flags_reads_this_machine():
  flags = xla_cpu.cpu_flags()
  if not os.path.exists('/proc/cpuinfo'):
    assert flags == frozenset()
  elif os.uname().machine == 'x86_64':
    assert 'sse2' in flags  # every x86-64 CPU has it


def test_only_on_request(monkeypatch):
  monkeypatch.setattr(xla_cpu, 'cpu_flags', lambda: AVX2)
  monkeypatch.setattr(xla_cpu.platform, 'machine', lambda: 'x86_64')
  monkeypatch.setenv('XLA_FLAGS', '')
  for value in (None, '0', 'yes'):
    if value is None:
      monkeypatch.delenv(xla_cpu.ENV_VAR, raising=False)
    else:
      monkeypatch.setenv(xla_cpu.ENV_VAR, value)
    assert xla_cpu.tune_xla_cpu() == ''
    assert os.environ['XLA_FLAGS'] == ''


def test_late_call_warns_and_changes_nothing(monkeypatch):
  jnp.ones(1).block_until_ready()  # the backend has started
  monkeypatch.setattr(xla_cpu, 'cpu_flags', lambda: AVX2)
  monkeypatch.setattr(xla_cpu.platform, 'machine', lambda: 'x86_64')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  monkeypatch.setenv(xla_cpu.ENV_VAR, '1')
  with pytest.warns(UserWarning, match='after the first JAX computation'):
    assert xla_cpu.tune_xla_cpu() == ''
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_enable_fast_math=false'


_CONV = """
import jax, jax.numpy as jnp
x, k = jnp.ones((16, 14, 14, 64)), jnp.ones((3, 3, 64, 64))
conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
ynn = jax.jit(conv).lower(x, k).compile().as_text().count('__ynn_fusion')
"""

_PROBE = """
import json
from fewshot.ops import xla_cpu
# As on an x86 CPU without AVX-512:
xla_cpu.cpu_flags = lambda: frozenset({'avx2'})
xla_cpu.platform.machine = lambda: 'x86_64'
added = xla_cpu.tune_xla_cpu()
""" + _CONV + """
print(json.dumps({'added': added, 'ynn': ynn}))
"""


def test_the_flag_takes_effect_after_import_before_the_first_computation():
  # This process runs XLA's default (unless $XLA_FLAGS chose otherwise).
  if 'ynn_fusion_type' in os.environ.get('XLA_FLAGS', ''):
    pytest.skip('$XLA_FLAGS chooses the YNN fusion types here')
  scope = {}
  exec(_CONV, scope)  # pylint: disable=exec-used
  if scope['ynn'] == 0:
    pytest.skip('this jaxlib does not hand convolutions to YNNPACK')
  # fewshot (and so jax) is imported before tune_xla_cpu runs, as in
  # experiments/train.py: the flag still reaches the new process's backend.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env[xla_cpu.ENV_VAR] = '1'
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, check=True,
                       capture_output=True, text=True).stdout
  tuned = json.loads(out.strip().splitlines()[-1])
  assert tuned['added'] == xla_cpu.YNN_OFF
  assert tuned['ynn'] == 0
