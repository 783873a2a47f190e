"""The multitask objective: MultiMNIST canvases, streams and heads, one
compiled step per weighting, training through the harness with exact
resume, per-task evaluation, Delta-p, and the errors bad configs get."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fewshot import backbones, builder, harness
from fewshot.data.batches import MultiLabelImages
from fewshot.data.idx import write_idx
from fewshot.data.multimnist import multimnist_splits
from fewshot.multitask import make_weighting
from fewshot.multitask.weighting import Combination, Weighting
from fewshot.objectives import init_state, make_train_step
from fewshot.objectives.multitask import Stream, Task, multitask
from fewshot.workdir import MetricsLog
from helpers import killed_after_checkpoint, load_config, restore_train_state


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  """Tiny MNIST-format IDX files: class c is a bar at row 2c plus noise."""
  directory = tmp_path_factory.mktemp('mnist')
  rng = np.random.default_rng(0)
  for split, count in (('train', 120), ('t10k', 40)):
    labels = np.arange(count) % 10
    images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c + 4:2 * c + 6, 4:24] = 255
    write_idx(directory / f'{split}-images-idx3-ubyte.gz', images)
    write_idx(directory / f'{split}-labels-idx1-ubyte.gz', labels)
  return directory


def _config(mnist_dir, arg='', steps=4):
  config = load_config('multitask_multimnist',
                       f'steps={steps},batch_size=16,filters=8' +
                       (f',{arg}' if arg else ''))
  config.data.mnist_dir = str(mnist_dir)
  config.train.log_every = 2
  config.train.eval_every = 2
  config.train.checkpoint_every_steps = 2
  return config


def test_multimnist_canvases_hold_two_different_items(mnist_dir):
  splits = multimnist_splits(variant='mnist', mnist_dir=mnist_dir,
                             val_fraction=0.25)
  assert {k: v.num_images for k, v in splits.items()} == {
      'train': 90, 'val': 30, 'test': 40}
  test = splits['test']
  assert test.images.shape == (40, 36, 36, 1)
  assert (test.labels['left'] != test.labels['right']).all()
  # The left item's bar (rows 2c+4, 2c+5, columns 4..23) is at the top left,
  # the right item's shifted by 8 pixels right and down.
  for i in range(5):
    left, right = test.labels['left'][i], test.labels['right'][i]
    assert (test.images[i, 2 * left + 4, 4:8, 0] == 255).all()
    assert (test.images[i, 2 * right + 12, 29:32, 0] == 255).all()
  again = multimnist_splits(variant='mnist', mnist_dir=mnist_dir,
                            val_fraction=0.25)
  np.testing.assert_array_equal(again['train'].images, splits['train'].images)
  with pytest.raises(ValueError, match="Unknown MultiMNIST variant 'digits'"):
    multimnist_splits(variant='digits', mnist_dir=mnist_dir)
  with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte'):
    multimnist_splits(variant='mnist', mnist_dir=mnist_dir.parent)


def _toy_data():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (32, 16, 16, 1)).astype(np.uint8)
  return {'images': MultiLabelImages(images, {
      'a': (np.arange(32) % 3).astype(np.int32),
      'b': (np.arange(32) % 4).astype(np.int32),
      'y': rng.normal(size=(32, 2)).astype(np.float32)})}


def _toy_backbone():
  # Two conv blocks: the gradient paths compare the same way at any depth,
  # with half the layers to compile.
  return backbones.create('conv4', filters=4, norm='batch_running',
                          num_blocks=2)


def _toy_objective(weighting, tasks=None, streams=None,
                   gradients='parameters'):
  data = _toy_data()
  tasks = tasks or {'a': Task('images', outputs=3),
                    'b': Task('images', outputs=4, head='cosine'),
                    'y': Task('images', kind='regress', outputs=2)}
  streams = streams or {'images': Stream(batch_size=8)}
  data = {name: data['images'] for name in streams}
  backbone = _toy_backbone()
  objective = multitask(backbone, tasks=tasks, streams=streams,
                        weighting=weighting, gradients=gradients)
  params, state, run_key = objective.init(jax.random.key(0), data)
  batch = objective.sample(run_key, jnp.int32(0), data)
  return objective, params, state, batch


def _ones_with_gram():
  """Equal weights through the per-task-gradient path (a test weighting)."""
  def combine(params, state, losses, gram, key):
    assert gram is not None
    ones = jnp.ones_like(losses)
    return Combination(ones, ones, jnp.zeros(()), state)
  return Weighting('ones_with_gram', lambda n: ({}, {}), combine,
                   needs_gram=True)


def test_per_task_gradient_path_equals_the_summed_loss_gradient():
  objective, params, state, batch = _toy_objective(make_weighting('equal'))
  key = jax.random.key(2)
  (loss, (metrics, _)), grads = jax.jit(objective.value_and_grad)(
      params, state, batch, key)
  surgery, *_ = _toy_objective(_ones_with_gram())
  (loss_g, _), grads_g = jax.jit(surgery.value_and_grad)(params, state, batch,
                                                         key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=1e-6),
               grads, grads_g)
  np.testing.assert_allclose(loss, loss_g, rtol=1e-6)
  assert float(loss) == pytest.approx(float(metrics['a_loss'] +
                                            metrics['b_loss'] +
                                            metrics['y_loss']), rel=1e-5)
  assert all(float(jnp.abs(grads['heads'][t]['kernel']).sum()) > 0
             for t in ('a', 'b', 'y'))


# The two gradient paths (a weighted sum; per-task gradients and a Gram
# matrix) and a method with its own parameters; every method's one-task
# coefficients are tested in multitask_weighting_test.
@pytest.mark.parametrize('name,options', [
    ('equal', {}), ('pcgrad', {}), ('gradnorm', {'period': 1})])
def test_one_task_trains_as_single_task_training(name, options):
  tasks = {'a': Task('images', outputs=3)}
  objective, params, state, batch = _toy_objective(
      make_weighting(name, **options), tasks)
  key = jax.random.key(2)
  (_, (_, new_state)), grads = jax.jit(objective.value_and_grad)(
      params, state, batch, key)

  def single(p):
    from fewshot.objectives.multitask import task_loss
    features, _ = objective_backbone.apply(p['backbone'], state['backbone'],
                                           batch['images'].images, True)
    return task_loss(tasks['a'], p['heads']['a'], features,
                     batch['images'].labels['a'])[0]

  objective_backbone = _toy_backbone()
  expected = jax.grad(single)({'backbone': params['backbone'],
                               'heads': params['heads']})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=1e-6),
               {'backbone': grads['backbone'], 'heads': grads['heads']},
               expected)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def _recording_gram(coefficients):
  """Fixed coefficients through the Gram path; the state keeps the Gram."""
  def init(num_tasks):
    return {}, {'gram': jnp.zeros((num_tasks, num_tasks))}

  def combine(params, state, losses, gram, key):
    del params, state, key
    return Combination(jnp.asarray(coefficients, losses.dtype),
                       jnp.ones_like(losses), jnp.zeros(()), {'gram': gram})
  return Weighting('recording', init, combine, needs_gram=True)


_TWO_STREAMS = dict(
    tasks={'a': Task('images', outputs=3),
           'y': Task('images', kind='regress', outputs=2),
           'r': Task('turned', labels='rotation', outputs=4)},
    streams={'images': Stream(batch_size=8),
             'turned': Stream(batch_size=6, rotate=True)})


@pytest.mark.parametrize('gradients', ['features', 'features_summed'])
def test_feature_gradients_change_only_the_gram(gradients):
  """Same coefficients: the same update as the exact parameter mode (the
  backward pass is linear); the Gram is that of the features' gradients,
  from separate `jax.grad` calls, zero across streams unless summed."""
  weighting = _recording_gram((0.3, 1.7, 0.9))
  key = jax.random.key(2)
  exact, params, state, batch = _toy_objective(weighting, **_TWO_STREAMS)
  features_mode, *_ = _toy_objective(weighting, gradients=gradients,
                                     **_TWO_STREAMS)
  (_, (_, exact_state)), exact_grads = jax.jit(exact.value_and_grad)(
      params, state, batch, key)
  (_, (metrics, new_state)), grads = jax.jit(features_mode.value_and_grad)(
      params, state, batch, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=1e-6),
               grads, exact_grads)
  np.testing.assert_allclose(metrics['a_weight'], 0.3, rtol=1e-6)

  from fewshot.objectives.multitask import task_loss
  backbone, rows = _toy_backbone(), []
  for name, task in _TWO_STREAMS['tasks'].items():
    item = batch[task.stream]
    features = backbone.apply(params['backbone'], state['backbone'],
                              item.images, True)[0]
    grad = jax.grad(lambda f: task_loss(
        task, params['heads'][name], f,
        item.labels[task.labels or name])[0])(features)
    rows.append((task.stream, np.asarray(grad, np.float64)))
  expected = np.zeros((3, 3))
  for s, (stream_s, g_s) in enumerate(rows):
    for t, (stream_t, g_t) in enumerate(rows):
      if gradients == 'features_summed':
        expected[s, t] = g_s.sum(0) @ g_t.sum(0)
      elif stream_s == stream_t:
        expected[s, t] = np.sum(g_s * g_t)
  gram = np.asarray(new_state['weighting']['gram'])
  np.testing.assert_allclose(gram, expected, rtol=1e-4, atol=1e-12)
  assert (gradients == 'features_summed') == (abs(gram[0, 2]) > 0)
  # The parameter mode's Gram is another matrix.
  assert not np.allclose(exact_state['weighting']['gram'], gram, rtol=1e-2)



def test_a_state_with_one_array_in_two_leaves_is_donated_safely():
  """DWA's history held one zeros array in four leaves; donating the
  state then failed ('donate the same buffer twice')."""
  def aliased_init(num_tasks):
    zeros = jnp.zeros((num_tasks,))
    return {}, {'a': zeros, 'b': zeros}

  def combine(params, state, losses, gram, key):
    ones = jnp.ones_like(losses)
    return Combination(ones, ones, jnp.zeros(()),
                       {'a': state['a'] + losses, 'b': state['b']})

  objective, *_ = _toy_objective(Weighting('aliased', aliased_init, combine))
  data = _toy_data()
  optimizer = optax.sgd(0.1)
  state = init_state(objective, optimizer, data, 0)
  step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
  for _ in range(2):
    state, _ = step(state, data)
  assert float(state.model_state['weighting']['a'].sum()) > 0
  assert float(state.model_state['weighting']['b'].sum()) == 0


def test_rotation_labels_say_how_each_image_was_turned():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (12, 8, 8, 1)).astype(np.uint8)
  data = {'r': MultiLabelImages(images, {'c': np.zeros(12, np.int32)})}
  objective = multitask(
      backbones.create('conv4', filters=4, num_blocks=2), weighting=
      make_weighting('equal'), streams={'r': Stream(batch_size=12,
                                                    rotate=True)},
      tasks={'rotation': Task('r', labels='rotation', outputs=4)})
  batch = objective.sample(jax.random.key(5), jnp.int32(3), data)['r']
  turns = np.asarray(batch.labels['rotation'])
  assert len(set(turns.tolist())) > 1
  for image, k in zip(np.asarray(batch.images), turns):
    undone = np.rot90(image, -k, axes=(0, 1))
    assert any(np.array_equal(undone, original) for original in images)


@pytest.fixture(scope='module')
def straight_run(mnist_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('multitask')
  config = _config(mnist_dir, 'method=uncertainty')
  results = harness.train_and_evaluate(config, str(workdir))
  return config, workdir, results


def test_training_logs_every_task_and_a_killed_run_resumes_exactly(
    straight_run, tmp_path, monkeypatch):
  config, straight_dir, results = straight_run
  assert results['step'] == 4
  for split in ('val', 'test'):
    for task in ('left', 'right'):
      assert 0 <= results[split][f'{task}_accuracy'] <= 1
      assert results[split][f'{task}_ci95'] >= 0
  records = [json.loads(line)
             for line in open(straight_dir / 'metrics.jsonl')]
  assert any('train_left_weight' in r and 'train_right_loss' in r
             for r in records)
  assert any('val_right_accuracy' in r for r in records)
  straight, _, initial = restore_train_state(config, straight_dir)
  assert not np.allclose(straight.params['weighting']['log_variance'],
                         initial.params['weighting']['log_variance'])
  killed_after_checkpoint(monkeypatch, 2, lambda: harness.train_and_evaluate(
      config, str(tmp_path)))
  assert harness.train_and_evaluate(config, str(tmp_path))['step'] == 4
  resumed, *_ = restore_train_state(config, tmp_path)
  jax.tree.map(np.testing.assert_array_equal,
               (straight.params, straight.model_state, straight.opt_state),
               (resumed.params, resumed.model_state, resumed.opt_state))


def test_a_new_head_on_a_trained_frozen_encoder(straight_run, mnist_dir,
                                                tmp_path):
  """A trained multi-task encoder (BatchNorm state included) starts a new
  single-head run; a zero rate multiplier freezes it while the head
  trains."""
  straight_config, straight_dir, _ = straight_run
  config = _config(mnist_dir, 'tasks=right,steps=2')
  config.backbone.weights = str(straight_dir)
  config.optimizer.rate_multipliers = dict(backbone=0.0)
  harness.train_and_evaluate(config, str(tmp_path))
  trained, _, initial = restore_train_state(config, tmp_path)
  encoder = restore_train_state(straight_config, straight_dir)[0]
  jax.tree.map(np.testing.assert_array_equal,
               (initial.params['backbone'],
                initial.model_state['backbone']),
               (encoder.params['backbone'], encoder.model_state['backbone']))
  jax.tree.map(np.testing.assert_array_equal, trained.params['backbone'],
               encoder.params['backbone'])
  assert not np.allclose(trained.params['heads']['right']['kernel'],
                         initial.params['heads']['right']['kernel'])


def test_delta_p_against_single_task_workdirs(straight_run, mnist_dir,
                                              tmp_path):
  _, straight_dir, results = straight_run
  single = harness.train_and_evaluate(
      _config(mnist_dir, 'tasks=left,steps=2'), str(tmp_path / 'trained'))
  assert [k for k in single['test'] if k.endswith('_accuracy')] == [
      'left_accuracy']
  # Baselines as the harness records them, with known accuracies.
  base = {'left': 0.5, 'right': 0.25}
  for task, value in base.items():
    (tmp_path / task).mkdir()
    MetricsLog(tmp_path / task).write(2, **{f'test_{task}_accuracy': value,
                                            f'test_{task}_ci95': 0.1})
  config = _config(mnist_dir, 'method=uncertainty,baselines='
                   f'{tmp_path / "left"}+{tmp_path / "right"}')
  experiment = builder.build(config, pretrained=False)
  state = restore_train_state(config, straight_dir)[0]
  result = experiment.evaluators['test'](state.params, state.model_state)
  expected = 100 * np.mean([(result[f'{t}_accuracy'] - base[t]) / base[t]
                            for t in ('left', 'right')])
  assert result['delta_p'] == pytest.approx(expected)
  assert result['left_accuracy'] == pytest.approx(
      results['test']['left_accuracy'])
  config.eval.baselines = (str(tmp_path / 'left'),)
  with pytest.raises(ValueError, match=r"test results for task\(s\) "
                     r"\['right'\]"):
    builder.build(config)


def test_episode_rotation_and_fewshot_heads_on_class_data(tmp_path):
  """The Omniglot recipe's shape on generated classes: a class head and a
  rotation head on images split by image, a ProtoNet episode head, and
  few-shot scores of the shared backbone on held-out classes."""
  synthetic = dict(name='synthetic', num_classes=(6, 4, 4),
                   images_per_class=10, image_size=16)
  config = _config('unused', steps=2)
  config.backbone.num_blocks = 2  # half the layers to compile, 4x4 maps
  config.data = dict(name='class_images', dataset=synthetic)
  config.objective.streams = dict(
      images=dict(batch_size=8), turned=dict(batch_size=8, rotate=True),
      episodes=dict(ways=3, shots=1, queries=2, data=synthetic))
  config.objective.tasks = dict(
      character=dict(stream='images', labels='class'),
      rotation=dict(stream='turned', labels='rotation', head='cosine'),
      protos=dict(stream='episodes', kind='episodes'))
  config.objective.weighting = dict(name='pcgrad')
  config.objective.gradients = 'features'  # one stream is episodes
  config.train.eval_every = 100
  config.eval.update(ways=3, shots=1, queries=2, num_episodes=6,
                     val_episodes=4, fewshot_data=synthetic,
                     fewshot_ways=(2,), fewshot_episodes=5,
                     fewshot_queries=2)
  results = harness.train_and_evaluate(config, str(tmp_path))
  test = results['test']
  assert {'character_accuracy', 'rotation_accuracy', 'protos_accuracy',
          'fewshot_2way_accuracy', 'fewshot_2way_ci95'} <= set(test)
  state = restore_train_state(config, tmp_path)[0]
  assert state.params['heads']['character']['kernel'].shape[-1] == 6
  assert state.params['heads']['rotation']['kernel'].shape[-1] == 4


@pytest.mark.parametrize('change,error', [
    (lambda c: c.objective.tasks.left.update(stream='imgs'),
     "Task 'left' reads stream 'imgs', but the streams are"),
    (lambda c: c.objective.streams.update(extra=dict(batch_size=4)),
     r"Stream\(s\) \['extra'\] are read by no task"),
    (lambda c: c.objective.tasks.left.update(labels='middle'),
     "reads labels 'middle', but stream 'images' has"),
    (lambda c: c.objective.tasks.left.update(outputs=5),
     "5-class head, but its labels 'left' go up to class 9"),
    (lambda c: c.objective.weighting.update(weights={'left': 1.0,
                                                     'centre': 1.0}),
     r"Weights for \['centre'\], which no task is named"),
    (lambda c: c.objective.weighting.update(name='fixed',
                                            weights={'left': 0.0}),
     'sum to a positive number'),
    (lambda c: c.objective.streams.images.update(batch_size=1000),
     'batch_size 1000 exceeds its 108 training images'),
    (lambda c: setattr(c.objective, 'tasks', {}), 'objective.tasks is empty'),
    (lambda c: setattr(c.objective, 'gradients', 'rep'),
     "gradients must be one of .*'features_summed'.*got 'rep'"),
])
def test_bad_multitask_configs_name_the_problem(mnist_dir, change, error):
  config = _config(mnist_dir)
  change(config)
  with pytest.raises(ValueError, match=error):
    builder.build(config)
