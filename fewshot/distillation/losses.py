"""The knowledge-distillation loss of Hinton, Vinyals and Dean (2015)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def soft_cross_entropy(logits_BxC: jax.Array, target_probabilities_BxC:
                       jax.Array) -> jax.Array:
  """`[B]` cross-entropies `-sum_c q_c log softmax(logits)_c`."""
  return -jnp.sum(target_probabilities_BxC
                  * jax.nn.log_softmax(logits_BxC, axis=-1), axis=-1)


def kd_loss(student_logits_BxC: jax.Array, teacher_logits_BxC: jax.Array,
            labels_B: jax.Array | None = None, *, temperature: float = 4.0,
            alpha: float = 0.9) -> jax.Array:
  """`alpha tau^2 CE(softmax(t / tau), s / tau) + (1 - alpha) CE(y, s)`.

  The soft term is the cross-entropy of the student's tempered softmax
  against the teacher's (Hinton et al.'s formulation; the KL divergence
  RFS uses differs by the teacher's entropy, a constant with the same
  gradient), scaled by `tau^2` so its gradients keep their size across
  temperatures. The teacher gets no gradient. Without `labels_B` alpha
  must be 1. Averaged over the batch.
  """
  teacher = jax.nn.softmax(
      jax.lax.stop_gradient(teacher_logits_BxC) / temperature, axis=-1)
  soft = soft_cross_entropy(student_logits_BxC / temperature, teacher)
  loss = alpha * temperature ** 2 * jnp.mean(soft)
  if alpha < 1.0:
    if labels_B is None:
      raise ValueError('kd_loss with alpha < 1 needs the labels for its '
                       'hard-label term.')
    loss = loss + (1.0 - alpha) * jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(student_logits_BxC,
                                                        labels_B))
  return loss


__all__ = ['kd_loss', 'soft_cross_entropy']
