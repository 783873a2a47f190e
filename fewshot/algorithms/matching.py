"""Matching networks (Vinyals et al. 2016): attention over the support set.

A query's class distribution is the softmax-attention-weighted sum of the
support labels, the attention being the cosine similarity of embeddings:
`p(n | x) = sum_{i: y_i = n} softmax_i(s * cos(f(x), g(x_i)))`. The logits
returned are `log p(n | x)` (a logsumexp over each class's support
images), so the generic query cross-entropy is the paper's loss.
Without full-context embeddings f = g, the backbone's embedding; the
temperature `s` is learned from `init_scale` unless `learn_scale=False`,
and `init_scale=1, learn_scale=False` is the paper's raw cosine attention.

With `fce=True` (the paper's appendix), each support embedding is read in
the context of the whole support set, `g(x_i) = g'(x_i) + h_i^fwd +
h_i^bwd` from a bidirectional LSTM over the support sequence (in episode
order: class by class), and each query's by an attention LSTM of K steps
over those: `h^_k, c_k = LSTM([f'(x), r_{k-1}], (h_{k-1}, c_{k-1}))`,
`h_k = h^_k + f'(x)`, `r_k = sum_i softmax_i(h_k . g(x_i)) g(x_i)` (so
`r_0`, with `h_0 = 0`, is the mean of the g), and `f(x) = h_K`. The LSTMs have hidden size D (the embedding's) and start
from zero states; with all their weights zero, f and g are the backbone's
embedding again (the test's closed form).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import Backbone
from fewshot.heads import cosine_similarities


def _init_lstm(key: jax.Array, inputs: int, hidden: int) -> dict:
  """An LSTM cell's parameters, PyTorch's init: U(-1/sqrt(H), 1/sqrt(H))."""
  bound = hidden ** -0.5
  kernel_key, bias_key = jax.random.split(key)
  return {'kernel': jax.random.uniform(kernel_key, (inputs + hidden,
                                                    4 * hidden),
                                       minval=-bound, maxval=bound),
          'bias': jax.random.uniform(bias_key, (4 * hidden,), minval=-bound,
                                     maxval=bound)}


def lstm_cell(params: dict, carry: tuple[jax.Array, jax.Array],
              x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """One LSTM step, `([..., I], ([..., H], [..., H])) -> ((h, c), h)`;
  gates in PyTorch's order (input, forget, cell, output)."""
  h, c = carry
  bias = params['bias'].reshape((1,) * (x.ndim - 1) + (-1,))
  z = jnp.concatenate([x, h], -1) @ params['kernel'] + bias
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return (h, c), h


def _run_lstm(params: dict, sequence_SxD: jax.Array) -> jax.Array:
  hidden = params['bias'].shape[0] // 4
  zeros = jnp.zeros((hidden,), sequence_SxD.dtype)
  return jax.lax.scan(functools.partial(lstm_cell, params), (zeros, zeros),
                      sequence_SxD)[1]


def full_context_support(params: dict, support_SxD: jax.Array) -> jax.Array:
  """`g(x_i) = g'(x_i) + h_i^fwd + h_i^bwd` of the support sequence."""
  forward = _run_lstm(params['support_forward'], support_SxD)
  backward = _run_lstm(params['support_backward'], support_SxD[::-1])[::-1]
  return support_SxD + forward + backward


def full_context_queries(params: dict, queries_BxD: jax.Array,
                         support_SxD: jax.Array, steps: int) -> jax.Array:
  """`f(x) = h_K` of the attention LSTM over the (full-context) support.

  `h_0 = c_0 = 0`, so the first read-out `r_0` is the uniform attention's:
  the mean of the support embeddings.
  """
  zeros = jnp.zeros_like(queries_BxD)
  first_read = jnp.broadcast_to(jnp.mean(support_SxD, 0, keepdims=True),
                                queries_BxD.shape)

  def step(carry, _):
    h, c, read = carry
    (h, c), _ = lstm_cell(params['query'], (h, c),
                          jnp.concatenate([queries_BxD, read], -1))
    h = h + queries_BxD
    attention = jax.nn.softmax(h @ support_SxD.T, axis=-1)   # [B, S]
    return (h, c, attention @ support_SxD), None

  (h, _, _), _ = jax.lax.scan(step, (zeros, zeros, first_read), None,
                              length=steps)
  return h


def matching_net(backbone: Backbone, *, init_scale: float = 10.0,
                 learn_scale: bool = True, fce: bool = False,
                 fce_steps: int | None = None) -> Algorithm:
  """Matching networks on a backbone.

  Args:
    backbone: the embedding `images -> features [B, D]` of support and
      queries.
    init_scale: the attention's initial inverse temperature.
    learn_scale: train the temperature (`meta_params['log_scale']`).
    fce: full-context embeddings (module docstring), with their LSTMs in
      `meta_params['fce']`.
    fce_steps: K, the attention LSTM's steps (default: the support size).

  Returns:
    An `Algorithm`; its task parameters are the support embeddings
    `[N*K, D]` (full-context ones with `fce`) and labels.
  """
  if fce_steps is not None and fce_steps < 1:
    raise ValueError(f'fce_steps must be >= 1, got {fce_steps}.')

  def init(key, sample_images):
    params, model_state = backbone.init(key, sample_images)
    meta_params = {'backbone': params}
    if learn_scale:
      meta_params['log_scale'] = jnp.log(jnp.asarray(init_scale, jnp.float32))
    if fce:
      dim = jax.eval_shape(lambda: backbone.apply(
          params, model_state, sample_images, False)[0]).shape[-1]
      keys = jax.random.split(jax.random.fold_in(key, 1), 3)
      meta_params['fce'] = {
          'support_forward': _init_lstm(keys[0], dim, dim),
          'support_backward': _init_lstm(keys[1], dim, dim),
          'query': _init_lstm(keys[2], 2 * dim, dim)}
    return meta_params, model_state

  def adapt(meta_params, model_state, episode, key, train):
    del key
    embeddings, model_state = backbone.apply(
        meta_params['backbone'], model_state, episode.support_images, train)
    if fce:
      embeddings = full_context_support(meta_params['fce'], embeddings)
    return {'support': embeddings,
            'labels': jax.nn.one_hot(episode.support_labels,
                                     episode.num_ways, dtype=bool)}, model_state

  def predict(meta_params, model_state, task_params, images, train):
    embeddings, model_state = backbone.apply(
        meta_params['backbone'], model_state, images, train)
    support = task_params['support']
    if fce:
      embeddings = full_context_queries(
          meta_params['fce'], embeddings, support,
          fce_steps or support.shape[0])
    scale = (jnp.exp(meta_params['log_scale']) if learn_scale
             else jnp.asarray(init_scale, jnp.float32))
    attention = scale * cosine_similarities(embeddings, support)    # [B, NK]
    log_weights = jax.nn.log_softmax(attention, axis=-1)
    # log p(n | x): logsumexp of the attention log-weights of class n.
    in_class = task_params['labels'][None, :, :]                     # [1,NK,N]
    logits = jax.nn.logsumexp(
        jnp.where(in_class, log_weights[:, :, None], -jnp.inf), axis=1)
    return logits, model_state

  return Algorithm(init=init, adapt=adapt, predict=predict)


__all__ = ['full_context_queries', 'full_context_support', 'lstm_cell',
           'matching_net']
