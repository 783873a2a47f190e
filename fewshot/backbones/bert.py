"""A BERT sentence encoder (Devlin et al. 2019; Reimers & Gurevych 2019).

`BertEncoder` maps token ids `[B, L]` (int32, padded with `pad_id` on the
right) to sentence embeddings `[B, D]`: word, position and token-type
embeddings, `num_layers` post-LayerNorm transformer layers (GELU, as
Hugging Face's `BertModel` computes them), then mean pooling over the
non-padding tokens and, by default, L2 normalisation -- the recipe of
sentence-transformers' all-MiniLM-L6-v2. The attention mask is derived
from the ids (`ids != pad_id`), so a text dataset is one int32 array and
every episode sampler, probe and algorithm runs on it unchanged.

Pretrained weights: `fewshot.backbones.text_weights` ('minilm_l6',
'all_minilm_l6_v2'). Dropout is off by default (the `Backbone` interface
passes no random key); `dropout_rate > 0` needs a 'dropout' rng.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ('mean', 'cls')
# A large negative attention logit for padding keys (finite, so that a row
# of padding never produces NaNs).
_MASKED = -1e9


class SelfAttention(nn.Module):
  """Multi-head self-attention with a key padding mask."""
  num_heads: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, hidden_BxLxD: jax.Array, mask_BxL: jax.Array,
               train: bool) -> jax.Array:
    batch, length, width = hidden_BxLxD.shape
    if width % self.num_heads:
      raise ValueError(f'hidden size {width} is not divisible by '
                       f'{self.num_heads} heads.')
    head_dim = width // self.num_heads

    def heads(name):
      projected = nn.Dense(width, name=name)(hidden_BxLxD)
      return projected.reshape(batch, length, self.num_heads, head_dim)

    query, key, value = heads('query'), heads('key'), heads('value')
    logits = jnp.einsum('bqhd,bkhd->bhqk', query, key) / math.sqrt(head_dim)
    logits = jnp.where(mask_BxL[:, None, None, :], logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    return nn.Dense(width, name='output')(context.reshape(batch, length,
                                                          width))


class TransformerLayer(nn.Module):
  """Attention and a GELU MLP, each followed by residual + LayerNorm."""
  num_heads: int
  intermediate_size: int
  layer_norm_epsilon: float
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, hidden_BxLxD: jax.Array, mask_BxL: jax.Array,
               train: bool) -> jax.Array:
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    attended = SelfAttention(self.num_heads, self.dropout_rate,
                             name='attention')(hidden_BxLxD, mask_BxL, train)
    hidden_BxLxD = nn.LayerNorm(self.layer_norm_epsilon,
                                name='attention_norm')(
                                    hidden_BxLxD + dropout(attended))
    expanded = nn.gelu(nn.Dense(self.intermediate_size,
                                name='intermediate')(hidden_BxLxD),
                       approximate=False)
    output = nn.Dense(hidden_BxLxD.shape[-1], name='output')(expanded)
    return nn.LayerNorm(self.layer_norm_epsilon, name='output_norm')(
        hidden_BxLxD + dropout(output))


class Embeddings(nn.Module):
  """Word + position + token-type (always type 0) embeddings, LayerNorm."""
  vocab_size: int
  hidden_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_epsilon: float

  @nn.compact
  def __call__(self, ids_BxL: jax.Array) -> jax.Array:
    length = ids_BxL.shape[1]
    if length > self.max_positions:
      raise ValueError(f'Sequences of {length} tokens exceed the position '
                       f'table of {self.max_positions}; encode the text with '
                       f'max_length <= {self.max_positions}.')
    words = nn.Embed(self.vocab_size, self.hidden_size,
                     name='word_embeddings')(ids_BxL)
    positions = nn.Embed(self.max_positions, self.hidden_size,
                         name='position_embeddings')(jnp.arange(length))
    types = nn.Embed(self.type_vocab_size, self.hidden_size,
                     name='token_type_embeddings')(jnp.zeros((), jnp.int32))
    return nn.LayerNorm(self.layer_norm_epsilon, name='layer_norm')(
        words + positions[None] + types[None, None])


class BertEncoder(nn.Module):
  """Token ids `[B, L]` -> sentence embeddings `[B, hidden_size]`.

  The defaults are MiniLM-L6-H384 (all-MiniLM-L6-v2). Submodules:
  `embeddings`, `layer_0` ... `layer_{num_layers-1}` (each with
  `attention/{query,key,value,output}`, `attention_norm`, `intermediate`,
  `output`, `output_norm`), the paths LoRA and adapters select.

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
      max_positions, type_vocab_size, layer_norm_epsilon: the BERT shape.
    pad_id: the padding token; positions holding it are masked out of
      attention and pooling.
    pooling: 'mean' over the non-padding tokens, or 'cls' (the first).
    normalize: L2-normalise the pooled embedding.
    dropout_rate: dropout on attention weights and residual branches in
      training mode (needs a 'dropout' rng when > 0).
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_epsilon: float = 1e-12
  pad_id: int = 0
  pooling: str = 'mean'
  normalize: bool = True
  dropout_rate: float = 0.0

  def token_states(self, ids_BxL: jax.Array, train: bool = False
                   ) -> jax.Array:
    """The last layer's token states `[B, L, hidden_size]`."""
    return self._encode(ids_BxL, train)[0]

  @nn.compact
  def _encode(self, ids_BxL, train):
    if ids_BxL.ndim != 2 or not jnp.issubdtype(ids_BxL.dtype, jnp.integer):
      raise ValueError(f'BertEncoder takes integer token ids [B, L], got '
                       f'{ids_BxL.dtype} {ids_BxL.shape}.')
    mask_BxL = ids_BxL != self.pad_id
    hidden = Embeddings(self.vocab_size, self.hidden_size, self.max_positions,
                        self.type_vocab_size, self.layer_norm_epsilon,
                        name='embeddings')(ids_BxL)
    hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(hidden)
    for i in range(self.num_layers):
      hidden = TransformerLayer(self.num_heads, self.intermediate_size,
                                self.layer_norm_epsilon, self.dropout_rate,
                                name=f'layer_{i}')(hidden, mask_BxL, train)
    return hidden, mask_BxL

  def __call__(self, ids_BxL: jax.Array, train: bool = False) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise ValueError(f'pooling must be one of {POOLINGS}, got '
                       f'{self.pooling!r}.')
    hidden, mask_BxL = self._encode(ids_BxL, train)
    if self.pooling == 'cls':
      pooled = hidden[:, 0]
    else:
      weights = mask_BxL.astype(hidden.dtype)[..., None]
      pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    if self.normalize:
      # sentence-transformers' Normalize: x / max(||x||, 1e-12).
      norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


# Flax submodule -> Hugging Face `BertModel` module inside a layer.
_IN_LAYER = {
    ('attention', 'query'): 'attention.self.query',
    ('attention', 'key'): 'attention.self.key',
    ('attention', 'value'): 'attention.self.value',
    ('attention', 'output'): 'attention.output.dense',
    ('attention_norm',): 'attention.output.LayerNorm',
    ('intermediate',): 'intermediate.dense',
    ('output',): 'output.dense',
    ('output_norm',): 'output.LayerNorm',
}
_IN_EMBEDDINGS = {
    'word_embeddings': 'word_embeddings',
    'position_embeddings': 'position_embeddings',
    'token_type_embeddings': 'token_type_embeddings',
    'layer_norm': 'LayerNorm',
}


def torch_prefix(module_path: tuple[str, ...]) -> str:
  """Flax module path -> Hugging Face BERT module name, e.g.

  `('layer_2', 'attention', 'query')` -> `'encoder.layer.2.attention.self.query'`.
  """
  names = tuple(module_path)
  if len(names) == 2 and names[0] == 'embeddings' and names[1] in _IN_EMBEDDINGS:
    return f'embeddings.{_IN_EMBEDDINGS[names[1]]}'
  if names and names[0].startswith('layer_') and names[1:] in _IN_LAYER:
    return f'encoder.layer.{names[0][len("layer_"):]}.{_IN_LAYER[names[1:]]}'
  raise ValueError(f'No Hugging Face name for flax module {"/".join(names)}.')
