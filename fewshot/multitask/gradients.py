"""Per-task gradients in one pass, their Gram matrix, and their combinations.

A multi-task loss is a function `params -> [T]` task losses. `task_gradients`
takes one forward pass and applies its VJP to the `T` one-hot cotangents
(reverse-mode Jacobian), batched by `vmap` or as `T` pullbacks of the same
forward pass inside the one compiled program (faster on XLA:CPU), so the
per-task gradients of a network cost one forward and `T` backward passes
and never a host round trip per task.
Every gradient-combination method here (PCGrad, CAGrad, MGDA, GradNorm)
needs the task gradients only through their `[T, T]` inner products, and
its result is a combination `sum_t c_t g_t` of them: `gram_matrix` and
`combine` are the only operations on the (large) per-task gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fewshot.ops import paths

Params = Any


def task_gradients(losses_fn: Callable[[Params], tuple[jax.Array, Any]],
                   params: Params, *, batched: bool | None = None
                   ) -> tuple[tuple[jax.Array, Any], Params]:
  """`((losses [T], aux), grads)` where `grads` has leaves `[T, *leaf]`.

  `losses_fn(params) -> (losses [T], aux)`. Row `t` of every leaf of
  `grads` is the gradient of `losses[t]` (equal to `jax.grad` of that one
  loss, tested), from one forward pass and the pullback applied to the `T`
  one-hot cotangents: `vmap`ped (`batched=True`, the default off CPU) or
  as `T` pullbacks in the one compiled program (the CPU default: XLA:CPU
  ran the vmapped backward of a Conv-4 1.6x slower than two pullbacks;
  see WORKSPACE.md, Performance); `fewshot.ops.paths` can force either.
  """
  losses, vjp, aux = jax.vjp(losses_fn, params, has_aux=True)
  if losses.ndim != 1:
    raise ValueError(f'losses_fn must return [T] task losses, got shape '
                     f'{losses.shape}.')
  if batched is None:
    batched = not paths.cpu_paths()
  basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
  if batched:
    (grads,) = jax.vmap(vjp)(basis)
  else:
    rows = [vjp(basis[t])[0] for t in range(losses.shape[0])]
    grads = jax.tree.map(lambda *g: jnp.stack(g), *rows)
  return (losses, aux), grads


def gram_matrix(grads: Params) -> jax.Array:
  """`[T, T]` inner products `<g_s, g_t>` of per-task gradients `[T, ...]`."""
  def leaf_gram(g):
    flat = g.reshape(g.shape[0], -1)
    return jnp.dot(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
  return sum(leaf_gram(g) for g in jax.tree.leaves(grads))


def combine(grads: Params, coefficients_T: jax.Array) -> Params:
  """`sum_t coefficients[t] * grads[t]` for every leaf."""
  return jax.tree.map(
      lambda g: jnp.tensordot(coefficients_T.astype(g.dtype), g, axes=1),
      grads)


__all__ = ['combine', 'gram_matrix', 'task_gradients']
