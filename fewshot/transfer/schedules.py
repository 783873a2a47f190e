"""Discriminative per-layer learning rates and gradual unfreezing, for optax."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fewshot.transfer.masks import (Params, map_unmasked, matches,
                                    param_paths)


def layerwise_lr_scales(params: Params,
                        layers: Sequence[str | Sequence[str]], *,
                        decay: float, default: float | None = None,
                        syntax: str = 'regex') -> Any:
  """Per-leaf learning-rate multipliers that decay from the output downwards.

  With `L` groups ordered from the input to the output, a leaf in group `i`
  gets `decay ** (L - 1 - i)`: the last group (usually the head) trains at
  the full rate and each group below it `decay` times slower (ULMFiT's
  discriminative fine-tuning, or BEiT's layer decay).

  Args:
    params: the parameter pytree.
    layers: path patterns (see `fewshot.transfer.masks`), one per group, from
      the input to the output; a group may be a list of patterns. A leaf
      belongs to the first group that matches it.
    decay: the ratio between neighbouring groups, usually in (0, 1].
    default: the multiplier of leaves that no group matches; None raises.
    syntax: 'regex' or 'glob'.

  Returns:
    A pytree of Python floats like `params`, for `scale_by_tree`.
  """
  num_groups = len(layers)

  def scale(path):
    for i, group in enumerate(layers):
      if matches(path, group, syntax):
        return float(decay) ** (num_groups - 1 - i)
    if default is None:
      raise ValueError(f'Parameter {path!r} matches none of the layer groups '
                       f'{list(layers)}; pass `default=` to give it a rate.')
    return float(default)

  return jax.tree.map(scale, param_paths(params))


def scale_by_tree(multipliers: Any | Callable[[Params], Any]
                  ) -> optax.GradientTransformation:
  """Multiplies each update leaf by its multiplier (stateless).

  Chain it after the optimizer, `optax.chain(optax.adam(lr),
  scale_by_tree(scales))`, so that leaf `p` moves with rate `lr * scales[p]`.

  Args:
    multipliers: a pytree of scalars like the params (from
      `layerwise_lr_scales`), or a function from the updates (shaped like
      the params) to such a pytree.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    tree = multipliers(updates) if callable(multipliers) else multipliers
    updates = map_unmasked(lambda u, m: (u * m).astype(u.dtype), updates,
                           tree)
    return updates, state

  return optax.GradientTransformation(init, update)


class GradualUnfreezingState(NamedTuple):
  count: jax.Array  # [] int32, number of updates so far
  inner_state: Any


def _stage_masks(stages, updates, syntax):
  """Per leaf `[S + 1]` bools: trainable in stage s; last row: before any."""
  def table(path):
    rows = [matches(path, patterns, syntax) for _, patterns in stages]
    return jnp.asarray(rows + [False])
  return jax.tree.map(table, param_paths(updates))


def gradual_unfreezing(stages: Sequence[tuple[int, Sequence[str]]],
                       optimizer: optax.GradientTransformation | None = None,
                       *, syntax: str = 'regex'
                       ) -> optax.GradientTransformation:
  """Unfreezes parameter groups on a step schedule (Howard & Ruder 2018).

  `stages = [(0, ['head']), (100, ['head', 'backbone/conv3']), (200, ['.*'])]`
  trains only the head for updates 0..99, adds the top block at update 100
  and everything at 200. At update `t` the trainable leaves are those matched
  by the last stage whose start is `<= t` (none before the first stage).
  The stage is chosen from the state's update count with `jnp.where`, so one
  compiled step serves the whole schedule.

  Args:
    stages: `(start_update, patterns)` pairs with increasing starts.
    optimizer: if given, it is wrapped: its gradients and its updates are
      both masked, so a frozen leaf stays bit-identical (weight decay
      included) and its moments only see the steps where it trains. If None,
      this is a masking transformation: chain it *after* an optimizer.
    syntax: 'regex' or 'glob' patterns.
  """
  starts = [int(start) for start, _ in stages]
  if not starts or any(b <= a for a, b in zip(starts, starts[1:])):
    raise ValueError(f'Stage starts must be non-empty and increasing, got '
                     f'{starts}.')
  inner = optimizer if optimizer is not None else optax.identity()

  def init(params):
    return GradualUnfreezingState(count=jnp.zeros([], jnp.int32),
                                  inner_state=inner.init(params))

  def update(updates, state, params=None):
    # Index of the current stage; -1 (the appended all-frozen row) before it.
    stage = jnp.sum(state.count >= jnp.asarray(starts)) - 1
    tables = _stage_masks(stages, updates, syntax)
    mask = lambda u, table: jnp.where(table[stage], u, jnp.zeros_like(u))
    updates = jax.tree.map(mask, updates, tables)
    updates, inner_state = inner.update(updates, state.inner_state, params)
    updates = jax.tree.map(mask, updates, tables)
    count = optax.safe_increment(state.count)
    return updates, GradualUnfreezingState(count=count,
                                           inner_state=inner_state)

  return optax.GradientTransformation(init, update)
