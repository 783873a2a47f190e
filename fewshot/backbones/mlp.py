"""MLP: a backbone over feature vectors (a frozen network's stored features).

With a data section's `features` (`fewshot.builder.load_splits`) every split
is a frozen backbone's features `[M, D]`, embedded once; any objective then
trains this small network on them: `widths=()` is the identity (the frozen
features themselves), `widths=(128,)` a linear projection, `(512, 128)` a
Linear-ReLU-Linear head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ('relu', 'gelu')


class MLP(nn.Module):
  """`features [B, ...]` -> `[B, widths[-1]]` (or `[B, D]` for `widths=()`).

  Dense layers of the given widths with `activation` between them (none
  after the last, so the output is a linear map of the last hidden layer).
  Inputs are flattened per example and cast to float32.

  Attributes:
    widths: output sizes of the dense layers, in order; empty: identity.
    activation: 'relu' or 'gelu', between layers.
  """
  widths: tuple[int, ...] = ()
  activation: str = 'relu'

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or normalisation state.
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {ACTIVATIONS}, got '
                       f'{self.activation!r}.')
    if jnp.issubdtype(features.dtype, jnp.integer):
      raise ValueError(
          'MLP takes feature vectors (float), got integer inputs of shape '
          f'{features.shape}: images need an image backbone, or a data '
          "section's features to embed them first.")
    x = features.reshape(features.shape[0], -1).astype(jnp.float32)
    act = jax.nn.relu if self.activation == 'relu' else jax.nn.gelu
    for i, width in enumerate(self.widths):
      if i:
        x = act(x)
      x = nn.Dense(int(width), name=f'dense{i}')(x)
    return x
