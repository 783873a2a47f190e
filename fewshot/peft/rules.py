"""Which base parameters train, and how: `(pattern, action)` rules.

A rule list `[(pattern, action), ...]` is read top to bottom and the first
rule whose pattern matches a leaf's path decides that leaf (first match
wins); a leaf that no rule matches is frozen. Patterns are regular
expressions with the semantics of `fewshot.transfer.masks.matches`: a
pattern selects a leaf when it matches its whole '/'-joined path
('conv0/kernel', 'layer_0/attention/query/kernel') or a leading part of it
that ends at a '/' ('conv0' selects 'conv0/kernel' and 'conv0/bias').
Paths are those of the BACKBONE params (no 'backbone/' prefix).

Actions:

* 'freeze': the leaf is kept fixed (stored in the model state).
* 'full': the leaf is trained as it is.
* 'lora:R' or 'lora:R:ALPHA': the leaf (a kernel of shape `[..., out]`, at
  least 2-D) stays frozen and a trainable rank-R update
  `(ALPHA / R) * a @ b` is added to it (`fewshot.peft.lora`). ALPHA
  defaults to R, so the scale `ALPHA / R` is 1; raise ALPHA to make the
  update larger at the same learning rate without changing the rank.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax

from fewshot.transfer.masks import matches, path_string

Params = Any
Rules = Sequence[tuple[str, str]]
ACTIONS = ('freeze', 'full', 'lora')
_MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """What happens to one base parameter leaf.

  Attributes:
    action: 'freeze', 'full' or 'lora'.
    rank: the LoRA rank R (None unless `action == 'lora'`).
    alpha: the LoRA alpha (None unless `action == 'lora'`); the update is
      scaled by `alpha / rank`.
    pattern: the pattern of the rule that decided this leaf; None for a
      leaf that no rule matched (frozen by default) or a bare parsed
      action.
  """
  action: str
  rank: int | None = None
  alpha: float | None = None
  pattern: str | None = None

  @property
  def scale(self) -> float:
    """The LoRA scale `alpha / rank` (a Python float, static under jit)."""
    if self.action != 'lora':
      raise ValueError(f'A {self.action!r} leaf has no LoRA scale.')
    return self.alpha / self.rank


def parse_action(action: str) -> LeafRule:
  """Parses 'freeze', 'full', 'lora:R' or 'lora:R:ALPHA' into a `LeafRule`.

  Raises:
    ValueError: an unknown action, a rank that is not an integer >= 1, or an
      alpha that is not a positive finite number.
  """
  if not isinstance(action, str):
    raise ValueError(f'A rule action must be a string, got {action!r}.')
  if action in ('freeze', 'full'):
    return LeafRule(action)
  parts = action.split(':')
  if parts[0] != 'lora' or len(parts) not in (2, 3):
    raise ValueError(f"Unknown rule action {action!r}; use 'freeze', 'full', "
                     "'lora:RANK' or 'lora:RANK:ALPHA'.")
  try:
    rank = int(parts[1])
  except ValueError:
    raise ValueError(f'The rank in {action!r} must be an integer, got '
                     f'{parts[1]!r}.') from None
  if rank < 1:
    raise ValueError(f'The rank in {action!r} must be >= 1, got {rank}.')
  alpha = float(rank)
  if len(parts) == 3:
    try:
      alpha = float(parts[2])
    except ValueError:
      raise ValueError(f'The alpha in {action!r} must be a number, got '
                       f'{parts[2]!r}.') from None
    if not (math.isfinite(alpha) and alpha > 0):
      raise ValueError(f'The alpha in {action!r} must be positive and '
                       f'finite, got {alpha}.')
  return LeafRule('lora', rank=rank, alpha=alpha)


def check_rules(rules: Rules) -> tuple[tuple[str, LeafRule], ...]:
  """Validates a rule list without any params: `((pattern, parsed), ...)`.

  Raises:
    ValueError: a rule that is not a `(pattern, action)` pair of strings, a
      pattern that is not a valid regular expression, or a bad action
      (`parse_action`).
  """
  if isinstance(rules, (str, bytes)):
    raise ValueError(f'rules must be a sequence of (pattern, action) pairs, '
                     f'got the string {rules!r}.')
  checked = []
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise ValueError(f'Each rule must be a (pattern, action) pair of '
                       f'strings, got {rule!r}.')
    pattern, action = rule
    try:
      re.compile(pattern)
    except re.error as error:
      raise ValueError(f'Rule pattern {pattern!r} is not a valid regular '
                       f'expression: {error}.') from None
    parsed = dataclasses.replace(parse_action(action), pattern=pattern)
    checked.append((pattern, parsed))
  return tuple(checked)


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
  return math.prod(shape[:-1]), shape[-1]


def _listing(paths: Sequence[str]) -> str:
  shown = ', '.join(repr(p) for p in paths[:_MAX_LISTED])
  more = len(paths) - _MAX_LISTED
  return shown + (f' and {more} more' if more > 0 else '')


def resolve_rules(params: Params, rules: Rules) -> Any:
  """Decides every leaf of `params`: a pytree like it of `LeafRule`s.

  Args:
    params: the base backbone's params (arrays or `jax.ShapeDtypeStruct`s;
      only paths and shapes are read).
    rules: `(pattern, action)` pairs, see the module docstring.

  Returns:
    A pytree with the structure of `params` whose leaves are `LeafRule`s
    (`pattern` names the deciding rule, None for the default freeze).

  Raises:
    ValueError: a rule whose pattern matches no leaf (even one that an
      earlier rule decided), a LoRA rule deciding a leaf with fewer than 2
      dimensions, or a LoRA rank above `min(fan_in, fan_out)` of a kernel
      `[..., fan_out]` with `fan_in = prod(shape[:-1])`; plus the errors of
      `check_rules`.
  """
  checked = check_rules(rules)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_string(path) for path, _ in leaves]
  used = [False] * len(checked)
  decided = []
  for path, (_, leaf) in zip(paths, leaves):
    decision = LeafRule('freeze')
    for index, (pattern, parsed) in enumerate(checked):
      # Every rule is tried (not only up to the first match) so that the
      # "matches no parameter" check sees shadowed rules as matching.
      if matches(path, pattern):
        used[index] = True
        if decision.pattern is None:
          decision = parsed
    if decision.action == 'lora':
      shape = tuple(leaf.shape)
      if len(shape) < 2:
        raise ValueError(
            f'LoRA rule {_describe(decision.pattern)} selects {path!r} of '
            f'shape {shape}; LoRA needs a kernel with at least 2 '
            'dimensions [..., out]. Narrow the pattern (e.g. to its '
            'kernels).')
      fan_in, fan_out = _fans(shape)
      if decision.rank > min(fan_in, fan_out):
        raise ValueError(
            f'LoRA rank {decision.rank} (rule {_describe(decision.pattern)}) '
            f'is too large for the kernel {path!r} of shape {shape} (fan_in '
            f'{fan_in}, fan_out {fan_out}); the largest allowed rank is '
            f'{min(fan_in, fan_out)}.')
    decided.append(decision)
  for (pattern, _), was_used in zip(checked, used):
    if not was_used:
      raise ValueError(f'Rule pattern {_describe(pattern)} matches no '
                       f'parameter; the parameter paths are '
                       f'{_listing(paths)}.')
  return jax.tree_util.tree_unflatten(treedef, decided)


_KERNELS_PREFIX = '(?=(?:.*/)?kernel$)(?:'
_KERNELS_SUFFIX = ')(?:/[^/]+)*'


def kernels_under(target: str) -> str:
  """A pattern for the leaves named 'kernel' at or under `target`'s match.

  `kernels_under('conv[0-3]')` matches 'conv0/kernel' but not 'conv0/bias';
  `kernels_under('conv0/kernel')` matches 'conv0/kernel' too.
  """
  return f'{_KERNELS_PREFIX}{target}{_KERNELS_SUFFIX}'


def _describe(pattern: str) -> str:
  """How error messages name a pattern (a `kernels_under` one by its
  target)."""
  if pattern.startswith(_KERNELS_PREFIX) and pattern.endswith(_KERNELS_SUFFIX):
    target = pattern[len(_KERNELS_PREFIX):-len(_KERNELS_SUFFIX)]
    return f'{pattern!r} (the kernels of {target!r})'
  return repr(pattern)


def lora_rules(targets: Sequence[str], rank: int, alpha: float | None = None,
               train: Sequence[str] = ()) -> list[tuple[str, str]]:
  """LoRA on the kernels that `targets` select, full training of `train`.

  For example `lora_rules(['layer_[0-9]+/attention/(query|value)'], 8)`
  (LoRA on BERT's query and value projections) or `lora_rules(['conv.*'],
  4, train=['norm.*'])` (LoRA on Conv-4's kernels, its norms trained).
  Targets select leaves named 'kernel' only (`kernels_under`), so a target
  may name a layer; the LoRA rules come first, so a `train` pattern that
  also matches a targeted kernel trains only the rest. Every other leaf is
  frozen.

  Args:
    targets: patterns of layers (or kernels) to adapt with LoRA.
    rank: the LoRA rank R.
    alpha: the LoRA alpha (None: R, a scale of 1).
    train: patterns of leaves to train fully (e.g. a norm, a head).

  Returns:
    A rule list for `resolve_rules` / `peft_backbone`.
  """
  if isinstance(targets, str) or isinstance(train, str):
    raise ValueError('targets and train must be sequences of patterns, not '
                     'a single string.')
  action = f'lora:{rank}' if alpha is None else f'lora:{rank}:{float(alpha)!r}'
  parse_action(action)
  return ([(kernels_under(t), action) for t in targets]
          + [(pattern, 'full') for pattern in train])


def bitfit_rules(norm_scales: bool = False) -> list[tuple[str, str]]:
  """BitFit (Ben Zaken et al. 2022): train every bias, freeze the rest.

  Args:
    norm_scales: also train every leaf named 'scale' (the norms' gains).

  Returns:
    Rules selecting leaves whose last path part is 'bias' (and 'scale').
  """
  names = 'bias|scale' if norm_scales else 'bias'
  return [(f'(?:.*/)?(?:{names})', 'full')]


__all__ = ['ACTIONS', 'LeafRule', 'Rules', 'bitfit_rules', 'check_rules',
           'kernels_under', 'lora_rules', 'parse_action', 'resolve_rules']
