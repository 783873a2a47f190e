"""Early stopping on a validation metric, as a small pure state."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class EarlyStopping:
  """Tracks the best value of a metric to maximise (e.g. validation accuracy).

  Pure: `update` returns a new state. It works on the host with Python
  numbers and inside `jit`/`lax` loops with arrays alike.

      stopper = EarlyStopping.create(patience=5)
      for step in ...:
        stopper = stopper.update(step, validation_accuracy)
        if stopper.improved: save_checkpoint()
        if stopper.should_stop: break

  Attributes:
    best: the best value seen so far (-inf before the first update).
    best_step: the step at which `best` was seen (-1 before).
    step: the step of the latest update.
    improved: whether the latest update set a new best.
    patience: how many steps without improvement to tolerate (in the units of
      `step`, so with validation every 100 steps, `patience=500` allows five
      evaluations without improvement).
    min_delta: how much larger than `best` a value must be to count.
  """
  best: jax.Array
  best_step: jax.Array
  step: jax.Array
  improved: jax.Array
  patience: int = flax.struct.field(pytree_node=False, default=10)
  min_delta: float = flax.struct.field(pytree_node=False, default=0.0)

  @classmethod
  def create(cls, patience: int, min_delta: float = 0.0) -> EarlyStopping:
    return cls(best=jnp.asarray(-jnp.inf, jnp.float32),
               best_step=jnp.asarray(-1, jnp.int32),
               step=jnp.asarray(-1, jnp.int32),
               improved=jnp.asarray(False), patience=patience,
               min_delta=min_delta)

  def update(self, step: jax.typing.ArrayLike,
             value: jax.typing.ArrayLike) -> EarlyStopping:
    """Records `value` (the metric at `step`)."""
    value = jnp.asarray(value, jnp.float32)
    step = jnp.asarray(step, jnp.int32)
    improved = value > self.best + self.min_delta
    return self.replace(best=jnp.where(improved, value, self.best),
                        best_step=jnp.where(improved, step, self.best_step),
                        step=step, improved=improved)

  @property
  def should_stop(self) -> jax.Array:
    """True once `patience` steps have passed since the best value."""
    return (self.best_step >= 0) & (self.step - self.best_step >= self.patience)
