"""Minimum class confusion (MCC, Jin et al. 2020) and prediction entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def entropy(probabilities_BxC: jax.Array, epsilon: float = 1e-5) -> jax.Array:
  """`[B]` entropies `-sum_c p_c log(p_c + epsilon)` of probability rows."""
  return -jnp.sum(probabilities_BxC * jnp.log(probabilities_BxC + epsilon),
                  axis=-1)


def minimum_class_confusion(logits_BxC: jax.Array,
                            temperature: float = 2.5) -> jax.Array:
  """MCC's loss on unlabelled (target) logits.

  Predictions `p = softmax(logits / temperature)` weighted per example by
  `1 + exp(-H(p))` (rescaled to sum to B, no gradient through the weight)
  give the class-confusion matrix `(w p)^T p` `[C, C]`; each row is
  normalised to sum to 1, and the loss is the off-diagonal mass over C.
  """
  num_examples, num_classes = logits_BxC.shape
  predictions = jax.nn.softmax(logits_BxC / temperature, axis=-1)
  weights = 1.0 + jnp.exp(-jax.lax.stop_gradient(entropy(predictions)))
  weights = num_examples * weights / jnp.sum(weights)
  confusion = (predictions * weights[:, None]).T @ predictions
  confusion = confusion / jnp.sum(confusion, axis=1, keepdims=True)
  return (jnp.sum(confusion) - jnp.trace(confusion)) / num_classes


__all__ = ['entropy', 'minimum_class_confusion']
