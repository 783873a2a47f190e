"""Domain adaptation: each method's loss against a reference, and the run."""

import gzip

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fewshot import adaptation, backbones, builder, harness
from fewshot.data import domains
from fewshot.data.augment import random_affine, strong_augment
from fewshot.data.dataset import ClassDataset
from fewshot.data.batches import labelled_images
from fewshot.objectives import init_state, make_train_step
from fewshot.objectives.adaptation import adaptation as adaptation_objective
from helpers import load_config

RNG = np.random.default_rng(0)


def test_gradient_reversal_is_the_identity_with_a_negated_scaled_vjp():
  x = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
  cotangent = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
  y, pullback = jax.vjp(adaptation.gradient_reversal, x, jnp.float32(0.3))
  np.testing.assert_array_equal(y, x)
  dx, dcoefficient = pullback(cotangent)
  np.testing.assert_allclose(dx, -0.3 * cotangent, rtol=1e-6)
  assert float(dcoefficient) == 0.0


def test_the_reversal_coefficient_follows_ganins_schedule():
  values = [float(adaptation.dann_coefficient(s, 100)) for s in (0, 50, 100,
                                                                  500)]
  assert values[0] == 0.0
  np.testing.assert_allclose(values[1], 2 / (1 + np.exp(-5)) - 1, rtol=1e-6)
  np.testing.assert_allclose(values[2:], 2 / (1 + np.exp(-10)) - 1, rtol=1e-6)


def test_coral_and_mmd_are_zero_for_identical_batches_and_match_references():
  source = RNG.normal(size=(16, 5)).astype(np.float32)
  target = (RNG.normal(size=(16, 5)) * 2 + 1).astype(np.float32)
  assert float(adaptation.coral(source, source)) == 0.0
  assert abs(float(adaptation.mmd_loss(source, source))) < 1e-6
  expected = (np.mean((source.mean(0) - target.mean(0)) ** 2)
              + np.mean((np.cov(source.T) - np.cov(target.T)) ** 2))
  np.testing.assert_allclose(adaptation.coral(source, target), expected,
                             rtol=1e-5)
  # The biased MMD^2 as a naive double loop over the kernel.
  pooled = np.concatenate([source, target])
  distances = np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)
  median = np.median(distances[np.triu_indices(32, 1)])
  widths = median * np.array([0.25, 0.5, 1.0, 2.0, 4.0])

  def k(a, b):
    return np.mean(np.exp(-np.sum((a - b) ** 2) / (2 * widths ** 2)))

  naive = (np.mean([[k(a, b) for b in source] for a in source])
           + np.mean([[k(a, b) for b in target] for a in target])
           - 2 * np.mean([[k(a, b) for b in target] for a in source]))
  np.testing.assert_allclose(adaptation.mmd_loss(source, target), naive,
                             rtol=1e-4)
  assert float(adaptation.mmd_loss(source, target)) > 0.05


def test_mcc_matches_a_naive_loop_and_vanishes_for_confident_distinct_classes():
  logits = RNG.normal(size=(12, 4)).astype(np.float32) * 3
  p = np.exp(logits / 2.5)
  p /= p.sum(1, keepdims=True)
  entropy = -np.sum(p * np.log(p + 1e-5), 1)
  w = 1 + np.exp(-entropy)
  w = 12 * w / w.sum()
  confusion = np.zeros((4, 4))
  for b in range(12):
    confusion += w[b] * np.outer(p[b], p[b])
  confusion /= confusion.sum(1, keepdims=True)
  expected = (confusion.sum() - np.trace(confusion)) / 4
  np.testing.assert_allclose(adaptation.minimum_class_confusion(logits),
                             expected, rtol=1e-5)
  one_hot = jnp.asarray(np.eye(4)[np.arange(12) % 4] * 200.0)
  assert float(adaptation.minimum_class_confusion(one_hot)) < 1e-6


def test_cdan_maps_and_weights():
  f = RNG.normal(size=(6, 5)).astype(np.float32)
  g = jax.nn.softmax(RNG.normal(size=(6, 3)).astype(np.float32))
  outer = np.asarray(adaptation.multilinear_map(f, g))
  np.testing.assert_allclose(outer.reshape(6, 3, 5),
                             np.einsum('bc,bd->bcd', g, f), rtol=1e-6)
  rf, rg = RNG.normal(size=(5, 8)), RNG.normal(size=(3, 8))
  np.testing.assert_allclose(
      adaptation.multilinear_map(f, g, (jnp.asarray(rf, jnp.float32),
                                        jnp.asarray(rg, jnp.float32))),
      (f @ rf) * (np.asarray(g) @ rg) / np.sqrt(8), rtol=1e-5)
  weights = adaptation.cdan_entropy_weights(g)
  np.testing.assert_allclose(jnp.sum(weights), 6.0, rtol=1e-6)
  uniform = adaptation.cdan_entropy_weights(jnp.full((4, 3), 1 / 3))
  np.testing.assert_allclose(uniform, 1.0, rtol=1e-6)


def test_pseudo_labels_count_only_confident_weak_predictions():
  weak = jnp.asarray([[10.0, 0.0], [0.1, 0.0], [0.0, 10.0]])
  strong = jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32)
  loss, mask_rate = adaptation.pseudo_label_loss(weak, strong, 0.9)
  log_p = jax.nn.log_softmax(strong)
  np.testing.assert_allclose(loss, -(log_p[0, 0] + log_p[2, 1]) / 3,
                             rtol=1e-5)
  np.testing.assert_allclose(mask_rate, 2 / 3)
  gradient = jax.grad(lambda w: adaptation.pseudo_label_loss(w, strong)[0])(
      weak)
  assert not np.any(np.asarray(gradient))  # no gradient through the labels


def test_adabn_replaces_only_the_batch_statistics_with_the_targets():
  backbone = backbones.create('lenet', hidden=8)
  images = jnp.asarray(RNG.integers(0, 255, (12, 28, 28, 1)), jnp.uint8)
  params, state = backbone.init(jax.random.key(0), images[:2])
  _, state = backbone.apply(params, state, images[:6], True)  # not 0 and 1
  adapted = adaptation.adapt_batch_norm(backbone, params, state, images,
                                        batch_size=4)
  assert jax.tree.structure(adapted) == jax.tree.structure(state)
  # Layer 0's statistics, by hand: conv0 of each batch of 4, averaged.
  from fewshot.ops import conv2d  # pylint: disable=g-import-not-at-top
  conv = np.asarray(conv2d(images.astype(jnp.float32) / 255.0,
                           params['conv0']['kernel'], padding='VALID'))
  batches = conv.reshape(3, 4, -1, conv.shape[-1])
  means = batches.mean(axis=(1, 2))
  variances = batches.var(axis=(1, 2))
  norm0 = adapted['batch_stats']['norm0']
  np.testing.assert_allclose(norm0['mean'], means.mean(0), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(norm0['var'], variances.mean(0), rtol=1e-3,
                             atol=1e-6)
  with pytest.raises(ValueError, match='AdaBN needs a backbone with '
                     'BatchNorm'):
    adaptation.adapt_batch_norm(backbone, params, {}, images)


def test_strong_augmentation_keeps_shape_and_dtype_and_an_identity_warp():
  images = jnp.asarray(RNG.integers(0, 255, (5, 16, 16, 3)), jnp.uint8)
  same = random_affine(jax.random.key(1), images, rotation_degrees=0.0,
                       scale=(1.0, 1.0), translate=0.0)
  np.testing.assert_array_equal(same, images)
  strong = strong_augment(jax.random.key(2), images, flip=True)
  assert strong.shape == images.shape and strong.dtype == jnp.uint8
  assert np.mean(np.asarray(strong) != np.asarray(images)) > 0.5


def test_lenet_has_lenets_layout():
  backbone = backbones.create('lenet')
  images = jnp.zeros((2, 28, 28, 1), jnp.uint8)
  params, state = backbone.init(jax.random.key(0), images)
  assert params['fc']['kernel'].shape == (800, 500)
  features, _ = backbone.apply(params, state, images, False)
  assert features.shape == (2, 500)


# --- data ---


def test_usps_text_files_parse_to_white_on_black_uint8(tmp_path):
  values = np.full((2, 256), -1.0)
  values[1, :16] = 1.0
  lines = [' '.join(['3'] + [f'{v:.4f}' for v in values[0]]),
           ' '.join(['7'] + [f'{v:.4f}' for v in values[1]])]
  path = tmp_path / 'zip.train.gz'
  with gzip.open(path, 'wt') as f:
    f.write('\n'.join(lines) + '\n')
  images, labels = domains.read_usps(path)
  assert images.shape == (2, 16, 16) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [3, 7])
  assert images[0].max() == 0 and (images[1, 0] == 255).all()


def test_held_out_images_are_a_per_class_fraction():
  labels = np.repeat(np.arange(3), [10, 20, 30])
  train, val = domains.hold_out(labels, 0.1, seed=0)
  assert not set(train) & set(val) and len(train) + len(val) == 60
  np.testing.assert_array_equal(np.bincount(labels[val]), [1, 2, 3])


def _write_class_folders(root, classes, per_class, size=8):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name in classes:
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = RNG.integers(0, 255, (size, size, 3)).astype(np.uint8)
      Image.fromarray(pixels).save(root / name / f'{i}.png')


def test_a_folder_of_classes_is_a_domain_split_by_image(tmp_path):
  _write_class_folders(tmp_path / 'mine', ('cat', 'dog'), 10)
  splits = domains.load_domain('folder', root=tmp_path / 'mine',
                               image_size=8)
  for split in ('train', 'val', 'test'):
    assert splits[split].class_names == ('cat', 'dog')
    assert splits[split].images.shape[1:] == (8, 8, 3)
  assert sum(len(s.labels) for s in splits.values()) == 20
  np.testing.assert_array_equal(splits['test'].class_counts(), [1, 1])


def test_bad_domain_names_list_the_known_ones():
  with pytest.raises(ValueError, match='known: fashion_mnist, folder, mnist, '
                     'pacs, usps'):
    domains.load_domain('svhn')
  with pytest.raises(ValueError, match='art_painting, cartoon, photo, '
                     'sketch'):
    domains.load_domain('pacs', domain='clipart', manual_dir='/nonexistent')


def test_real_digit_and_pacs_domains(shared_data, monkeypatch):
  monkeypatch.delenv('FEWSHOT_DATA_DIR', raising=False)  # no cache writes
  usps = domains.load_domain('usps', manual_dir=shared_data)
  assert usps['train'].images.shape[1:] == (28, 28, 1)
  np.testing.assert_array_equal(usps['test'].class_counts(),
                                [359, 264, 198, 166, 200, 160, 170, 147, 166,
                                 177])
  assert len(usps['train'].labels) + len(usps['val'].labels) == 7291
  val = domains.pacs_val_names()
  assert {d: len(v) for d, v in val.items()} == {
      'art_painting': 205, 'cartoon': 235, 'photo': 167, 'sketch': 393}


# --- the objective on the harness ---


def _domain(shift, labels_seed=None):
  """10 classes of 28x28 grey blobs; `shift` brightens (a domain shift)."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(10), 8)
  base = rng.integers(0, 120, (10, 28, 28, 1))
  images = np.clip(base[labels] + rng.integers(0, 40, (80, 28, 28, 1))
                   + shift, 0, 255).astype(np.uint8)
  if labels_seed is not None:  # poisoned labels
    labels = np.random.default_rng(labels_seed).permutation(labels)
  names = tuple(str(i) for i in range(10))
  return {s: ClassDataset(images, labels, names)
          for s in ('train', 'val', 'test')}


def _config(method, **objective):
  config = load_config('adapt_digits', f'method={method},steps=3,'
                       'batch_size=8')
  with config.unlocked():
    config.backbone.hidden = 16
    config.objective.update(objective)
    config.train.update(log_every=1, eval_every=3)
  return config


def _patch_domains(monkeypatch, target):
  monkeypatch.setattr('fewshot.builder_adaptation.load_domain',
                      lambda name, **options: (_domain(0) if name == 'mnist'
                                               else target))


# CDAN, MMD and CORAL share these paths; their losses are checked above.
@pytest.mark.parametrize('method', ('source_only', 'dann', 'cdan_e', 'mcc'))
def test_every_method_takes_finite_steps_that_move_every_parameter(method):
  backbone = backbones.create('lenet', filters=(4, 8), hidden=16)
  source, target = _domain(0)['train'], _domain(60)['train']
  data = {'source': labelled_images(source), 'target': target.images}
  objective = adaptation_objective(
      backbone, num_classes=10, num_steps=4, method=method, batch_size=8,
      pseudo_labels=dict(threshold=0.0) if method == 'source_only' else None)
  optimizer = optax.sgd(0.05)
  state = init_state(objective, optimizer, data, 0)
  step = jax.jit(make_train_step(objective, optimizer))
  moved, metrics = step(state, data)
  moved, metrics = step(moved, data)
  assert np.isfinite(float(metrics['loss']))
  assert int(moved.model_state['step']) == 2
  if method != 'source_only':
    assert np.isfinite(float(metrics['transfer_loss']))
  else:
    assert float(metrics['mask_rate']) == 1.0  # threshold 0: every example
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), state.params,
                      moved.params)
  unchanged = [jax.tree_util.keystr(path) for path, leaf
               in jax.tree_util.tree_leaves_with_path(same) if leaf]
  assert not unchanged, unchanged


def test_adabn_and_the_oracle_run_end_to_end(tmp_path, monkeypatch):
  _patch_domains(monkeypatch, _domain(60))
  results = harness.train_and_evaluate(_config('adabn'),
                                       str(tmp_path / 'adabn'))
  for key in ('target_accuracy', 'source_accuracy', 'target_ci95'):
    assert 0.0 <= results['test'][key] <= 1.0, key
  poisoned = _domain(60, labels_seed=3)
  _patch_domains(monkeypatch, poisoned)
  oracle = builder.build(_config('oracle'))
  np.testing.assert_array_equal(oracle.train_data['source'].labels,
                                poisoned['train'].labels)
  assert 'target' not in oracle.train_data


def test_poisoned_target_labels_give_bit_identical_parameters(monkeypatch):
  finals = []
  for poison in (None, 7):
    _patch_domains(monkeypatch, _domain(60, labels_seed=poison))
    experiment = builder.build(_config('dann',
                                       pseudo_labels=dict(threshold=0.5)))
    state = init_state(experiment.objective, experiment.optimizer,
                       experiment.train_data, 0)
    step = jax.jit(make_train_step(experiment.objective,
                                   experiment.optimizer))
    for _ in range(3):
      state, _ = step(state, experiment.train_data)
    finals.append(state)
  assert int(finals[0].step) == 3
  jax.tree.map(np.testing.assert_array_equal, finals[0].params,
               finals[1].params)


def test_mismatched_domains_get_clear_errors(monkeypatch):
  seven = _domain(0)
  seven = {s: ClassDataset(d.images[:56], d.labels[:56] % 7,
                           tuple(str(i) for i in range(7)))
           for s, d in seven.items()}
  _patch_domains(monkeypatch, seven)
  with pytest.raises(ValueError, match='source has 10 classes and the target '
                     '7: closed-set'):
    builder.build(_config('dann'))
  _patch_domains(monkeypatch, _domain(0))
  with pytest.raises(ValueError, match='Unknown adaptation method'):
    builder.build(_config('gan'))
  config = _config('dann')
  with config.unlocked():
    config.objective.num_classes = 3
  with pytest.raises(ValueError, match='objective.num_classes is set by the '
                     'builder'):
    builder.build(config)


def test_the_config_names_its_domains():
  config = load_config('adapt_digits', 'source=usps,target=mnist,method=mcc')
  assert config.source.name == 'usps' and config.target.name == 'mnist'
  assert isinstance(config.objective, ml_collections.ConfigDict)


def test_pacs_domains_joined_by_plus_are_the_union_of_their_splits(tmp_path):
  import io, zipfile  # pylint: disable=g-import-not-at-top,multiple-imports
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (tmp_path / 'pacs').mkdir()
  with zipfile.ZipFile(tmp_path / domains.PACS_ARCHIVE, 'w') as archive:
    for d, domain in enumerate(('photo', 'sketch')):
      for name in ('dog', 'horse'):
        for i in range(2 + d):
          buffer = io.BytesIO()
          Image.fromarray(np.full((8, 8, 3), 40 * d, np.uint8)).save(
              buffer, 'PNG')
          archive.writestr(f'PACS/{domain}/{name}/{i}.png', buffer.getvalue())
  one = {d: domains.load_domain('pacs', domain=d, manual_dir=tmp_path)
         for d in ('photo', 'sketch')}
  both = domains.load_domain('pacs', domain='photo+sketch',
                             manual_dir=tmp_path)
  assert both['test'].class_names == ('dog', 'horse')
  for split in ('train', 'test'):
    np.testing.assert_array_equal(
        both[split].images, np.concatenate([one['photo'][split].images,
                                            one['sketch'][split].images]))
  assert len(both['test'].labels) == 4 + 6
  with pytest.raises(ValueError, match="Unknown PACS domain 'clipart'"):
    domains.load_domain('pacs', domain='photo+clipart', manual_dir=tmp_path)


def test_adaptation_trains_on_frozen_features_of_both_domains(monkeypatch):
  embedded = []

  def fake_embedding(section, splits, options):
    # Stands in for the frozen backbone: a fixed map of each image.
    embedded.append((options['name'], section['name']))
    return {s: ClassDataset(d.images.reshape(len(d.labels), -1)[:, ::49]
                            .astype(np.float32) / 255.0, d.labels,
                            d.class_names) for s, d in splits.items()}

  monkeypatch.setattr('fewshot.builder_adaptation.embedded_splits',
                      fake_embedding)
  finals = []
  for poison in (None, 7):
    _patch_domains(monkeypatch, _domain(60, labels_seed=poison))
    config = load_config('adapt_pacs', 'features=true,method=dann,'
                         'self_training=true,steps=3,batch_size=8')
    with config.unlocked():
      config.source.name = 'mnist'
      config.objective.bottleneck_dim = 8
    experiment = builder.build(config)
    assert experiment.train_data['target'].shape == (80, 16)
    state = init_state(experiment.objective, experiment.optimizer,
                       experiment.train_data, 0)
    step = jax.jit(make_train_step(experiment.objective,
                                   experiment.optimizer))
    first, metrics = step(state, experiment.train_data)
    # Source, target and its (identical) pseudo-labelled view: 3 x 8.
    assert experiment.objective.batch_units(
        experiment.objective.sample(jax.random.key(0), 0,
                                    experiment.train_data)) == 24
    assert np.isfinite(float(metrics['transfer_loss']))
    assert not np.array_equal(first.params['bottleneck']['kernel'],
                              state.params['bottleneck']['kernel'])
    for _ in range(2):
      first, _ = step(first, experiment.train_data)
    finals.append(first)
  assert embedded[:2] == [('mnist', 'efficientnet_lite0'),
                          ('pacs', 'efficientnet_lite0')]
  # The target's labels never reach training, on features too.
  jax.tree.map(np.testing.assert_array_equal, finals[0].params,
               finals[1].params)
  # Image augmentation has nothing to act on in vectors: a clear error.
  flipping = adaptation_objective(
      backbones.create('mlp'), num_classes=10, num_steps=3, method='dann',
      batch_size=8, augment=dict(flip=True))
  with pytest.raises(ValueError, match='image augmentations, but the data '
                     'are vectors'):
    flipping.sample(jax.random.key(0), 0, experiment.train_data)
