"""Unsupervised domain adaptation: a labelled source, an unlabelled target.

Each step draws a `[B]` source minibatch (images and labels) and a `[B]`
target minibatch (images only: the target's labels are not in the data),
runs both through the backbone in one training-mode pass (so BatchNorm
sees both domains, as TLlib does), and minimises the source cross-entropy
plus `trade_off` times the method's transfer loss (`fewshot.adaptation`):

* 'source_only': no target term (ERM; the target is not drawn);
* 'dann': a domain discriminator on the features behind a gradient
  reversal layer whose coefficient follows Ganin et al.'s warm start;
* 'cdan' / 'cdan_e': the discriminator sees the multilinear map of
  features and (detached) predictions, randomized to `randomized_dim` when
  `features * classes > 4096`; 'cdan_e' weights examples by certainty;
* 'mcc': minimum class confusion of the target predictions;
* 'mmd': DAN's multi-kernel MMD between source and target features;
* 'coral': CORAL between them.

`pseudo_labels={'threshold', 'weight'}` adds FixMatch-style self-training
to any method: the weakly augmented target view's confident predictions
label a strongly augmented view (`fewshot.data.augment.strong_augment`).
On feature vectors (a frozen backbone's, as data) there is no image to
augment: both views are the vectors, and augmentation options must be
empty.

Parameters are `{'backbone', 'head'}` plus `'bottleneck'` (a ReLU layer
between the backbone and the classifier, `bottleneck_dim > 0`) and
`'discriminator'` (adversarial methods). The model state is `{'backbone':
BatchNorm statistics, 'step': the step count the schedule reads}` plus
CDAN's fixed random `'projections'`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fewshot._utils import check_options
from fewshot.adaptation import (cdan_entropy_weights, coral, dann_coefficient,
                                discriminator_logits, domain_adversarial_loss,
                                gradient_reversal, init_discriminator,
                                minimum_class_confusion, mmd_loss,
                                multilinear_map, pseudo_label_loss)
from fewshot.backbones.base import Backbone
from fewshot.data.augment import crop_and_flip, strong_augment
from fewshot.data.batches import LabelledImages, batch_indices
from fewshot.heads import classifier_logits, init_head, linear_logits
from fewshot.objectives.base import Objective

METHODS = ('source_only', 'dann', 'cdan', 'cdan_e', 'mcc', 'mmd', 'coral')
ADVERSARIAL = ('dann', 'cdan', 'cdan_e')
RANDOMIZE_ABOVE = 4096  # TLlib randomizes CDAN's map above this many inputs


def classifier_features(params, features_BxD: jax.Array) -> jax.Array:
  """The classifier's input: the backbone's features through the bottleneck
  (`params['bottleneck']`, a linear layer and ReLU) if there is one."""
  if 'bottleneck' in params:
    return jax.nn.relu(linear_logits(features_BxD, params['bottleneck']))
  return features_BxD


def class_logits(params, features_BxD: jax.Array) -> jax.Array:
  """`[B, C]` logits of backbone features (bottleneck, then the head)."""
  return classifier_logits(classifier_features(params, features_BxD),
                           params['head'])


def needs_target(method: str, pseudo_labels: dict[str, Any] | None) -> bool:
  """Whether the method's training step draws target images."""
  return method != 'source_only' or bool(pseudo_labels)


def adaptation(backbone: Backbone, *, num_classes: int, num_steps: int,
               method: str = 'source_only', batch_size: int = 128,
               trade_off: float = 1.0, bottleneck_dim: int = 0,
               head: str = 'linear', discriminator_width: int = 1024,
               warmup_steps: int | None = None, mcc_temperature: float = 2.5,
               randomized_dim: int = 1024,
               pseudo_labels: dict[str, float] | None = None,
               augment: dict[str, Any] | None = None,
               strong: dict[str, Any] | None = None) -> Objective:
  """Trains `backbone` and a classifier on the source, adapted to the target.

  The data is `{'source': LabelledImages, 'target': [M, H, W, C] images}`
  (no 'target' for 'source_only' without pseudo-labels); the batch
  `{'source': LabelledImages [B], 'target': [B, H, W, C]}` plus
  `'target_strong'` with pseudo-labels. Metrics: `loss`, `source_loss`,
  `accuracy` (source), `transfer_loss`, and per method `domain_accuracy`
  and `reversal` (adversarial), `pseudo_label_loss` and `mask_rate`.

  Args:
    backbone: the feature extractor.
    num_classes: the classes shared by both domains.
    num_steps: the run's length (the reversal coefficient's warm-up).
    method: one of `METHODS` (module docstring).
    batch_size: B, images per domain per step.
    trade_off: the transfer loss's weight.
    bottleneck_dim: width of a ReLU bottleneck layer (0: none).
    head: 'linear' or 'cosine' classifier.
    discriminator_width: hidden width of the domain discriminator.
    warmup_steps: steps over which the reversal coefficient rises to 1
      (default `num_steps`, Ganin et al.'s schedule over training).
    mcc_temperature: MCC's softmax temperature.
    randomized_dim: CDAN's randomized multilinear map width.
    pseudo_labels: `{'threshold': 0.95, 'weight': 1.0}` for self-training.
    augment: `crop_and_flip` options, both domains' (weak) view.
    strong: `strong_augment` options of the pseudo-labelled view.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown adaptation method {method!r}; known: '
                     f'{", ".join(METHODS)}.')
  augment = dict(augment or {})
  strong = dict(strong or {})
  check_options(crop_and_flip, augment, "the objective's augment")
  check_options(strong_augment, strong, "the objective's strong")
  pseudo = None
  if pseudo_labels:
    pseudo = dict(threshold=0.95, weight=1.0)
    unknown = sorted(set(pseudo_labels) - set(pseudo))
    if unknown:
      raise ValueError(f'Unknown pseudo_labels option(s) {unknown}; it '
                       f'accepts {sorted(pseudo)}.')
    pseudo.update(pseudo_labels)
  warmup = num_steps if warmup_steps is None else warmup_steps
  draws_target = needs_target(method, pseudo)
  init_head(jax.random.key(0), 1, 1, kind=head)  # fail early on a bad kind

  def init(key, data):
    (backbone_key, bottleneck_key, head_key, discriminator_key,
     projection_key, run_key) = jax.random.split(key, 6)
    sample_images = jnp.asarray(data['source'].images[:2])
    backbone_params, backbone_state = backbone.init(backbone_key,
                                                    sample_images)
    dim = jax.eval_shape(lambda: backbone.apply(
        backbone_params, backbone_state, sample_images, False)[0]).shape[-1]
    params = {'backbone': backbone_params}
    if bottleneck_dim:
      params['bottleneck'] = init_head(bottleneck_key, dim, bottleneck_dim)
      dim = bottleneck_dim
    params['head'] = init_head(head_key, dim, num_classes, kind=head)
    model_state = {'backbone': backbone_state,
                   'step': jnp.zeros((), jnp.int32)}
    if method in ADVERSARIAL:
      inputs = dim
      if method != 'dann':
        inputs = dim * num_classes
        if inputs > RANDOMIZE_ABOVE:
          feature_key, prediction_key = jax.random.split(projection_key)
          model_state['projections'] = (
              jax.random.normal(feature_key, (dim, randomized_dim)),
              jax.random.normal(prediction_key, (num_classes, randomized_dim)))
          inputs = randomized_dim
      params['discriminator'] = init_discriminator(
          discriminator_key, inputs, discriminator_width)
    return params, model_state, run_key

  def sample(run_key, step, data):
    keys = jax.random.split(run_key, 5)
    source = data['source']
    if source.images.ndim != 4 and (augment or strong):
      raise ValueError(
          'augment and strong are image augmentations, but the data are '
          f'vectors of shape {source.images.shape[1:]} (frozen features): '
          'leave them empty.')
    index = batch_indices(keys[0], step, source.num_images, batch_size)
    batch = {'source': LabelledImages(
        images=crop_and_flip(jax.random.fold_in(keys[1], step),
                             source.images[index], **augment),
        labels=source.labels[index])}
    if draws_target:
      target = data['target']
      raw = target[batch_indices(keys[2], step, target.shape[0], batch_size)]
      batch['target'] = crop_and_flip(jax.random.fold_in(keys[3], step), raw,
                                      **augment)
      if pseudo:
        # Image-space augmentation has nothing to act on in feature vectors
        # (frozen features as data): there both views are the vectors, and
        # self-training is plain confident pseudo-labelling (Lee 2013).
        batch['target_strong'] = raw if raw.ndim != 4 else strong_augment(
            jax.random.fold_in(keys[4], step), raw, **strong)
    return batch

  def transfer_loss(params, model_state, features, logits, count):
    """`(loss, metrics)` of the method on the first 2 * count rows."""
    source, target = features[:count], features[count:2 * count]
    if method in ADVERSARIAL:
      coefficient = dann_coefficient(model_state['step'], warmup)
      inputs, weights = features[:2 * count], None
      if method != 'dann':
        predictions = jax.lax.stop_gradient(
            jax.nn.softmax(logits[:2 * count], axis=-1))
        inputs = multilinear_map(inputs, predictions,
                                 model_state.get('projections'))
        if method == 'cdan_e':
          weights = cdan_entropy_weights(predictions)
      domain_logits = discriminator_logits(
          params['discriminator'], gradient_reversal(inputs, coefficient))
      loss, accuracy = domain_adversarial_loss(
          domain_logits[:count], domain_logits[count:], weights)
      return loss, {'domain_accuracy': accuracy, 'reversal': coefficient}
    if method == 'mcc':
      return minimum_class_confusion(logits[count:2 * count],
                                     mcc_temperature), {}
    if method == 'mmd':
      return mmd_loss(source, target), {}
    return coral(source, target), {}

  def loss(params, model_state, batch, key):
    del key  # deterministic given the batch
    source = batch['source']
    count = source.images.shape[0]
    images = [source.images] + [batch[k] for k in ('target', 'target_strong')
                                if k in batch]
    features, backbone_state = backbone.apply(
        params['backbone'], model_state['backbone'],
        jnp.concatenate(images) if len(images) > 1 else images[0], True)
    features = classifier_features(params, features)
    logits = classifier_logits(features, params['head'])
    source_loss = optax.softmax_cross_entropy_with_integer_labels(
        logits[:count], source.labels).mean()
    metrics = {'source_loss': source_loss,
               'accuracy': jnp.mean(jnp.argmax(logits[:count], -1)
                                    == source.labels)}
    total = source_loss
    if method != 'source_only':
      transfer, extra = transfer_loss(params, model_state, features, logits,
                                      count)
      total = total + trade_off * transfer
      metrics.update(extra, transfer_loss=transfer)
    if pseudo:
      pseudo_loss, mask_rate = pseudo_label_loss(
          logits[count:2 * count], logits[2 * count:], pseudo['threshold'])
      total = total + pseudo['weight'] * pseudo_loss
      metrics.update(pseudo_label_loss=pseudo_loss, mask_rate=mask_rate)
    metrics['loss'] = total
    model_state = dict(model_state, backbone=backbone_state,
                       step=model_state['step'] + 1)
    return total, (metrics, model_state)

  def batch_units(batch):  # every input the step embeds, both domains
    return sum(x.shape[0] for x in jax.tree.leaves(batch) if x.ndim >= 2)

  return Objective(init=init, sample=sample, loss=loss, unit='images',
                   batch_units=batch_units)


__all__ = ['ADVERSARIAL', 'METHODS', 'adaptation', 'class_logits',
           'classifier_features', 'needs_target']
