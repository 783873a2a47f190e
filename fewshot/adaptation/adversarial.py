"""Adversarial domain adaptation: gradient reversal, DANN and CDAN.

DANN (Ganin et al. 2016) trains a domain discriminator on the features and
the encoder against it through a gradient reversal layer, whose coefficient
rises from 0 to 1 over training (`dann_coefficient`). CDAN (Long et al.
2018) conditions the discriminator on the classifier's predictions through
the multilinear map `g (x) f` (randomized when `C * D` is large); CDAN+E
weights each example by `1 + exp(-H(g))`, so confident predictions count
more. Definitions follow the Transfer-Learning-Library (TLlib).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fewshot.adaptation.confusion import entropy
from fewshot.heads import init_head, linear_logits


@jax.custom_vjp
def gradient_reversal(x: jax.Array, coefficient: jax.Array) -> jax.Array:
  """The identity forward; the backward pass multiplies the cotangent by
  `-coefficient` (no gradient reaches `coefficient`)."""
  del coefficient
  return x


def _reversal_forward(x, coefficient):
  return x, coefficient


def _reversal_backward(coefficient, cotangent):
  return (-coefficient * cotangent, jnp.zeros_like(coefficient))


gradient_reversal.defvjp(_reversal_forward, _reversal_backward)


def dann_coefficient(step: jax.Array, warmup_steps: int, *,
                     gamma: float = 10.0, low: float = 0.0,
                     high: float = 1.0) -> jax.Array:
  """Ganin et al.'s schedule `low + (high - low) (2 / (1 + exp(-gamma p)) - 1)`
  with progress `p = min(step / warmup_steps, 1)`."""
  progress = jnp.minimum(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1),
                         1.0)
  return low + (high - low) * (2.0 / (1.0 + jnp.exp(-gamma * progress)) - 1.0)


def init_discriminator(key: jax.Array, input_dim: int, width: int = 1024,
                       depth: int = 2) -> list[dict[str, jax.Array]]:
  """An MLP `input_dim -> width (ReLU) x depth -> 1` of `nn.Linear` inits."""
  sizes = [input_dim] + [width] * depth + [1]
  keys = jax.random.split(key, len(sizes) - 1)
  return [init_head(k, fan_in, fan_out)
          for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:])]


def discriminator_logits(layers: list[dict[str, jax.Array]],
                         features_BxD: jax.Array) -> jax.Array:
  """`[B]` domain logits (positive: source) of `init_discriminator`'s MLP."""
  x = features_BxD
  for layer in layers[:-1]:
    x = jax.nn.relu(linear_logits(x, layer))
  return linear_logits(x, layers[-1])[:, 0]


def domain_adversarial_loss(source_logits_B: jax.Array,
                            target_logits_B: jax.Array,
                            weights_2B: jax.Array | None = None
                            ) -> tuple[jax.Array, jax.Array]:
  """`(loss, accuracy)` of the discriminator: source is 1, target 0.

  The loss is the binary cross-entropy averaged over both domains (each
  example weighted by `weights_2B`, source first, if given); the accuracy
  is the share of examples whose domain the discriminator gets right.
  """
  logits = jnp.concatenate([source_logits_B, target_logits_B])
  domains = jnp.concatenate([jnp.ones_like(source_logits_B),
                             jnp.zeros_like(target_logits_B)])
  losses = optax.sigmoid_binary_cross_entropy(logits, domains)
  if weights_2B is not None:
    losses = losses * weights_2B
  accuracy = jnp.mean((logits > 0) == (domains > 0.5))
  return jnp.mean(losses), accuracy


def multilinear_map(features_BxD: jax.Array, predictions_BxC: jax.Array,
                    projections: tuple[jax.Array, jax.Array] | None = None
                    ) -> jax.Array:
  """CDAN's conditioning of features on predictions.

  Without `projections`, the flattened outer product `[B, C * D]`; with
  `(R_f [D, K], R_g [C, K])` (fixed Gaussian matrices), the randomized
  multilinear map `(f R_f) * (g R_g) / sqrt(K)`, `[B, K]`.
  """
  if projections is None:
    outer = predictions_BxC[:, :, None] * features_BxD[:, None, :]
    return outer.reshape(features_BxD.shape[0], -1)
  feature_projection, prediction_projection = projections
  dim = feature_projection.shape[1]
  return ((features_BxD @ feature_projection)
          * (predictions_BxC @ prediction_projection)) / jnp.sqrt(dim)


def cdan_entropy_weights(predictions_BxC: jax.Array) -> jax.Array:
  """CDAN+E's `[B]` weights `1 + exp(-H(p))`, rescaled to sum to B."""
  weights = 1.0 + jnp.exp(-entropy(predictions_BxC))
  return weights / jnp.sum(weights) * weights.shape[0]


__all__ = ['cdan_entropy_weights', 'dann_coefficient', 'discriminator_logits',
           'domain_adversarial_loss', 'gradient_reversal',
           'init_discriminator', 'multilinear_map']
