"""SetFit (Tunstall et al. 2022): contrastive fine-tuning, then a probe.

Per episode, the sentence encoder is first fine-tuned on pairs of support
examples with SetFit's cosine-similarity loss, `(cos(u, v) - y)^2` with
`y = 1` for a same-class pair and 0 otherwise, then a logistic-regression
head is fitted on the fine-tuned (L2-normalised) support embeddings.
SetFit samples pairs and embeds each twice; here every pair of the support
set enters each full-batch step through one `[S, S]` similarity matrix
(one forward pass of the S support examples), with positive and negative
pairs weighted equally (SetFit draws them in equal numbers). A 1-shot
support set has only negative pairs.

With a parameter-efficient backbone (`fewshot.peft`), only its trainable
leaves (LoRA factors, biases, adapters) are fine-tuned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fewshot.algorithms.base import Algorithm
from fewshot.algorithms.baselines import linear_probe
from fewshot.backbones.base import Backbone
from fewshot.backbones.base import identity_backbone
from fewshot.heads import l2_normalize
from fewshot.optimizers import inner_optimizer
from fewshot.transfer.finetune import fit


def pair_similarity_loss(embeddings_SxD: jax.Array,
                         labels_S: jax.Array) -> jax.Array:
  """SetFit's loss over every pair `i < j`: mean squared error between the
  cosine similarity and the same-class indicator, the positive and the
  negative pairs each averaged, then the two averages averaged (a class of
  pairs that is absent contributes 0 and the other counts fully)."""
  unit = l2_normalize(embeddings_SxD)
  cosine = unit @ unit.T
  same = (labels_S[:, None] == labels_S[None, :]).astype(cosine.dtype)
  upper = jnp.triu(jnp.ones_like(cosine), k=1)
  errors = jnp.square(cosine - same)
  positives, negatives = upper * same, upper * (1 - same)
  num_pos, num_neg = positives.sum(), negatives.sum()
  pos_loss = jnp.sum(errors * positives) / jnp.maximum(num_pos, 1)
  neg_loss = jnp.sum(errors * negatives) / jnp.maximum(num_neg, 1)
  present = (num_pos > 0).astype(cosine.dtype) + (num_neg > 0).astype(
      cosine.dtype)
  return (pos_loss + neg_loss) / jnp.maximum(present, 1)


def setfit(backbone: Backbone, *, steps: int = 20,
           learning_rate: float = 2e-5,
           optimizer: str | optax.GradientTransformation = 'adam',
           probe_steps: int = 100, probe_learning_rate: float = 0.1,
           probe_l2: float = 1e-3, meta_gradient: bool = False) -> Algorithm:
  """Contrastive fine-tuning of the backbone on support pairs, then a probe.

  Args:
    backbone: a sentence (or image) encoder, `meta_params['backbone']`.
    steps: full-batch contrastive steps per episode (0: a plain probe).
    learning_rate, optimizer: the contrastive phase's update rule.
    probe_steps, probe_learning_rate, probe_l2: the logistic head
      (`linear_probe(solver='logistic')` on the fine-tuned features).
    meta_gradient: let outer-loop gradients flow through the contrastive
      fine-tuning and the probe (second order); False stops them at the
      pretrained weights.

  Returns:
    An `Algorithm`; task parameters are `{'backbone': fine-tuned params,
    'head': {'kernel': [D, N], 'bias': [N]}}`. The backbone runs in
    evaluation mode (its `model_state` is never changed).
  """
  probe = linear_probe(identity_backbone(), solver='logistic',
                       steps=probe_steps, learning_rate=probe_learning_rate,
                       l2=probe_l2, normalize=True,
                       freeze_backbone=False)  # gradients are set here
  tx = inner_optimizer(optimizer, learning_rate)

  def init(key, sample_inputs):
    params, model_state = backbone.init(key, sample_inputs)
    return {'backbone': params}, model_state

  def embed(params, model_state, inputs):
    return backbone.apply(params, model_state, inputs, False)[0]

  def adapt(meta_params, model_state, episode, key, train):
    del train  # Evaluation mode throughout, like `fine_tune`.
    pretrained = meta_params['backbone']
    if not meta_gradient:
      pretrained = jax.lax.stop_gradient(pretrained)

    def loss_fn(params):
      return pair_similarity_loss(
          embed(params, model_state, episode.support_images),
          episode.support_labels)

    tuned, _ = fit(loss_fn, pretrained, tx, steps)
    support = embed(tuned, model_state, episode.support_images)
    if not meta_gradient:
      support = jax.lax.stop_gradient(support)
    head, _ = probe.adapt({'backbone': {}}, {}, episode.replace(
        support_images=support), key, False)
    return {'backbone': tuned, 'head': head}, model_state

  def predict(meta_params, model_state, task_params, inputs, train):
    del meta_params, train
    features = embed(task_params['backbone'], model_state, inputs)
    logits, _ = probe.predict({'backbone': {}}, {}, task_params['head'],
                              features, False)
    return logits, model_state

  return Algorithm(init=init, adapt=adapt, predict=predict)


__all__ = ['pair_similarity_loss', 'setfit']
