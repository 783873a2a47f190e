"""Small convex problems over the probability simplex, in the Gram matrix.

MGDA's min-norm point of the task gradients' convex hull and CAGrad's
conflict-averse direction both pick weights `w` on the simplex
`{w >= 0, sum(w) = 1}` by a problem that involves the task gradients only
through their `[T, T]` Gram matrix `G`. These solvers run a fixed number of
iterations under `jit` (no scipy, no host round trip).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def project_to_simplex(y_T: jax.Array) -> jax.Array:
  """The Euclidean projection of `[T]` onto the probability simplex.

  The sort-based algorithm of Held et al. (1974) / Duchi et al. (2008).
  """
  size = y_T.shape[-1]
  sorted_y = jnp.sort(y_T)[::-1]
  cumulative = jnp.cumsum(sorted_y) - 1.0
  index = jnp.arange(1, size + 1, dtype=y_T.dtype)
  support = sorted_y - cumulative / index > 0
  rho = jnp.max(jnp.where(support, jnp.arange(size), 0))
  threshold = cumulative[rho] / (rho + 1).astype(y_T.dtype)
  return jnp.maximum(y_T - threshold, 0.0)


def _segment_minimum(v1v1, v1v2, v2v2):
  """`gamma` in [0, 1] minimising `|(1 - gamma) v1 + gamma v2|^2`."""
  denominator = v1v1 + v2v2 - 2.0 * v1v2
  gamma = jnp.where(denominator > 0,
                    (v1v1 - v1v2) / jnp.where(denominator > 0, denominator, 1),
                    0.0)
  return jnp.clip(gamma, 0.0, 1.0)


def min_norm_weights(gram_TxT: jax.Array, iterations: int = 100) -> jax.Array:
  """`[T]` simplex weights of the min-norm point `min_w |sum_t w_t g_t|^2`.

  Frank-Wolfe with exact line search from the uniform weights (Sener and
  Koltun 2018, Algorithm 2 of MGDA-UB). Each step moves towards the vertex
  of the smallest `(G w)_t`; with two tasks the first step is already the
  closed-form optimum.
  """
  size = gram_TxT.shape[0]
  eye = jnp.eye(size, dtype=gram_TxT.dtype)

  def step(_, w):
    gw = gram_TxT @ w
    vertex = jnp.argmin(gw)
    gamma = _segment_minimum(w @ gw, gw[vertex], gram_TxT[vertex, vertex])
    return (1.0 - gamma) * w + gamma * eye[vertex]

  initial = jnp.full((size,), 1.0 / size, gram_TxT.dtype)
  return jax.lax.fori_loop(0, iterations, step, initial)


def cagrad_objective(w_T: jax.Array, gram_TxT: jax.Array,
                     c: jax.Array) -> jax.Array:
  """CAGrad's dual objective `w^T G b + c * sqrt(w^T G w)`, `b` uniform."""
  mean_gram_T = jnp.mean(gram_TxT, axis=1)
  return w_T @ mean_gram_T + c * jnp.sqrt(w_T @ gram_TxT @ w_T + 1e-8)


def cagrad_weights(gram_TxT: jax.Array, c: jax.Array,
                   iterations: int = 200) -> jax.Array:
  """`[T]` simplex weights minimising `cagrad_objective` (Liu et al. 2021).

  Projected gradient descent with steps `1 / (L sqrt(k + 1))`, `L` the
  largest diagonal entry of `G` (the objective is convex; the best iterate
  is returned).
  """
  size = gram_TxT.shape[0]
  scale = jnp.maximum(jnp.max(jnp.diag(gram_TxT)), 1e-30)
  objective = lambda w: cagrad_objective(w, gram_TxT, c)
  grad = jax.grad(objective)

  def step(k, carry):
    w, best, best_value = carry
    w = project_to_simplex(
        w - grad(w) / (scale * jnp.sqrt(k + 1.0).astype(w.dtype)))
    value = objective(w)
    better = value < best_value
    return (w, jnp.where(better, w, best), jnp.where(better, value,
                                                      best_value))

  initial = jnp.full((size,), 1.0 / size, gram_TxT.dtype)
  _, best, _ = jax.lax.fori_loop(0, iterations, step,
                                 (initial, initial, objective(initial)))
  return best


__all__ = ['cagrad_objective', 'cagrad_weights', 'min_norm_weights',
           'project_to_simplex']
