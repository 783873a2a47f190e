"""Hot-path ops with custom gradients tuned for XLA:CPU."""

import ctypes
import sys

from fewshot.ops.conv import conv2d
from fewshot.ops.depthwise import depthwise_conv2d
from fewshot.ops.paths import force_paths
from fewshot.ops.pool import affine_relu_max_pool, max_pool_2x2
from fewshot.ops.xla_cpu import tune_xla_cpu

__all__ = ['affine_relu_max_pool', 'conv2d', 'depthwise_conv2d', 'force_paths',
           'max_pool_2x2', 'tune_cpu', 'tune_malloc', 'tune_xla_cpu']


def tune_cpu() -> dict[str, bool | str]:
  """`tune_malloc()` and `tune_xla_cpu()`; call before any JAX computation.

  Returns {'malloc': whether the heap was tuned, 'xla_flags': the XLA flags
  added ('' for none)}. The experiments and benchmarks call it first.
  """
  return {'malloc': tune_malloc(), 'xla_flags': tune_xla_cpu()}


def tune_malloc() -> bool:
  """Keeps freed heap memory mapped so XLA:CPU buffers are not re-faulted.

  XLA:CPU allocates its temporaries per call. glibc serves blocks above
  32 MiB (and, in per-thread arenas, many smaller ones) with fresh mmaps and
  returns them on free, so every training step page-faults its working set
  again; in the VM measured this was ~30% of a Conv-4 step (a 64 MiB
  np.ones: 11 ms -> 3 ms). Setting one arena, no mmap and no trimming makes
  the heap keep those pages. Call it early, before the first JAX
  computation (new threads then share the main arena). Linux/glibc only;
  returns False (and does nothing) elsewhere. Memory is not returned to the
  OS afterwards, so peak RSS stays at the high-water mark.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  ok = mallopt(m_arena_max, 1) == 1
  ok &= mallopt(m_mmap_max, 0) == 1
  ok &= mallopt(m_trim_threshold, 2**31 - 1) == 1
  return bool(ok)
