"""Self-training with confidence-thresholded pseudo-labels (FixMatch-style)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def pseudo_label_loss(weak_logits_BxC: jax.Array,
                      strong_logits_BxC: jax.Array, threshold: float = 0.95
                      ) -> tuple[jax.Array, jax.Array]:
  """`(loss, mask_rate)` of FixMatch's unlabelled term (Sohn et al. 2020).

  The pseudo-label of each example is the argmax of its weakly augmented
  view's prediction (no gradient); examples whose top probability reaches
  `threshold` contribute the cross-entropy of their strongly augmented
  view against it. The loss is averaged over all B examples; `mask_rate`
  is the share above the threshold.
  """
  probabilities = jax.nn.softmax(jax.lax.stop_gradient(weak_logits_BxC), -1)
  confidence = jnp.max(probabilities, axis=-1)
  pseudo_labels = jnp.argmax(probabilities, axis=-1)
  mask = (confidence >= threshold).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(strong_logits_BxC,
                                                           pseudo_labels)
  return jnp.mean(mask * losses), jnp.mean(mask)


__all__ = ['pseudo_label_loss']
