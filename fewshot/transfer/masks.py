"""Selecting parameters by path, and freezing the ones not selected.

A parameter's path joins its pytree keys with '/', as in
`'backbone/conv3/kernel'`. A pattern selects a leaf when it matches the whole
path or a whole leading part of it that ends at a '/': `'head'` selects every
leaf under `head`, `'backbone/conv[23]'` two blocks, `'.*'` everything.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Sequence

import jax
import optax

Params = Any
SYNTAXES = ('regex', 'glob')


def path_string(path: Sequence[Any]) -> str:
  """`'a/b/0'` for a pytree key path (dict keys, attributes, indices)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def param_paths(params: Params) -> Any:
  """The pytree of `params` with each leaf replaced by its '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_string(p), params)


def _prefixes(path: str) -> list[str]:
  parts = path.split('/')
  return ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]


def matches(path: str, patterns: Sequence[str] | str,
            syntax: str = 'regex') -> bool:
  """Whether any pattern matches `path` or one of its '/'-bounded prefixes."""
  if syntax not in SYNTAXES:
    raise ValueError(f'syntax must be one of {SYNTAXES}, got {syntax!r}.')
  if isinstance(patterns, str):
    patterns = (patterns,)
  if syntax == 'regex':
    compiled = [re.compile(p) for p in patterns]
    match = lambda text: any(c.fullmatch(text) for c in compiled)
  else:
    match = lambda text: any(fnmatch.fnmatchcase(text, p) for p in patterns)
  return any(match(prefix) for prefix in _prefixes(path))


def path_mask(params: Params, patterns: Sequence[str] | str, *,
              syntax: str = 'regex') -> Any:
  """A bool pytree like `params`: True where a leaf's path matches a pattern.

  Args:
    params: any pytree (a flax param dict, or the `meta_params` of an
      algorithm such as `{'backbone': ..., 'head': ...}`).
    patterns: regular expressions (`syntax='regex'`, matched with
      `re.fullmatch`) or shell globs (`syntax='glob'`), see the module
      docstring for how prefixes match.
    syntax: 'regex' or 'glob'.

  Returns:
    Python bools, one per leaf (static: usable to build optimizers).
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  return jax.tree.map(lambda path: matches(path, patterns, syntax),
                      param_paths(params))


def map_unmasked(fn: Callable[..., Any], updates: Any, *rest: Any) -> Any:
  """`jax.tree.map(fn, updates, *rest)`, skipping leaves that optax masked.

  Inside `optax.multi_transform` (and so inside `freeze`), a transformation
  sees `optax.MaskedNode()` in place of the leaves it does not own; this
  lets full-size pytrees (multipliers, references) line up with them.
  """
  def apply(update, *others):
    return update if isinstance(update, optax.MaskedNode) else fn(update,
                                                                  *others)
  return jax.tree.map(apply, updates, *rest,
                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def freeze(optimizer: optax.GradientTransformation,
           trainable_mask: Any | Callable[[Params], Any]
           ) -> optax.GradientTransformation:
  """Applies `optimizer` to trainable leaves; frozen leaves get zero updates.

  Built on `optax.multi_transform` with `optax.set_to_zero()` for the frozen
  leaves, so they stay bit-identical and `optimizer` keeps no state for them.
  Weight decay inside `optimizer` (e.g. `optax.adamw`) therefore never
  reaches a frozen leaf; do not chain decay *outside* `freeze`.
  (`optax.masked` would not do: it passes unmasked updates through unchanged.)

  Args:
    optimizer: the transformation for trainable leaves.
    trainable_mask: a bool pytree like the params (see `path_mask`) or a
      function `params -> bool pytree`.
  """

  def labels_from_mask(mask):
    return jax.tree.map(lambda keep: 'trainable' if keep else 'frozen', mask)

  if callable(trainable_mask):
    labels = lambda params: labels_from_mask(trainable_mask(params))
  else:
    labels = labels_from_mask(trainable_mask)
  return optax.multi_transform(
      {'trainable': optimizer, 'frozen': optax.set_to_zero()}, labels)
