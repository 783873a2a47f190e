"""Knowledge distillation: the loss, feature capture and the objective."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fewshot import backbones, builder, harness
from fewshot import workdir as workdir_lib
from fewshot.data.batches import LabelledImages
from fewshot.distillation import apply_capturing, hint_loss, kd_loss
from fewshot.objectives import distillation, init_state, make_train_step
from fewshot.ops import conv2d
from helpers import load_config

RNG = np.random.default_rng(0)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_at_temperature_one_and_alpha_one_is_cross_entropy_to_the_teacher():
  student = RNG.normal(size=(6, 5)).astype(np.float32)
  teacher = RNG.normal(size=(6, 5)).astype(np.float32)
  expected = -np.mean(np.sum(np.exp(_log_softmax(teacher))
                             * _log_softmax(student), -1))
  np.testing.assert_allclose(kd_loss(student, teacher, temperature=1.0,
                                     alpha=1.0), expected, rtol=1e-5)


def test_kd_scales_the_soft_term_by_tau_squared_and_adds_the_label_term():
  student = RNG.normal(size=(6, 5)).astype(np.float32)
  teacher = RNG.normal(size=(6, 5)).astype(np.float32)
  labels = RNG.integers(0, 5, 6)
  soft = -np.mean(np.sum(np.exp(_log_softmax(teacher / 4))
                         * _log_softmax(student / 4), -1))
  hard = -np.mean(_log_softmax(student)[np.arange(6), labels])
  np.testing.assert_allclose(
      kd_loss(student, teacher, labels, temperature=4.0, alpha=0.7),
      0.7 * 16 * soft + 0.3 * hard, rtol=1e-5)
  gradient = jax.grad(lambda t: kd_loss(student, t, labels))(teacher)
  assert not np.any(np.asarray(gradient))  # the teacher is frozen
  with pytest.raises(ValueError, match='needs the labels'):
    kd_loss(student, teacher, alpha=0.5)


def test_feature_capture_returns_the_named_modules_output():
  backbone = backbones.create('conv4', filters=4, norm='batch_running')
  images = jnp.asarray(RNG.integers(0, 255, (3, 16, 16, 1)), jnp.uint8)
  params, state = backbone.init(jax.random.key(0), images)
  output, captured, new_state = apply_capturing(
      backbone.module, {'params': params, **state}, images, True, ['conv0'])
  expected = conv2d(images.astype(jnp.float32) / 255.0,
                    params['conv0']['kernel'])
  np.testing.assert_allclose(captured['conv0'], expected, rtol=1e-5,
                             atol=1e-6)
  plain, plain_state = backbone.apply(params, state, images, True)
  np.testing.assert_allclose(output, plain, rtol=1e-6)
  jax.tree.map(np.testing.assert_allclose, new_state, plain_state)
  with pytest.raises(ValueError, match=r"No submodule 'layer9' in Conv4; its "
                     r"submodules are \['conv0'"):
    apply_capturing(backbone.module, {'params': params, **state}, images,
                    False, ['layer9'])


def test_the_hint_loss_pools_the_larger_map_and_projects_channels():
  student = jnp.asarray(RNG.normal(size=(2, 4, 4, 3)), jnp.float32)
  teacher = jnp.asarray(RNG.normal(size=(2, 2, 2, 5)), jnp.float32)
  projection = {'kernel': jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32),
                'bias': jnp.zeros(5)}
  pooled = np.asarray(student).reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
  expected = np.mean((pooled @ np.asarray(projection['kernel'])
                      - np.asarray(teacher)) ** 2)
  np.testing.assert_allclose(hint_loss(projection, student, teacher), expected,
                             rtol=1e-5)


def _labelled(count):
  """`count` random 16x16 grey images with labels in 0..3."""
  return LabelledImages(
      images=jnp.asarray(RNG.integers(0, 255, (count, 16, 16, 1)), jnp.uint8),
      labels=jnp.asarray(RNG.integers(0, 4, count), jnp.int32))


def _teacher(output_classes=4):
  teacher = backbones.create('conv4', filters=4, norm='batch_running')
  images = jnp.zeros((2, 16, 16, 1), jnp.uint8)
  params, state = teacher.init(jax.random.key(1), images)
  head = {'kernel': jnp.ones((4, output_classes)) * 0.1,
          'bias': jnp.zeros(output_classes)}
  return teacher, {'params': params, 'state': state, 'head': head}


def test_the_teacher_stays_frozen_while_the_student_learns():
  teacher, variables = _teacher()
  student = backbones.create('conv4', filters=4, norm='batch_running')
  data = _labelled(16)
  objective = distillation(student, teacher=teacher,
                           teacher_variables=variables, num_classes=4,
                           batch_size=8, hint=dict(student='conv3',
                                                   teacher='conv2'))
  optimizer = optax.sgd(0.1)
  state = init_state(objective, optimizer, data, 0)
  step = jax.jit(make_train_step(objective, optimizer))
  moved, metrics = step(state, data)
  moved, metrics = step(moved, data)
  for key in ('kd_loss', 'hint_loss', 'agreement', 'teacher_accuracy'):
    assert np.isfinite(float(metrics[key])), key
  jax.tree.map(np.testing.assert_array_equal, state.model_state['teacher'],
               moved.model_state['teacher'])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params,
                         moved.params)
  assert all(jax.tree.leaves(changed))


def test_teachers_that_do_not_fit_get_clear_errors():
  teacher, variables = _teacher(output_classes=7)
  student = backbones.create('conv4', filters=4)
  with pytest.raises(ValueError, match="teacher's head has 7 outputs, but "
                     "the student's data has 4 classes"):
    distillation(student, teacher=teacher, teacher_variables=variables,
                 num_classes=4, batch_size=8)
  with pytest.raises(ValueError, match='no classifier head'):
    distillation(student, teacher=teacher,
                 teacher_variables=dict(variables, head=None), num_classes=7,
                 batch_size=8)


def _small(config):
  """`pretrain_synthetic` on a two-block Conv-4 of 8 filters (quick to
  compile)."""
  with config.unlocked():
    config.backbone = ml_collections.ConfigDict(dict(
        name='conv4', filters=8, num_blocks=2, norm='batch_running'))
    config.eval.test_at_end = False
  return config


def _distill_config(teacher, **objective):
  config = _small(load_config('pretrain_synthetic', 'steps=4'))
  with config.unlocked():
    config.objective = ml_collections.ConfigDict(dict(
        name='distillation', teacher=teacher, batch_size=16, **objective))
    config.train.update(eval_every=4)
  return config


def test_a_workdir_is_a_teacher_for_either_architecture(tmp_path):
  teacher = str(tmp_path / 'teacher')
  harness.train_and_evaluate(_small(load_config('pretrain_synthetic',
                                                'steps=2')), teacher)
  # Generation 1 of the teacher's workdir: its parameters are stored under
  # the keys a teacher is read from (`load_backbone`, `load_head`).
  first = builder.build(_distill_config(teacher))
  params, model_state = first.initial()
  assert set(params) == {'backbone', 'head'}
  assert set(model_state['teacher']) == {'params', 'state', 'head'}
  np.testing.assert_array_equal(
      model_state['teacher']['head']['kernel'],
      workdir_lib.load_head(teacher)['kernel'])
  # A student of another architecture, with a FitNets hint.
  config = _distill_config(teacher, hint=dict(student='layer4',
                                              teacher='conv1'))
  with config.unlocked():
    # Equal widths: few kernel shapes for the random init to compile.
    config.backbone = ml_collections.ConfigDict(dict(
        name='resnet12', widths=(4, 4, 4, 4), norm='batch_running'))
  params, _ = builder.build(config).initial()
  assert params['projection']['kernel'].shape == (4, 8)  # student -> teacher


def test_init_copies_the_teacher_so_a_donating_step_leaves_it_usable():
  teacher, variables = _teacher()
  student = backbones.create('conv4', filters=4, norm='batch_running')
  data = _labelled(8)
  objective = distillation(student, teacher=teacher,
                           teacher_variables=variables, num_classes=4,
                           batch_size=8)
  optimizer = optax.sgd(0.1)
  step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
  step(init_state(objective, optimizer, data, 0), data)
  state = init_state(objective, optimizer, data, 0)  # a second run
  np.testing.assert_array_equal(state.model_state['teacher']['head']['kernel'],
                                variables['head']['kernel'])


def test_alpha_zero_without_a_hint_is_cross_entropy_and_runs_no_teacher():
  teacher, variables = _teacher()
  student = backbones.create('conv4', filters=4, norm='batch_running')
  data = _labelled(8)
  objective = distillation(student, teacher=teacher,
                           teacher_variables=variables, num_classes=4,
                           batch_size=8, alpha=0.0)
  params, model_state, _ = objective.init(jax.random.key(0), data)
  batch = objective.sample(jax.random.key(1), 0, data)
  loss, (metrics, _) = objective.loss(params, model_state, batch, None)
  features, _ = student.apply(params['backbone'], model_state['backbone'],
                              batch.images, True)
  logits = np.asarray(features) @ np.asarray(params['head']['kernel']) + np.asarray(
      params['head']['bias'])
  expected = -np.mean(_log_softmax(np.asarray(logits))[
      np.arange(8), np.asarray(batch.labels)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert 'teacher_accuracy' not in metrics
