"""Optimizers: the outer-loop factory and the table of inner-loop rules.

`make_optimizer` builds a training run's optimizer from keyword arguments
(a config's `optimizer` section); `inner_optimizer` is the one table of
update rules that per-episode loops (MAML's inner loop, fine-tuning, linear
probes) are configured with.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import jax
import optax

# name -> learning rate -> transformation (updates are added to parameters).
INNER_OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    'sgd': optax.sgd,
    'momentum': lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    'adam': optax.adam,
}

InnerOptimizer = Union[str, optax.GradientTransformation,
                       Callable[[float], optax.GradientTransformation]]


def inner_optimizer(rule: InnerOptimizer, learning_rate: float, *,
                    what: str = 'optimizer') -> optax.GradientTransformation:
  """An inner-loop update rule at `learning_rate`.

  Args:
    rule: a name in `INNER_OPTIMIZERS` ('sgd', 'momentum' (0.9), 'adam'), a
      function `learning_rate -> GradientTransformation`, or a
      `GradientTransformation`, returned as it is (its own rate applies).
    what: the option's name in error messages.
  """
  if isinstance(rule, optax.GradientTransformation):
    return rule
  if isinstance(rule, str):
    if rule not in INNER_OPTIMIZERS:
      raise ValueError(f'{what} must be one of {sorted(INNER_OPTIMIZERS)}, '
                       f'a function of the learning rate or an optax '
                       f'GradientTransformation, got {rule!r}.')
    return INNER_OPTIMIZERS[rule](learning_rate)
  return rule(learning_rate)


def _schedule(learning_rate: float, schedule: str, decay_every: int,
              decay_factor: float, warmup_steps: int, num_steps: int,
              decay_start: int) -> optax.Schedule:
  if decay_start < 0 or (decay_start and schedule != 'cosine'):
    raise ValueError(f'decay_start ({decay_start}) applies to the cosine '
                     f'schedule only and must be >= 0; schedule is {schedule!r}.')
  if schedule == 'constant':
    lr = optax.constant_schedule(learning_rate)
  elif schedule == 'step':
    lr = optax.exponential_decay(learning_rate, decay_every, decay_factor,
                                 staircase=True)
  elif schedule == 'cosine':
    if decay_start and decay_start >= num_steps:
      raise ValueError(f'decay_start {decay_start} must come before num_steps '
                       f'{num_steps}.')
    start = max(decay_start, warmup_steps)
    lr = optax.cosine_decay_schedule(learning_rate, max(num_steps - start, 1))
    if start > warmup_steps:
      lr = optax.join_schedules(
          [optax.constant_schedule(learning_rate), lr], [start - warmup_steps])
  else:
    raise ValueError(f'Unknown schedule {schedule!r}: constant, step, cosine.')
  if warmup_steps:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), lr],
        [warmup_steps])
  return lr


def _not_log_scale(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'log_scale' not in jax.tree_util.keystr(path), params)


def make_optimizer(*, name: str = 'adam', learning_rate: float = 1e-3,
                   schedule: str = 'constant', decay_every: int = 2000,
                   decay_factor: float = 0.5, warmup_steps: int = 0,
                   num_steps: int = 1, decay_start: int = 0,
                   weight_decay: float = 0.0,
                   clip_norm: float | None = None,
                   rate_multipliers: Mapping[str, float] | None = None
                   ) -> optax.GradientTransformation:
  """A training run's optimizer: 'adam', 'adamw' or 'sgd' (momentum 0.9).

  Schedules: 'constant', 'step' (multiply by `decay_factor` every
  `decay_every` steps, as in the ProtoNet paper), 'cosine' (a cosine to
  zero at `num_steps`, held at `learning_rate` until `decay_start` if that
  is later than the warm-up); each after `warmup_steps` of linear warm-up.
  Every schedule keeps the same optimizer state (a step count), so a run
  can be resumed under another schedule: a constant-rate run continued
  with `schedule='cosine'` and `decay_start` at or after its current step
  (same optimizer, rate, warm-up and clipping) is the run that config
  gives from scratch.

  `weight_decay`: 'adamw' decouples it and decays every parameter; 'sgd'
  and 'adam' add `weight_decay * params` to the gradient, as PyTorch's
  `weight_decay` does, except to a cosine head's `log_scale` (decay would
  pull the scale to 1). `clip_norm` clips the gradient's global norm first.
  `rate_multipliers` scales the updates of top-level parameter groups, e.g.
  `{'loss': 100.0}` for a metric loss's proxies (Kim et al. 2020 train
  Proxy-Anchor's proxies 100x faster); the optimizer state is unchanged.
  """
  lr = _schedule(learning_rate, schedule, decay_every, decay_factor,
                 warmup_steps, num_steps, decay_start)
  if name == 'adam':
    tx = optax.adam(lr)
  elif name == 'adamw':
    tx = optax.adamw(lr, weight_decay=weight_decay)
  elif name == 'sgd':
    tx = optax.sgd(lr, momentum=0.9)
  else:
    raise ValueError(f'Unknown optimizer {name!r}: adam, adamw, sgd.')
  # Decay, then clipping, then the update: the order (and so the optimizer
  # state's structure) of the supervised pretraining runs before it shared
  # this factory, whose checkpoints must keep resuming.
  if clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  if weight_decay and name != 'adamw':
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_not_log_scale), tx)
  if rate_multipliers:
    tx = _scale_groups(tx, dict(rate_multipliers))
  return tx


def _scale_groups(tx: optax.GradientTransformation,
                  multipliers: dict[str, float]
                  ) -> optax.GradientTransformation:
  """`tx` with the updates of `params[group]` times `multipliers[group]`.

  The state is `tx`'s own (not wrapped in a chain), so a run resumes and a
  workdir evaluates whether or not its config sets multipliers.
  """

  def check(tree):
    missing = sorted(set(multipliers) - set(tree))
    if missing:
      raise ValueError(f'rate_multipliers names {missing}, which the '
                       f'parameters do not have; they have {sorted(tree)}.')

  def init(params):
    check(params)
    return tx.init(params)

  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    check(updates)
    return {k: jax.tree.map(lambda u, m=multipliers.get(k, 1.0): u * m, v)
            for k, v in updates.items()}, state

  return optax.GradientTransformation(init, update)


__all__ = ['INNER_OPTIMIZERS', 'InnerOptimizer', 'inner_optimizer',
           'make_optimizer']
