"""The `Objective` interface, the train state, and the one generic training step.

An objective is what a training run needs from a method, as pure functions:

* `init(key, data) -> (params, model_state, run_key)`: fresh parameters and
  model state (BatchNorm statistics), and the run's key, from `key(seed)`;
* `sample(run_key, step, data) -> batch`: the step's batch, drawn on the
  device from the run key and the step number (usually from
  `fold_in(run_key, step)`; an epoch sampler also needs the run key), so a
  resumed run draws exactly the batches an uninterrupted one would. Every
  leaf of the batch has the batch (or task) axis first: the harness shards
  that axis over the devices;
* `loss(params, model_state, batch, key) -> (loss, (metrics, model_state))`
  with scalar metrics (at least `loss`); `key` is `fold_in(run_key, step)`;
* `value_and_grad` (optional): the loss's value and gradient computed the
  objective's own way (per-task gradients of a meta-batch, gradient
  surgery over several tasks); by default `jax.value_and_grad(loss)`;
* `unit`: what one element of the batch axis is ('episodes', 'images'),
  for the throughput log, and `batch_size_name` the option that sets the
  axis's length ('meta_batch_size', 'batch_size'), for error messages;
* `batch_units` (optional): the number of `unit`s in a batch, for a batch
  whose leaves have different leading axes (several streams of a
  multi-task objective); by default the one leading axis all leaves share.

`make_train_step` turns any objective and an optax optimizer into one
jittable step, which reports whether it was finite; the harness
(`fewshot.harness`) runs it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from fewshot.backbones.base import ModelState, Params

Batch = Any        # a pytree whose leaves share a leading batch axis
DeviceData = Any   # the training data on the device (a pytree)
Metrics = dict[str, jax.Array]
LossOutput = tuple[jax.Array, tuple[Metrics, ModelState]]

InitFn = Callable[[jax.Array, DeviceData], tuple[Params, ModelState, jax.Array]]
SampleFn = Callable[[jax.Array, jax.Array, DeviceData], Batch]
LossFn = Callable[[Params, ModelState, Batch, jax.Array], LossOutput]
ValueAndGradFn = Callable[[Params, ModelState, Batch, jax.Array],
                          tuple[LossOutput, Params]]


class Objective(NamedTuple):
  """A training objective as pure functions (see the module docstring)."""
  init: InitFn
  sample: SampleFn
  loss: LossFn
  value_and_grad: ValueAndGradFn | None = None
  unit: str = 'examples'
  batch_size_name: str = 'batch_size'
  batch_units: Callable[[Batch], int] | None = None


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, as arrays only (checkpointable)."""
  step: jax.Array         # [] int32, number of completed steps
  params: Any
  model_state: Any        # BatchNorm running statistics, if any
  opt_state: Any
  rng: jax.Array          # raw key data of the run key


def init_state(objective: Objective, optimizer: optax.GradientTransformation,
               data: DeviceData, seed: int) -> TrainState:
  """A fresh `TrainState` from `objective.init(key(seed), data)`.

  A leaf that is the same array as an earlier one (an `init` that put one
  `zeros` in two places) is copied: the train step donates every leaf.
  """
  params, model_state, run_key = objective.init(jax.random.key(seed), data)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     model_state=model_state,
                     opt_state=optimizer.init(params),
                     rng=jax.random.key_data(run_key))
  seen = set()

  def distinct(leaf):
    if id(leaf) in seen:
      return jnp.array(leaf, copy=True)
    seen.add(id(leaf))
    return leaf

  return jax.tree.map(distinct, state)


def make_train_step(objective: Objective,
                    optimizer: optax.GradientTransformation,
                    batch_sharding: NamedSharding | None = None, *,
                    skip_nonfinite: bool = False
                    ) -> Callable[[TrainState, DeviceData],
                                  tuple[TrainState, Metrics]]:
  """Builds `train_step(state, data) -> (state, metrics)`; jit it once.

  The step samples its batch on the device, constrains it to
  `batch_sharding` (the batch axis split over a mesh) if given, takes the
  gradient, applies `optimizer` and adds two metrics: `grad_norm`, and
  `nonfinite` (1 if the loss or the gradient norm is NaN or infinite, else
  0), computed in the step so that the host reads them with the others.

  With `skip_nonfinite`, a non-finite step leaves the parameters, model
  state (BatchNorm statistics) and optimizer state as they were (the step
  counter still advances, so the next step draws the next batch). Unlike
  `optax.apply_if_finite`, which looks at the gradients only, this also
  keeps the running statistics of a forward pass that overflowed.
  """
  value_and_grad = objective.value_and_grad or jax.value_and_grad(
      objective.loss, has_aux=True)

  def train_step(state: TrainState, data: DeviceData):
    run_key = jax.random.wrap_key_data(state.rng)
    batch = objective.sample(run_key, state.step, data)
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    (loss, (metrics, model_state)), grads = value_and_grad(
        state.params, state.model_state, batch,
        jax.random.fold_in(run_key, state.step))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      params, model_state, opt_state = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old),
          (params, model_state, opt_state),
          (state.params, state.model_state, state.opt_state))
    metrics = dict(metrics, grad_norm=grad_norm,
                   nonfinite=jnp.logical_not(finite).astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params,
                         model_state=model_state,
                         opt_state=opt_state), metrics

  return train_step


__all__ = ['Batch', 'DeviceData', 'InitFn', 'LossFn', 'Metrics', 'Objective',
           'SampleFn', 'TrainState', 'ValueAndGradFn', 'init_state',
           'make_train_step']
