"""Shared test set-up: strict rank promotion and the shared data location."""

import os
import pathlib
import shutil
import tempfile

# One persistent compilation cache for the whole session, made before JAX
# is imported and inherited by the xdist workers and by every subprocess
# the tests start: a killed-and-resumed run, an evaluation of a workdir or
# the same model in the next test loads the executable instead of
# compiling it again. Compiling is most of this suite's time on a CPU.
# A cache hit runs the same executable, so bit-exactness tests still
# compare like with like. `FEWSHOT_TEST_JAX_CACHE=0` turns it off.
_OWN_CACHE = None
if (os.environ.get('FEWSHOT_TEST_JAX_CACHE', '1') != '0'
    and 'JAX_COMPILATION_CACHE_DIR' not in os.environ):
  _OWN_CACHE = tempfile.mkdtemp(prefix='fewshot-test-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

# The tiny test models spend far longer in LLVM than running: without its
# optimisations the suite ran in 628 s instead of 1,181 s. HLO passes
# (fusion, the collectives the sharding tests read) are unchanged, and
# every comparison in a test runs under the same flags. One exception:
# multi-device MAML updates differ at level 0 (see sharding_test.py), so the
# sharding children keep XLA's default.
# `FEWSHOT_TEST_FAST_COMPILE=0` keeps XLA's default code generation.
TEST_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                  '--xla_llvm_disable_expensive_passes=true')
if os.environ.get('FEWSHOT_TEST_FAST_COMPILE', '1') != '0':
  os.environ['XLA_FLAGS'] = (
      f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip())

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# Catches query-versus-prototype broadcasting bugs (nanodo's preamble).
jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get('FEWSHOT_SHARED_DATA', REPO.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data() -> pathlib.Path:
  """`../shared/data`, or a skip when this checkout has none beside it."""
  if not (SHARED_DATA / 'omniglot').is_dir():
    pytest.skip(f'real data not found at {SHARED_DATA} (see README: Data)')
  return SHARED_DATA


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
