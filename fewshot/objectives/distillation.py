"""Knowledge distillation: a student trained against a frozen teacher.

Supervised minibatches (as `supervised`), the student's classifier trained
with Hinton et al.'s loss against the teacher's logits
(`fewshot.distillation.kd_loss`) and, with `hint`, FitNets' loss between
an intermediate feature of each (`hint_loss`, through a learned
projection). The teacher (any backbone, with the classifier head of the
run that trained it) runs in evaluation mode inside the same compiled
step; its variables live in the model state, so a checkpoint holds all a
resumed run needs and no gradient reaches them.

Parameters are `{'backbone', 'head'}` (plus `'projection'` with a hint), so
a student's workdir is a pretrained backbone for any config, and the
teacher of the next generation (born-again networks, Furlanello et al.
2018; RFS, Tian et al. 2020). The model state is `{'backbone': the
student's BatchNorm statistics, 'teacher': {'params', 'state', 'head'}}`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fewshot._utils import check_options
from fewshot.backbones.base import Backbone
from fewshot.data.augment import crop_and_flip
from fewshot.data.batches import LabelledImages
from fewshot.distillation import (apply_capturing, hint_loss, init_projection,
                                  kd_loss, match_spatial)
from fewshot.heads import classifier_logits, init_head
from fewshot.objectives.base import Objective
from fewshot.objectives.supervised import sample_minibatch


def distillation(backbone: Backbone, *, teacher: Backbone,
                 teacher_variables: dict[str, Any], num_classes: int,
                 batch_size: int, temperature: float = 4.0,
                 alpha: float = 0.5, head: str = 'linear',
                 init_scale: float = 10.0,
                 hint: dict[str, Any] | None = None,
                 augment: dict[str, Any] | None = None) -> Objective:
  """Trains `backbone` and a classifier distilled from `teacher`.

  The data is `LabelledImages`. Metrics: `loss`, `kd_loss`, `accuracy`
  (the student's, on the batch), `teacher_accuracy` and `agreement` (same
  top class as the teacher) when `alpha > 0`, and `hint_loss`. With
  `alpha=0` and no hint the teacher is not run (labels only).

  Args:
    backbone: the student.
    teacher: the teacher's backbone.
    teacher_variables: `{'params', 'state'}` of the teacher's backbone and
      `'head'`: its classifier (None: a feature-only teacher, `alpha=0`).
    num_classes: the student's classes; the teacher's head must have as
      many outputs.
    batch_size: images per step.
    temperature: the softmax temperature tau.
    alpha: the soft term's weight; `1 - alpha` weights the cross-entropy
      with the labels.
    head: the student's classifier, 'linear' or 'cosine'.
    init_scale: a cosine head's initial scale.
    hint: `{'student': module path, 'teacher': module path, 'weight': 1.0}`
      for FitNets' feature loss (paths as in the parameter tree, e.g.
      'conv3', 'layer3'; modules called directly, so without input
      adapters).
    augment: `crop_and_flip` options.
  """
  augment = dict(augment or {})
  check_options(crop_and_flip, augment, "the objective's augment")
  teacher_head = teacher_variables.get('head')
  if teacher_head is None and alpha > 0:
    raise ValueError('The teacher has no classifier head (a pretrained '
                     'backbone, not a trained classifier), so only its '
                     'features can be distilled: set alpha=0 and a hint.')
  if teacher_head is not None:
    outputs = teacher_head['kernel'].shape[-1]
    if outputs != num_classes:
      raise ValueError(f"The teacher's head has {outputs} outputs, but the "
                       f"student's data has {num_classes} classes: distill "
                       'on the data the teacher was trained on.')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}.')
  if hint is not None:
    hint = dict(hint)
    unknown = sorted(set(hint) - {'student', 'teacher', 'weight'})
    if unknown or not {'student', 'teacher'} <= set(hint):
      raise ValueError("hint needs {'student': path, 'teacher': path} and "
                       f"optionally 'weight'; got {sorted(hint)}.")
    hint.setdefault('weight', 1.0)
  init_head(jax.random.key(0), 1, 1, kind=head)  # fail early on a bad kind
  frozen = {'params': teacher_variables['params'],
            'state': teacher_variables.get('state') or {},
            'head': teacher_head}

  def student_forward(params, state, images, train):
    if hint is None:
      features, state = backbone.apply(params, state, images, train)
      return features, None, state
    features, captured, state = apply_capturing(
        backbone.module, {'params': params, **state}, images, train,
        [hint['student']])
    return features, captured[hint['student']], state

  def teacher_forward(variables, images):
    if hint is None:
      features, _ = teacher.apply(variables['params'], variables['state'],
                                  images, False)
      return features, None
    features, captured, _ = apply_capturing(
        teacher.module, {'params': variables['params'], **variables['state']},
        images, False, [hint['teacher']])
    return features, captured[hint['teacher']]

  def init(key, data: LabelledImages):
    backbone_key, head_key, projection_key, run_key = jax.random.split(key, 4)
    sample_images = jnp.asarray(data.images[:2])
    params, model_state = backbone.init(backbone_key, sample_images)
    features, student_hint, _ = jax.eval_shape(
        lambda: student_forward(params, model_state, sample_images, False))
    params = {'backbone': params,
              'head': init_head(head_key, features.shape[-1], num_classes,
                                kind=head, init_scale=init_scale)}
    if hint is not None:
      _, teacher_hint = jax.eval_shape(
          lambda: teacher_forward(frozen, sample_images))
      matched_student, matched_teacher = jax.eval_shape(
          lambda: match_spatial(jnp.zeros(student_hint.shape),
                                jnp.zeros(teacher_hint.shape)))
      del matched_student
      params['projection'] = init_projection(
          projection_key, student_hint.shape[-1], matched_teacher.shape[-1])
    # Copies: the train step donates its state, and `frozen` must outlive it.
    teacher_state = jax.tree.map(lambda v: jnp.array(v, copy=True), {
        k: v for k, v in frozen.items() if v is not None})
    return params, {'backbone': model_state, 'teacher': teacher_state}, run_key

  def sample(run_key, step, data: LabelledImages):
    return sample_minibatch(run_key, step, data, batch_size, augment)

  def loss(params, model_state, batch: LabelledImages, key):
    del key
    variables = model_state['teacher']
    features, student_hint, backbone_state = student_forward(
        params['backbone'], model_state['backbone'], batch.images, True)
    logits = classifier_logits(features, params['head'])
    metrics = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch.labels)}
    if alpha > 0 or hint is not None:  # alpha=0 without a hint: labels only
      teacher_features, teacher_hint = teacher_forward(variables,
                                                       batch.images)
    if alpha > 0:
      teacher_logits = jax.lax.stop_gradient(
          classifier_logits(teacher_features, variables['head']))
      total = kd_loss(logits, teacher_logits, batch.labels,
                      temperature=temperature, alpha=alpha)
      metrics.update(
          teacher_accuracy=jnp.mean(jnp.argmax(teacher_logits, -1)
                                    == batch.labels),
          agreement=jnp.mean(jnp.argmax(teacher_logits, -1)
                             == jnp.argmax(logits, -1)))
    else:
      total = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch.labels).mean()
    metrics['kd_loss'] = total
    if hint is not None:
      feature_loss = hint_loss(params['projection'], student_hint,
                               teacher_hint)
      metrics['hint_loss'] = feature_loss
      total = total + hint['weight'] * feature_loss
    metrics['loss'] = total
    return total, (metrics, dict(model_state, backbone=backbone_state))

  return Objective(init=init, sample=sample, loss=loss, unit='images')


__all__ = ['distillation']
