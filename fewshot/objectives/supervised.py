"""Supervised pretraining: minibatches, cross-entropy on a linear or cosine head.

The "good embedding" recipe (Tian et al. 2020) and the Baseline / Baseline++
pretraining stage (Chen et al. 2019): a backbone and a classifier over all
training classes. Parameters are `{'backbone': ..., 'head': ...}`, so a
workdir of this objective is a pretrained backbone for any other config
(`backbone.weights=<workdir>`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fewshot._utils import check_options
from fewshot.backbones.base import Backbone
from fewshot.data.augment import crop_and_flip
from fewshot.data.batches import LabelledImages, batch_indices
from fewshot.heads import classifier_logits, init_head
from fewshot.objectives.base import Objective


def sample_minibatch(run_key: jax.Array, step: jax.Array,
                     data: LabelledImages, batch_size: int,
                     augment: dict[str, Any]) -> LabelledImages:
  """Step `step`'s `[batch_size]` minibatch of an epoch permutation of
  `data` (`batch_indices`), augmented by `crop_and_flip(**augment)`."""
  order_key, augment_key = jax.random.split(run_key)
  index = batch_indices(order_key, step, data.num_images, batch_size)
  images = crop_and_flip(jax.random.fold_in(augment_key, step),
                         data.images[index], **augment)
  return LabelledImages(images=images, labels=data.labels[index])


def supervised(backbone: Backbone, *, num_classes: int, batch_size: int,
               head: str = 'linear', init_scale: float = 10.0,
               augment: dict[str, Any] | None = None) -> Objective:
  """Cross-entropy of `backbone` plus a classifier on `[B]` minibatches.

  The data is `LabelledImages`; each epoch is a fresh permutation of them
  (`fewshot.data.batches.batch_indices`), and the images are augmented in
  the step, both from the run key, so resuming is exact.

  Args:
    backbone: the feature extractor being trained.
    num_classes: the classifier's classes.
    batch_size: images per step.
    head: 'linear' or 'cosine' (Baseline++), see `fewshot.heads.init_head`.
    init_scale: the cosine head's initial scale.
    augment: keyword arguments of `fewshot.data.augment.crop_and_flip`.
  """
  augment = dict(augment or {})
  check_options(crop_and_flip, augment, 'the objective\'s augment')
  head_options = dict(kind=head, init_scale=init_scale)
  init_head(jax.random.key(0), 1, 1, **head_options)  # fail early on a bad kind

  def init(key, data: LabelledImages):
    backbone_key, head_key, run_key = jax.random.split(key, 3)
    sample_images = jnp.asarray(data.images[:2])
    params, model_state = backbone.init(backbone_key, sample_images)
    features = jax.eval_shape(
        lambda: backbone.apply(params, model_state, sample_images, False)[0])
    params = {'backbone': params,
              'head': init_head(head_key, features.shape[-1], num_classes,
                                **head_options)}
    return params, model_state, run_key

  def sample(run_key, step, data: LabelledImages):
    return sample_minibatch(run_key, step, data, batch_size, augment)

  def loss(params, model_state, batch: LabelledImages, key):
    del key  # deterministic given the batch
    features, model_state = backbone.apply(params['backbone'], model_state,
                                           batch.images, True)
    logits = classifier_logits(features, params['head'])
    mean_loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch.labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch.labels)
    return mean_loss, ({'loss': mean_loss, 'accuracy': accuracy}, model_state)

  return Objective(init=init, sample=sample, loss=loss, unit='images')


__all__ = ['sample_minibatch', 'supervised']
