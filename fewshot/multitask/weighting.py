"""Loss weighting and gradient combination for multi-task training.

A `Weighting` turns the `[T]` task losses (and, if it `needs_gram`, the
`[T, T]` Gram matrix of the task gradients of the shared parameters) into
a `Combination`: coefficients `c` such that the shared parameters' update
direction is `sum_t c_t g_t`, the factor each task's own head gradient is
scaled by, and a loss over the weighting's own parameters (uncertainty's
log-variances, GradNorm's weights) that the optimizer minimises with the
rest of the model. Every method's direction is a combination of the task
gradients, so nothing here touches a parameter-sized array
(`fewshot.multitask.gradients` does that once).

The methods and their definitions follow LibMTL (Lin and Zhang 2023):

* `equal`: the sum of the task losses (LibMTL's EW);
* `fixed`: given weights, rescaled to sum to `T`;
* `uncertainty`: `sum_t L_t / (2 exp(s_t)) + s_t / 2` with learned
  log-variances `s` (Kendall et al. 2018);
* `dwa`: `T softmax(r / temperature)`, `r_t` the ratio of task `t`'s mean
  loss over the last two windows of `period` steps (an epoch in LibMTL;
  Liu et al. 2019); equal weights for the first two windows;
* `gradnorm`: weights `T softmax(p)` trained on `sum_t |w_t |g_t| -
  mean(w |g|) r_t^alpha|`, `r_t` the loss ratio to the first window's
  mean relative to the other tasks' (Chen et al. 2018); equal weights for
  the first window;
* `pcgrad`: each task gradient projected off the others it conflicts with,
  in a random order, then summed (Yu et al. 2020);
* `cagrad`: `g0 + (c |g0| / |g_w|) g_w` over the mean gradient `g0`, `w`
  minimising `g_w . g0 + c |g0| |g_w|` (Liu et al. 2021), divided by
  `1 + c^2` (`rescale=1`, the default), `1 + c` (2) or 1 (0);
* `mgda`: the min-norm point of the (optionally normalised) task
  gradients' convex hull (Sener and Koltun 2018; on the parameter
  gradients, LibMTL's `rep_grad=False`).

Heads: a loss-weighting method (equal, fixed, uncertainty, DWA, GradNorm)
optimises a weighted loss, so head `t` gets `w_t` times its gradient;
gradient surgery (PCGrad, CAGrad, MGDA) acts on the shared parameters
only and every head gets its own unweighted gradient, as in LibMTL.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fewshot._utils import check_options
from fewshot.multitask.simplex import cagrad_weights, min_norm_weights

Params = Any
State = Any


class Combination(NamedTuple):
  """One step's combination of the task gradients (see the module docstring).

  Attributes:
    shared: `[T]` coefficients of the task gradients of the shared
      parameters.
    heads: `[T]` factor of each task head's own gradient.
    loss: the weighting's own loss, differentiable in its parameters (0
      for methods without parameters).
    state: the weighting's next state.
  """
  shared: jax.Array
  heads: jax.Array
  loss: jax.Array
  state: State


class Weighting(NamedTuple):
  """A multi-task weighting method as pure functions.

  `init(num_tasks) -> (params, state)`; `combine(params, state, losses [T],
  gram [T, T] or None, key) -> Combination`; `needs_gram` says whether
  `combine` reads the Gram matrix of the task gradients (only then are
  per-task gradients computed). `losses` arrive without gradient.
  """
  name: str
  init: Callable[[int], tuple[Params, State]]
  combine: Callable[[Params, State, jax.Array, jax.Array | None, jax.Array],
                    Combination]
  needs_gram: bool = False


def _stop(x):
  return jax.lax.stop_gradient(x)


def equal() -> Weighting:
  """The sum of the task losses."""
  def combine(params, state, losses, gram, key):
    del params, gram, key
    ones = jnp.ones_like(losses)
    return Combination(ones, ones, jnp.zeros(()), state)
  return Weighting('equal', lambda num_tasks: ({}, {}), combine)


def fixed(weights: Sequence[float]) -> Weighting:
  """Fixed task weights, rescaled to sum to the number of tasks."""
  weights = tuple(float(w) for w in weights)
  if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
    raise ValueError(f'Fixed task weights must be finite, non-negative and '
                     f'sum to a positive number; got {weights}.')

  def init(num_tasks):
    if num_tasks != len(weights):
      raise ValueError(f'{len(weights)} fixed weights for {num_tasks} tasks.')
    return {}, {}

  def combine(params, state, losses, gram, key):
    del params, gram, key
    w = jnp.asarray(weights, losses.dtype)
    w = w * (len(weights) / jnp.sum(w))
    return Combination(w, w, jnp.zeros(()), state)
  return Weighting('fixed', init, combine)


def uncertainty(init_log_variance: float = 0.0) -> Weighting:
  """Homoscedastic uncertainty weighting with learned log-variances `s`."""
  def init(num_tasks):
    return {'log_variance': jnp.full((num_tasks,), init_log_variance,
                                     jnp.float32)}, {}

  def combine(params, state, losses, gram, key):
    del gram, key
    s = params['log_variance']
    precision = 0.5 * jnp.exp(-s)
    loss = jnp.sum(_stop(losses) * precision + 0.5 * s)
    w = _stop(precision)
    return Combination(w, w, loss, state)
  return Weighting('uncertainty', init, combine)


def _check_period(period: int) -> None:
  if int(period) != period or period < 1:
    raise ValueError(f'period must be a positive number of steps, got '
                     f'{period!r}.')


def _init_history(num_tasks: int) -> dict[str, jax.Array]:
  """Mean task losses of completed windows of steps, and the running sum."""
  # Distinct arrays: the train step donates the state, leaf by leaf.
  zeros = lambda: jnp.zeros((num_tasks,), jnp.float32)
  return {'sum': zeros(), 'count': jnp.zeros((), jnp.int32),
          'windows': jnp.zeros((), jnp.int32), 'first': zeros(),
          'last': zeros(), 'before_last': zeros()}


def _update_history(history, losses, period):
  """Adds this step's losses; closes the window every `period` steps."""
  total = history['sum'] + losses
  count = history['count'] + 1
  closed = count == period
  mean = total / period
  return {
      'sum': jnp.where(closed, 0.0, total),
      'count': jnp.where(closed, 0, count),
      'windows': history['windows'] + closed.astype(jnp.int32),
      'first': jnp.where(closed & (history['windows'] == 0), mean,
                         history['first']),
      'last': jnp.where(closed, mean, history['last']),
      'before_last': jnp.where(closed, history['last'],
                               history['before_last']),
  }


def dwa(period: int, temperature: float = 2.0) -> Weighting:
  """Dynamic weight average over windows of `period` steps (an epoch)."""
  _check_period(period)

  def combine(params, state, losses, gram, key):
    del params, gram, key
    num_tasks = losses.shape[0]
    ratio = state['last'] / jnp.where(state['before_last'] > 0,
                                      state['before_last'], 1.0)
    w = num_tasks * jax.nn.softmax(ratio / temperature)
    w = jnp.where(state['windows'] >= 2, w, jnp.ones_like(w))
    return Combination(w, w, jnp.zeros(()),
                       _update_history(state, losses, period))
  return Weighting('dwa', lambda num_tasks: ({}, _init_history(num_tasks)),
                   combine)


def gradnorm(period: int, alpha: float = 1.5) -> Weighting:
  """GradNorm on the shared parameters' task gradients.

  The initial losses `L_t(0)` are the first window's means (LibMTL's first
  epoch); until that window closes the weights are equal.
  """
  _check_period(period)

  def init(num_tasks):
    return ({'logits': jnp.zeros((num_tasks,), jnp.float32)},
            _init_history(num_tasks))

  def combine(params, state, losses, gram, key):
    del key
    num_tasks = losses.shape[0]
    w = num_tasks * jax.nn.softmax(params['logits'])
    norms = w * jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
    first = jnp.where(state['first'] > 0, state['first'], 1.0)
    relative = losses / first
    target = _stop(jnp.mean(norms) * (relative / jnp.mean(relative)) ** alpha)
    active = state['windows'] >= 1
    loss = jnp.where(active, jnp.sum(jnp.abs(norms - target)), 0.0)
    w = jnp.where(active, _stop(w), jnp.ones_like(w))
    return Combination(w, w, loss, _update_history(state, losses, period))
  return Weighting('gradnorm', init, combine, needs_gram=True)


def pcgrad_coefficients(gram_TxT: jax.Array, key: jax.Array) -> jax.Array:
  """`[T]` coefficients of `sum_i pc_i` over the task gradients.

  `pc_i` starts at `g_i`; for each `j` in a random order of its own,
  `pc_i -= (pc_i . g_j / |g_j|^2) g_j` when `pc_i . g_j < 0`. With `pc_i =
  sum_k A_ik g_k`, `pc_i . g_j = (A_i G)_j`, so only `A` is updated.
  """
  size = gram_TxT.shape[0]
  eye = jnp.eye(size, dtype=gram_TxT.dtype)
  squared_norms = jnp.diag(gram_TxT)

  def project(row, order):
    def one(position, row):
      j = order[position]
      dot = row @ gram_TxT[:, j]
      coefficient = jnp.where(
          (dot < 0) & (squared_norms[j] > 0),
          dot / jnp.where(squared_norms[j] > 0, squared_norms[j], 1.0), 0.0)
      return row - coefficient * eye[j]
    return jax.lax.fori_loop(0, size, one, row)

  orders = jax.vmap(lambda k: jax.random.permutation(k, size))(
      jax.random.split(key, size))
  return jnp.sum(jax.vmap(project)(eye, orders), axis=0)


def pcgrad() -> Weighting:
  """Projecting conflicting gradients, summed over the tasks."""
  def combine(params, state, losses, gram, key):
    del params
    return Combination(pcgrad_coefficients(gram, key), jnp.ones_like(losses),
                       jnp.zeros(()), state)
  return Weighting('pcgrad', lambda num_tasks: ({}, {}), combine,
                   needs_gram=True)


_CAGRAD_RESCALE = {0: lambda c: 1.0, 1: lambda c: 1.0 + c ** 2,
                   2: lambda c: 1.0 + c}


def cagrad(c: float = 0.5, rescale: int = 1, iterations: int = 200
           ) -> Weighting:
  """Conflict-averse gradient descent (LibMTL's `calpha`, `rescale`)."""
  if c < 0:
    raise ValueError(f'CAGrad needs c >= 0, got {c}.')
  if rescale not in _CAGRAD_RESCALE:
    raise ValueError(f'CAGrad rescale must be one of '
                     f'{sorted(_CAGRAD_RESCALE)}, got {rescale!r}.')
  divisor = _CAGRAD_RESCALE[rescale](c)

  def combine(params, state, losses, gram, key):
    del params, key
    num_tasks = losses.shape[0]
    mean_norm = jnp.sqrt(jnp.mean(gram) + 1e-8)
    radius = c * mean_norm + 1e-8
    w = cagrad_weights(gram, radius, iterations)
    gw_norm = jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))
    shared = (1.0 / num_tasks + radius / (gw_norm + 1e-8) * w) / divisor
    if c == 0:
      shared = jnp.full_like(losses, 1.0 / num_tasks)
    return Combination(shared, jnp.ones_like(losses), jnp.zeros(()), state)
  return Weighting('cagrad', lambda num_tasks: ({}, {}), combine,
                   needs_gram=True)


_MGDA_NORMALIZATIONS = ('none', 'l2', 'loss', 'loss+')


def mgda(normalization: str = 'none', iterations: int = 100) -> Weighting:
  """The min-norm combination of the task gradients (MGDA, on parameters).

  `normalization` divides `g_t` first by 1 ('none'), `|g_t|` ('l2'), `L_t`
  ('loss') or `L_t |g_t|` ('loss+'), as LibMTL's `mgda_gn`.
  """
  if normalization not in _MGDA_NORMALIZATIONS:
    raise ValueError(f'MGDA normalization must be one of '
                     f'{_MGDA_NORMALIZATIONS}, got {normalization!r}.')

  def combine(params, state, losses, gram, key):
    del params, key
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 1e-30))
    divisor = {'none': jnp.ones_like(losses), 'l2': norms, 'loss': losses,
               'loss+': losses * norms}[normalization]
    scaled_gram = gram / (divisor[:, None] * divisor[None, :])
    w = min_norm_weights(scaled_gram, iterations)
    return Combination(w / divisor, jnp.ones_like(losses), jnp.zeros(()),
                       state)
  return Weighting('mgda', lambda num_tasks: ({}, {}), combine,
                   needs_gram=True)


WEIGHTINGS = {
    'cagrad': cagrad,
    'dwa': dwa,
    'equal': equal,
    'fixed': fixed,
    'gradnorm': gradnorm,
    'mgda': mgda,
    'pcgrad': pcgrad,
    'uncertainty': uncertainty,
}


def make_weighting(name: str, **options: Any) -> Weighting:
  """The weighting method `name` (a key of `WEIGHTINGS`) with its options."""
  if name not in WEIGHTINGS:
    raise ValueError(f'Unknown multi-task weighting {name!r}; known: '
                     f'{sorted(WEIGHTINGS)}.')
  check_options(WEIGHTINGS[name], options, f'weighting {name!r}')
  return WEIGHTINGS[name](**options)


__all__ = ['Combination', 'WEIGHTINGS', 'Weighting', 'cagrad', 'dwa', 'equal',
           'fixed', 'gradnorm', 'make_weighting', 'mgda', 'pcgrad',
           'pcgrad_coefficients', 'uncertainty']
