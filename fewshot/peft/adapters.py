"""Bottleneck adapters (Houlsby et al. 2019) after chosen flax submodules.

An adapter after the submodule at `path` ('block3', 'layer_2/output': module
names joined by '/', as in the parameter tree) replaces its output `y` by
`y + up(act(down(y)))`, acting on the last axis, so it fits `[B, H, W, C]`
conv maps and `[B, L, D]` token states alike. `up` starts at zero, so an
adapted model equals its base at initialization. The modules themselves are
unchanged: `intercepting(...)` wraps their `__call__` with
`flax.linen.intercept_methods` while a backbone runs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

AdapterParams = dict[str, dict[str, jax.Array]]  # {'down': {...}, 'up': {...}}
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': jax.nn.gelu,
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'tanh': jnp.tanh,
}


def activation_fn(activation: str | Callable[[jax.Array], jax.Array]
                  ) -> Callable[[jax.Array], jax.Array]:
  """The function for an activation name in `ACTIVATIONS` (or a callable)."""
  if callable(activation):
    return activation
  if activation not in ACTIVATIONS:
    raise ValueError(f'Unknown adapter activation {activation!r}; known: '
                     f'{sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[activation]


def init_adapter(key: jax.Array, features: int, size: int,
                 dtype: Any = jnp.float32) -> AdapterParams:
  """One adapter for outputs `[..., features]` with a `size` bottleneck.

  `down` is `{'kernel': [features, size], 'bias': [size]}` with the kernel
  normal with std `1/sqrt(features)` (LeCun normal); `up` is
  `{'kernel': [size, features], 'bias': [features]}`, all zeros.
  """
  if size < 1:
    raise ValueError(f'adapter size must be >= 1, got {size}.')
  down = jax.random.normal(key, (features, size), dtype) * features ** -0.5
  return {'down': {'kernel': down, 'bias': jnp.zeros((size,), dtype)},
          'up': {'kernel': jnp.zeros((size, features), dtype),
                 'bias': jnp.zeros((features,), dtype)}}


def apply_adapter(params: AdapterParams, y: jax.Array,
                  activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu
                  ) -> jax.Array:
  """`y [..., C] + up(act(down(y)))`, computed in `y`'s dtype."""
  cast = jax.tree.map(lambda p: p.astype(y.dtype), params)
  # Explicit broadcasts: the library runs with jax_numpy_rank_promotion on.
  leading = (1,) * (y.ndim - 1)
  hidden = activation(y @ cast['down']['kernel']
                      + cast['down']['bias'].reshape(leading + (-1,)))
  return y + (hidden @ cast['up']['kernel']
              + cast['up']['bias'].reshape(leading + (-1,)))


def _module_path(context: Any) -> str:
  return '/'.join(context.module.path)


@contextlib.contextmanager
def intercepting(adapters: Mapping[str, AdapterParams],
                 activation: str | Callable[[jax.Array], jax.Array] = 'gelu'
                 ) -> Iterator[set[str]]:
  """Within this context, a flax submodule at a path in `adapters` returns
  its output passed through that path's adapter.

  Yields the set of paths adapted so far (filled in as the modules run), so
  a caller can check that every adapter took part. A submodule called
  several times (shared weights) is adapted at every call, with the same
  adapter.

  Flax interceptors act while module code runs in Python: in eager mode
  and while tracing. A `jax.jit`-wrapped inner function that JAX has
  already traced replays its cached computation without them, so run this
  around UNJITTED backbone code (and jit outside it).
  """
  act = activation_fn(activation)
  applied: set[str] = set()

  def interceptor(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return output
    path = _module_path(context)
    if path in adapters:
      applied.add(path)
      return apply_adapter(adapters[path], output, act)
    return output

  if not adapters:
    yield applied
    return
  with nn.intercept_methods(interceptor):
    yield applied


def output_features(run: Callable[[], Any], paths: Sequence[str]
                    ) -> dict[str, int]:
  """`{path: C}`, the last-axis size of each submodule output at `paths`.

  Args:
    run: a function of no arguments that runs the flax backbone (e.g.
      `lambda: backbone.apply(params, state, images, False)`); it is traced
      abstractly (`jax.eval_shape`), so nothing is computed.
    paths: '/'-joined submodule paths.

  Raises:
    ValueError: a path that names no submodule whose `__call__` ran (the
      message lists those that did), or a submodule whose output is not a
      single array of at least one dimension.
  """
  # path -> output shape, or a description of a non-array output. Shapes,
  # not the traced outputs, are kept: tracers must not escape eval_shape.
  seen: dict[str, tuple[int, ...] | str] = {}

  def record(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      if isinstance(output, jax.Array) and output.ndim:
        described = tuple(output.shape)
      else:
        shapes = jax.tree.map(lambda x: getattr(x, 'shape', x), output)
        described = f'{type(output).__name__} {shapes}'
      seen.setdefault(_module_path(context), described)
    return output

  with nn.intercept_methods(record):
    jax.eval_shape(run)
  if paths and not seen:
    raise ValueError(
        'No flax module ran while looking for the adapter paths '
        f'{list(paths)}: the backbone has no flax module, or its apply is '
        'jax.jit-wrapped (cached traces bypass flax interceptors; wrap the '
        'unjitted backbone and jit outside).')
  known = sorted(path for path in seen if path)
  sizes = {}
  for path in paths:
    if path not in seen or not path:
      raise ValueError(f'No submodule {path!r} for an adapter; the '
                       f'submodule paths are {known}.')
    shape = seen[path]
    if isinstance(shape, str):
      raise ValueError(f'An adapter needs the submodule {path!r} to return '
                       f'one array [..., C]; it returns {shape}.')
    sizes[path] = int(shape[-1])
  return sizes


__all__ = ['ACTIVATIONS', 'AdapterParams', 'activation_fn', 'apply_adapter',
           'init_adapter', 'intercepting', 'output_features']
