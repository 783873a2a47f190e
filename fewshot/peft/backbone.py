"""Parameter-efficient fine-tuning as a transform of a `Backbone`.

`peft_backbone(backbone, rules, adapters=...)` returns a `Backbone` over the
same flax module whose params are only the TRAINABLE part:

    {'full':     the base leaves trained as they are (nested like the base),
     'lora':     {'a': [fan_in, r], 'b': [r, out]} in place of each LoRA
                 kernel (nested like the base),
     'adapters': {'<module path>': {'down': {kernel, bias},
                                    'up': {kernel, bias}}}}

All three keys are always present (an unused part is `{}`, which has no
leaves), so code can index them without checks. The frozen base leaves,
including the kernels that LoRA adapts, go into the model state under
'frozen' (a nested subset of the base params), next to the inner backbone's
own collections ('batch_stats'). Every optimizer, MAML inner loop or
`fine_tune` that trains `params` therefore trains only the trainable
leaves, and a checkpoint of `(params, model_state)` still holds the whole
model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax

from fewshot._utils import tree_size
from fewshot.backbones.base import Backbone, ModelState, Params
from fewshot.peft import adapters as adapters_lib
from fewshot.peft import lora
from fewshot.peft.rules import LeafRule, Rules, check_rules, resolve_rules
from fewshot.transfer.masks import path_string

FROZEN = 'frozen'  # the model-state key of the frozen base leaves
PARTS = ('full', 'lora', 'adapters')
# Folded into the init key to derive the LoRA / adapter initialization, so
# the base params stay exactly those of `backbone.init(key, inputs)`.
_PEFT_STREAM = 0x9EF7


def _check_nested(tree: Any, where: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, 'shape'):
      raise ValueError(f'{where} leaf {path_string(path)!r} is not an array.')
    if any(not isinstance(k, jax.tree_util.DictKey) for k in path):
      raise ValueError(f'peft needs {where} as nested dicts; '
                       f'{path_string(path)!r} is inside another container.')


def _select(tree: Mapping[str, Any], decisions: Mapping[str, Any],
            actions: tuple[str, ...]) -> dict[str, Any]:
  """The nested subset of `tree` whose decision is one of `actions`."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      sub = _select(value, decisions[key], actions)
      if sub:
        out[key] = sub
    elif decisions[key].action in actions:
      out[key] = value
  return out


def _union(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  """The union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for key, value in b.items():
    if key in out and isinstance(out[key], Mapping) and isinstance(value,
                                                                   Mapping):
      out[key] = _union(out[key], value)
    elif key in out:
      raise ValueError(f'The parameter {key!r} is both frozen and trained; '
                       'were these params made with other rules?')
    else:
      out[key] = value
  return out


def _map_lora(fn: Callable[[str, Any, Any], Any], base: Mapping[str, Any],
              factors: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """`base` with each leaf that has LoRA factors replaced by
  `fn(path, leaf, factors)`."""
  out = dict(base)
  for key, value in factors.items():
    path = f'{prefix}{key}'
    if key not in base:
      raise ValueError(f'LoRA factors for {path!r}, which the base params '
                       'lack; were these params made with other rules?')
    if isinstance(base[key], Mapping):
      out[key] = _map_lora(fn, base[key], value, f'{path}/')
    else:
      out[key] = fn(path, base[key], value)
  return out


def _paths(tree: Any) -> list[str]:
  return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, LeafRule))[0]]


def _lora_rules(decisions: Any) -> dict[str, LeafRule]:
  leaves = jax.tree_util.tree_flatten_with_path(
      decisions, is_leaf=lambda x: isinstance(x, LeafRule))[0]
  return {path_string(p): d for p, d in leaves if d.action == 'lora'}


def _check_layout(params: Params, decisions: Any) -> None:
  """Raises if `params` do not have the layout that `decisions` give."""
  leaves = jax.tree_util.tree_flatten_with_path(
      decisions, is_leaf=lambda x: isinstance(x, LeafRule))[0]
  want_full = sorted(path_string(p) for p, d in leaves if d.action == 'full')
  have_full = sorted(_paths(params['full']))
  want_lora = _lora_rules(decisions)
  have_lora = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params['lora'])[0]:
    have_lora.setdefault(path_string(path[:-1]), {})[
        path_string(path[-1:])] = leaf
  if have_full != want_full or sorted(have_lora) != sorted(want_lora):
    raise ValueError(
        'The PEFT params do not fit the rules: trained leaves '
        f'{have_full}, LoRA kernels {sorted(have_lora)}; the rules give '
        f'{want_full} and {sorted(want_lora)}.')
  for path, factors in have_lora.items():
    rank = want_lora[path].rank
    if sorted(factors) != ['a', 'b'] or factors['a'].shape[-1] != rank:
      raise ValueError(
          f'The LoRA factors of {path!r} have shapes '
          f'{ {k: tuple(v.shape) for k, v in factors.items()} }; the rules '
          f'give rank {rank}.')


def _base_params(params: Params, frozen: Params, rules: Rules) -> Params:
  """The full base params: frozen, trained and LoRA-adapted leaves."""
  missing = [part for part in PARTS if part not in params]
  if missing:
    raise ValueError(f'PEFT params need the keys {PARTS}; missing {missing}.')
  base = _union(frozen, params['full'])
  decisions = resolve_rules(base, rules)
  _check_layout(params, decisions)
  scales = {path: d.scale for path, d in _lora_rules(decisions).items()}
  return _map_lora(lambda path, kernel, factors: lora.merge(
      kernel, factors, scales[path]), base, params['lora'])


def _split_state(model_state: ModelState) -> tuple[Params, ModelState]:
  if not isinstance(model_state, Mapping) or FROZEN not in model_state:
    found = (sorted(model_state) if isinstance(model_state, Mapping)
             else type(model_state).__name__)
    raise ValueError(f'A PEFT model state holds the frozen params under '
                     f'{FROZEN!r}; got {found}.')
  inner = {k: v for k, v in model_state.items() if k != FROZEN}
  return model_state[FROZEN], inner


def peft_backbone(backbone: Backbone, rules: Rules | None = None, *,
                  adapters: Sequence[str] = (), adapter_size: int = 64,
                  adapter_activation: str = 'gelu') -> Backbone:
  """`backbone` with only the leaves that `rules` select (plus adapters)
  trainable.

  `init(key, inputs)` returns the base params of `backbone.init(key,
  inputs)` split into the layout of the module docstring; the LoRA and
  adapter initialization uses a key derived from `key`
  (`jax.random.fold_in`), so `init` stays a pure function of its key and
  the base params equal the unwrapped backbone's. `apply(params,
  model_state, inputs, train)` rebuilds the base params (frozen + full +
  LoRA updates), runs `backbone.apply` on them and the inner state (with
  the adapters intercepting their submodules) and returns `(features,
  {**updated inner state, 'frozen': unchanged})`. Under `jax.jit` the rules
  are resolved once, while tracing. Adapters work through flax method
  interception, so `backbone.apply` must not itself be `jax.jit`-wrapped
  (a cached trace would skip them; `apply` raises if an adapter did not
  run): jit the PEFT backbone's functions instead, as usual.

  Args:
    backbone: the backbone to adapt (random or pretrained weights).
    rules: `(pattern, action)` pairs on the base param paths
      (`fewshot.peft.rules`; presets `lora_rules`, `bitfit_rules`); None
      freezes every base leaf (e.g. to train adapters alone).
    adapters: '/'-joined paths of flax submodules ('conv2',
      'layer_1/output') whose outputs `[..., C]` get a bottleneck adapter.
    adapter_size: the adapters' bottleneck width.
    adapter_activation: the adapters' nonlinearity, a name in
      `fewshot.peft.adapters.ACTIVATIONS`.

  Returns:
    A `Backbone` whose `module` is `backbone.module`.

  Raises:
    ValueError: malformed rules or an unknown activation (here); at `init`,
      a rule matching no leaf, a bad LoRA target or rank, or an adapter path
      that names no submodule (or one whose output is not one array).
  """
  rules = tuple(() if rules is None else rules)
  check_rules(rules)
  adapters = tuple(adapters)
  if len(set(adapters)) != len(adapters):
    raise ValueError(f'Adapter paths repeat: {list(adapters)}.')
  if adapter_size < 1:
    raise ValueError(f'adapter_size must be >= 1, got {adapter_size}.')
  adapters_lib.activation_fn(adapter_activation)

  def init(key: jax.Array, inputs: jax.Array) -> tuple[Params, ModelState]:
    base, inner = backbone.init(key, inputs)
    _check_nested(base, 'the base params')
    if isinstance(inner, Mapping) and FROZEN in inner:
      raise ValueError(f'The inner model state already has a {FROZEN!r} '
                       'collection.')
    lora_key, adapter_key = jax.random.split(
        jax.random.fold_in(key, _PEFT_STREAM))
    decisions = resolve_rules(base, rules)
    kernels = _lora_rules(decisions)
    keys = dict(zip(sorted(kernels),
                    jax.random.split(lora_key, max(len(kernels), 1))))
    lora_base = _select(base, decisions, ('lora',))
    factors = _map_lora(
        lambda path, kernel, _: lora.init_factors(keys[path], kernel,
                                                  kernels[path].rank),
        lora_base, lora_base)
    adapter_params = {}
    if adapters:
      sizes = adapters_lib.output_features(
          lambda: backbone.apply(base, inner, inputs, False), adapters)
      adapter_keys = jax.random.split(adapter_key, len(adapters))
      adapter_params = {
          path: adapters_lib.init_adapter(k, sizes[path], adapter_size)
          for path, k in zip(adapters, adapter_keys)}
    params = {'full': _select(base, decisions, ('full',)), 'lora': factors,
              'adapters': adapter_params}
    state = {**inner, FROZEN: _select(base, decisions, ('freeze', 'lora'))}
    return params, state

  def apply(params: Params, model_state: ModelState, inputs: jax.Array,
            train: bool) -> tuple[jax.Array, ModelState]:
    frozen, inner = _split_state(model_state)
    base = _base_params(params, frozen, rules)
    extra = set(params['adapters']) - set(adapters)
    if extra:
      raise ValueError(f'Adapter params for {sorted(extra)}, which this '
                       f'backbone does not adapt (adapters={list(adapters)}).')
    with adapters_lib.intercepting(params['adapters'],
                                   adapter_activation) as applied:
      features, new_inner = backbone.apply(base, inner, inputs, train)
    skipped = sorted(set(params['adapters']) - applied)
    if skipped:
      # Otherwise the adapters would be silently ignored.
      raise ValueError(
          f'The adapters {skipped} were not applied: their submodules did '
          'not run, or the inner backbone apply is jax.jit-wrapped (cached '
          'traces bypass flax interceptors; jit the PEFT backbone instead).')
    return features, {**new_inner, FROZEN: frozen}

  return Backbone(init=init, apply=apply, module=backbone.module)


def merge_params(params: Params, model_state: ModelState, rules: Rules | None
                 ) -> tuple[Params, ModelState]:
  """Plain base params with LoRA folded into the kernels, for export.

  The result runs on the INNER backbone (`backbone.apply(base, inner, ...)`)
  and computes what the PEFT backbone computes. Adapters add modules the
  base does not have, so they cannot be folded: export a model with
  adapters as the PEFT wrapper (its `params` and `model_state`) instead.

  Args:
    params: PEFT params (`peft_backbone(...).init` layout).
    model_state: the PEFT model state (with 'frozen').
    rules: the rules the params were made with (the LoRA scales
      `alpha / rank` come from them; ranks and paths are checked).

  Returns:
    `(base params, inner model state)`.

  Raises:
    ValueError: the params hold adapters, or do not fit `rules`.
  """
  if params.get('adapters'):
    raise ValueError(
        f'Adapters ({sorted(params["adapters"])}) cannot be folded into the '
        'base params; export the PEFT params and model state instead.')
  frozen, inner = _split_state(model_state)
  return _base_params(params, frozen, tuple(() if rules is None else rules)
                      ), inner


def with_fixed_init(backbone: Backbone, params: Params,
                    model_state: ModelState) -> Backbone:
  """`backbone` whose `init` returns `(params, model_state)` (ignoring its
  key and inputs), e.g. to wrap restored pretrained weights:
  `peft_backbone(with_fixed_init(inner, params, state), rules).init(key,
  images)` splits them into the PEFT layout."""

  def init(key: jax.Array, inputs: jax.Array) -> tuple[Params, ModelState]:
    del key, inputs
    return params, model_state

  return Backbone(init=init, apply=backbone.apply, module=backbone.module)


class ParameterCount(NamedTuple):
  """Trainable and total parameter counts of a PEFT model.

  `total` is every parameter the adapted model computes with: the base
  model's (frozen + fully trained) plus the added LoRA factors and adapters,
  as HF peft's `print_trainable_parameters` counts. Model-state
  collections other than 'frozen' (BatchNorm statistics) are not
  parameters and are not counted.
  """
  trainable: int
  total: int

  @property
  def fraction(self) -> float:
    """`trainable / total` (0 for an empty model)."""
    return self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    return (f'trainable {self.trainable:,} of {self.total:,} parameters '
            f'({100 * self.fraction:.2f}%)')


def count_parameters(params: Params, model_state: ModelState
                     ) -> ParameterCount:
  """Counts a PEFT model's parameters (arrays or `jax.ShapeDtypeStruct`s).

  Args:
    params: PEFT params (everything in them is trainable).
    model_state: the PEFT model state; its 'frozen' leaves count toward
      the total only.

  Returns:
    `ParameterCount(trainable, total)`, total = trainable + frozen.
  """
  frozen, _ = _split_state(model_state)
  trainable = tree_size(params)
  return ParameterCount(trainable=trainable, total=trainable + tree_size(frozen))


__all__ = ['FROZEN', 'PARTS', 'ParameterCount', 'count_parameters',
           'merge_params', 'peft_backbone', 'with_fixed_init']
