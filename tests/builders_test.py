"""Tests of the TFDS builders, `load_class_dataset` and the Omniglot protocol.

Everything runs offline on tiny generated archives in the exact release
layouts; one test uses the real images_background_small1.zip from
`../shared/data` (conftest's `shared_data` fixture: skipped when absent).
"""

from __future__ import annotations

import io
import json
import pathlib
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from fewshot.data import builders
from fewshot.data import omniglot
from fewshot.data import tfds_loading
from fewshot.data import tiny_imagenet
from fewshot.data.builders import omniglot as omniglot_builder

DRAWERS = 3

# Set -> alphabet -> number of characters. The small sets reuse background
# characters (Greek and Latin in both), as in the release.
BACKGROUND = {'Alpha': 3, 'Beta': 2, 'Gamma': 2, 'Greek': 2, 'Latin': 2}
EVALUATION = {'Delta': 2, 'Epsilon': 3}
SMALL1 = ('Alpha', 'Greek', 'Latin')
SMALL2 = ('Beta', 'Greek', 'Latin')


def _png(bits: np.ndarray) -> bytes:
  """A 1-bit PNG (mode '1') of the boolean `[H, W]` array."""
  buffer = io.BytesIO()
  Image.fromarray(bits).convert('1').save(buffer, format='PNG')
  return buffer.getvalue()


def _write_zip(path: pathlib.Path, files: dict[str, bytes]) -> None:
  """A zip with folder entries, like the release zips."""
  folders = sorted({name.rsplit('/', i)[0] + '/'
                    for name in files for i in range(1, name.count('/') + 1)})
  with zipfile.ZipFile(path, 'w') as zf:
    for folder in folders:
      zf.writestr(folder, b'')
    for name, data in files.items():
      zf.writestr(name, data)


def make_omniglot(manual_dir: pathlib.Path, seed: int = 0
                  ) -> dict[str, dict[str, np.ndarray]]:
  """Writes the four archives into `<manual_dir>/omniglot/`.

  Returns:
    split -> {'<alphabet>/character<NN>/<file>': `[105, 105]` uint8 0/255}.
  """
  rng = np.random.default_rng(seed)
  drawings: dict[str, dict[str, np.ndarray]] = {'train': {}, 'test': {}}
  char_id = 0
  for split, alphabets in (('train', BACKGROUND), ('test', EVALUATION)):
    for alphabet, num_chars in alphabets.items():
      for c in range(1, num_chars + 1):
        char_id += 1
        for drawer in range(1, DRAWERS + 1):
          key = f'{alphabet}/character{c:02d}/{char_id:04d}_{drawer:02d}.png'
          drawings[split][key] = (rng.random((105, 105)) < 0.5)
  drawings['small1'] = {k: v for k, v in drawings['train'].items()
                        if k.split('/')[0] in SMALL1}
  drawings['small2'] = {k: v for k, v in drawings['train'].items()
                        if k.split('/')[0] in SMALL2}
  folder = manual_dir / 'omniglot'
  folder.mkdir(parents=True)
  for split, stem in omniglot_builder.SPLIT_ARCHIVES.items():
    _write_zip(folder / f'{stem}.zip',
               {f'{stem}/{k}': _png(v) for k, v in drawings[split].items()})
  return {split: {k: v.astype(np.uint8) * 255 for k, v in d.items()}
          for split, d in drawings.items()}


WNIDS = ('n01443537', 'n01629819', 'n09999999')
TINY_PER_CLASS = 4


def make_tiny_imagenet(manual_dir: pathlib.Path) -> None:
  """Writes a small `tiny-imagenet-200-train.zip`; one JPEG is grayscale."""
  rng = np.random.default_rng(1)
  files = {
      'tiny-imagenet-200/wnids.txt': '\n'.join(WNIDS[::-1]).encode() + b'\n',
      'tiny-imagenet-200/words.txt': b''.join(
          f'{w}\tclass {w}, thing\n'.encode() for w in WNIDS) + b'n0\tother\n',
  }
  for k, wnid in enumerate(WNIDS):
    files[f'tiny-imagenet-200/train/{wnid}/{wnid}_boxes.txt'] = b''
    for i in range(TINY_PER_CLASS):
      gray = k == 0 and i == 0
      image = rng.integers(0, 256, (64, 64) if gray else (64, 64, 3),
                           dtype=np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format='JPEG')
      files[f'tiny-imagenet-200/train/{wnid}/images/{wnid}_{i}.JPEG'] = (
          buffer.getvalue())
  folder = manual_dir / 'tiny-imagenet'
  folder.mkdir(parents=True)
  _write_zip(folder / 'tiny-imagenet-200-train.zip', files)


@pytest.fixture(scope='module')
def omniglot_env(tmp_path_factory):
  """(manual_dir, data_dir, drawings) with fewshot_omniglot prepared."""
  root = tmp_path_factory.mktemp('omniglot')
  drawings = make_omniglot(root / 'manual')
  builder = tfds_loading.get_builder('fewshot_omniglot',
                                     data_dir=root / 'data',
                                     manual_dir=root / 'manual')
  assert builder.is_prepared()
  return root / 'manual', root / 'data', drawings


def _read_all(data_dir, split: str, name: str = 'fewshot_omniglot'):
  source = tfds.data_source(name, split=split, data_dir=data_dir,
                            builder_kwargs={'file_format': 'array_record'})
  return source.__getitems__(list(range(len(source))))


def test_builders_registered():
  assert 'fewshot_omniglot' in tfds.list_builders(with_community_datasets=False)
  assert builders.FewshotTinyImagenet.name == 'fewshot_tiny_imagenet'


def test_omniglot_counts_and_label_names(omniglot_env):
  _, data_dir, drawings = omniglot_env
  builder = tfds_loading.get_builder('fewshot_omniglot', data_dir=data_dir)
  assert builder.info.file_format.value == 'array_record'
  for split, expected in drawings.items():
    assert builder.info.splits[split].num_examples == len(expected)
  background_chars = [f'{a}/character{c:02d}' for a, n in BACKGROUND.items()
                      for c in range(1, n + 1)]
  evaluation_chars = [f'{a}/character{c:02d}' for a, n in EVALUATION.items()
                      for c in range(1, n + 1)]
  names = builder.info.features['label'].names
  assert names == background_chars + evaluation_chars
  assert builder.info.features['alphabet'].names == [*BACKGROUND, *EVALUATION]


def test_omniglot_examples_match_archives(omniglot_env):
  """Labels, alphabets, ids and pixels agree with the archives, every split."""
  _, data_dir, drawings = omniglot_env
  builder = tfds_loading.get_builder('fewshot_omniglot', data_dir=data_dir)
  label_names = builder.info.features['label'].names
  alphabet_names = builder.info.features['alphabet'].names
  for split, expected in drawings.items():
    by_label: dict[str, list[bytes]] = {}
    for example in _read_all(data_dir, split):
      image = example['image']
      assert image.shape == (105, 105, 1) and image.dtype == np.uint8
      assert set(np.unique(image)) <= {0, 255}
      name = label_names[example['label']]
      alphabet, character = name.split('/')
      assert alphabet_names[example['alphabet']] == alphabet
      assert example['alphabet_char_id'] == int(character[-2:]) - 1
      by_label.setdefault(name, []).append(image[..., 0].tobytes())
    want: dict[str, list[bytes]] = {}
    for key, image in expected.items():
      want.setdefault(key.rsplit('/', 1)[0], []).append(image.tobytes())
    assert {k: sorted(v) for k, v in by_label.items()} == {
        k: sorted(v) for k, v in want.items()}


def test_omniglot_values_are_0_and_255(omniglot_env):
  _, data_dir, _ = omniglot_env
  images = np.stack([e['image'] for e in _read_all(data_dir, 'small2')])
  assert np.array_equal(np.unique(images), [0, 255])


def test_omniglot_missing_archive(tmp_path):
  make_omniglot(tmp_path / 'manual')
  missing = tmp_path / 'manual' / 'omniglot' / 'images_evaluation.zip'
  missing.unlink()
  with pytest.raises(FileNotFoundError, match='images_evaluation.zip'):
    tfds_loading.get_builder('fewshot_omniglot', data_dir=tmp_path / 'data',
                             manual_dir=tmp_path / 'manual')


def test_omniglot_wrong_layout(tmp_path):
  make_omniglot(tmp_path / 'manual')
  path = tmp_path / 'manual' / 'omniglot' / 'images_background_small2.zip'
  bits = np.zeros((105, 105), bool)
  # No character<NN> level.
  _write_zip(path, {'images_background_small2/Greek/0001_01.png': _png(bits)})
  with pytest.raises(ValueError, match=r'images_background_small2\.zip.*'
                     r'expected every file to be'):
    tfds_loading.get_builder('fewshot_omniglot', data_dir=tmp_path / 'data',
                             manual_dir=tmp_path / 'manual')
  path.write_bytes(b'<html>not a zip</html>')
  with pytest.raises(ValueError, match=r'small2\.zip is not a zip file'):
    tfds_loading.get_builder('fewshot_omniglot', data_dir=tmp_path / 'data',
                             manual_dir=tmp_path / 'manual')


def test_omniglot_gray_image_is_an_error(tmp_path):
  make_omniglot(tmp_path / 'manual')
  path = tmp_path / 'manual' / 'omniglot' / 'images_evaluation.zip'
  buffer = io.BytesIO()
  Image.fromarray(np.full((105, 105), 128, np.uint8)).save(buffer, 'PNG')
  _write_zip(path, {'images_evaluation/Delta/character01/0001_01.png':
                    buffer.getvalue()})
  with pytest.raises(ValueError, match='gray levels'):
    tfds_loading.get_builder('fewshot_omniglot', data_dir=tmp_path / 'data',
                             manual_dir=tmp_path / 'manual')


def test_omniglot_downloads_without_manual_folder(tmp_path, monkeypatch):
  """Without a manual dir the release URLs are fetched (host reachable)."""
  make_omniglot(tmp_path / 'elsewhere')
  requested = []

  def fake_download(self, urls):
    del self
    requested.extend(urls.values())
    return {split: tmp_path / 'elsewhere' / 'omniglot' / url.rsplit('/', 1)[1]
            for split, url in urls.items()}

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fake_download)
  monkeypatch.setattr(tfds_loading.sources, 'unreachable', lambda *_: None)
  monkeypatch.delenv('FEWSHOT_MANUAL_DIR', raising=False)
  builder = tfds_loading.get_builder('fewshot_omniglot',
                                     data_dir=tmp_path / 'data')
  assert builder.is_prepared()
  assert sorted(requested) == sorted(
      f'https://github.com/brendenlake/omniglot/raw/master/python/{s}.zip'
      for s in omniglot_builder.SPLIT_ARCHIVES.values())
  assert set(builder.url_infos) == set(requested)


def test_load_class_dataset_round_trip_and_cache(omniglot_env, monkeypatch):
  manual_dir, data_dir, drawings = omniglot_env
  kwargs = dict(data_dir=data_dir, manual_dir=manual_dir, group_key='alphabet')
  test = tfds_loading.load_class_dataset('fewshot_omniglot', 'test', **kwargs)
  # Only the split's own classes, relabelled from 0, grouped by class.
  assert test.class_names == ('Delta/character01', 'Delta/character02',
                              'Epsilon/character01', 'Epsilon/character02',
                              'Epsilon/character03')
  assert test.class_groups == ('Delta',) * 2 + ('Epsilon',) * 3
  assert test.images.shape == (5 * DRAWERS, 105, 105, 1)
  assert np.all(np.diff(test.labels) >= 0)
  assert np.array_equal(test.class_counts(), [DRAWERS] * 5)
  for key, image in drawings['test'].items():
    label = test.class_names.index(key.rsplit('/', 1)[0])
    class_images = test.images[test.labels == label, ..., 0]
    assert any(np.array_equal(image, x) for x in class_images), key

  cache = list((data_dir / 'fewshot_cache').rglob('*.npz'))
  assert [p.name.startswith('test-orig-') for p in cache] == [True]
  assert not list((data_dir / 'fewshot_cache').rglob('*.tmp'))

  def fail(*args, **kwargs):
    raise AssertionError('the cache was not used')

  monkeypatch.setattr(tfds_loading, '_read_split', fail)
  again = tfds_loading.load_class_dataset('fewshot_omniglot', 'test', **kwargs)
  assert np.array_equal(again.images, test.images)
  assert np.array_equal(again.labels, test.labels)
  assert again.class_names == test.class_names
  assert again.class_groups == test.class_groups
  with pytest.raises(AssertionError, match='cache'):  # Another size: new key.
    tfds_loading.load_class_dataset('fewshot_omniglot', 'test',
                                    image_size=28, **kwargs)


def test_load_class_dataset_resizes_without_groups(omniglot_env):
  manual_dir, data_dir, _ = omniglot_env
  small = tfds_loading.load_class_dataset(
      'fewshot_omniglot', 'small1', data_dir=data_dir, manual_dir=manual_dir,
      image_size=20)
  assert small.images.shape == (7 * DRAWERS, 20, 20, 1)
  assert small.class_groups is None
  assert small.class_names[0] == 'Alpha/character01'


def test_load_class_dataset_bad_keys(omniglot_env):
  _, data_dir, _ = omniglot_env
  with pytest.raises(KeyError, match='no feature'):
    tfds_loading.load_class_dataset('fewshot_omniglot', 'small1',
                                    data_dir=data_dir, label_key='nope')
  with pytest.raises(TypeError, match='not a ClassLabel'):
    tfds_loading.load_class_dataset('fewshot_omniglot', 'small1',
                                    data_dir=data_dir,
                                    label_key='alphabet_char_id')


def test_omniglot_splits_protocol(omniglot_env):
  manual_dir, data_dir, _ = omniglot_env
  splits = omniglot.omniglot_splits(data_dir=data_dir, manual_dir=manual_dir,
                                    image_size=28, num_val_alphabets=2, seed=3)
  train, val, test = splits['train'], splits['val'], splits['test']
  val_alphabets = set(val.class_groups)
  assert len(val_alphabets) == 2
  assert val_alphabets.isdisjoint(train.class_groups)
  assert val_alphabets <= set(BACKGROUND)
  assert set(test.class_groups) == set(EVALUATION)
  num_val = sum(BACKGROUND[a] for a in val_alphabets)
  num_background = sum(BACKGROUND.values())
  assert val.num_classes == num_val
  assert train.num_classes == 4 * (num_background - num_val)
  assert test.num_classes == sum(EVALUATION.values())
  names = [set(s.class_names) for s in splits.values()]
  assert sum(map(len, names)) == len(set.union(*names))  # No overlap.
  unrotated = {n.split('/rot')[0] for n in train.class_names}
  assert unrotated.isdisjoint(val.class_names)
  assert sum(n.endswith('/rot180') for n in train.class_names) == (
      num_background - num_val)
  for s in splits.values():
    assert s.image_shape == (28, 28, 1)
    assert np.all(s.class_counts() == DRAWERS)
  # Seeded and reproducible; rotations optional.
  again = omniglot.omniglot_splits(data_dir=data_dir, manual_dir=manual_dir,
                                   num_val_alphabets=2, seed=3,
                                   rotations=False)
  assert again['val'].class_names == val.class_names
  assert again['train'].num_classes == num_background - num_val


def test_validation_alphabets_are_seeded():
  alphabets = [f'A{i}' for i in range(30)]
  first = omniglot.validation_alphabets(alphabets, 5, seed=0)
  assert first == omniglot.validation_alphabets(alphabets[::-1], 5, seed=0)
  assert len(first) == 5 and first != omniglot.validation_alphabets(
      alphabets, 5, seed=1)
  with pytest.raises(ValueError):
    omniglot.validation_alphabets(alphabets, 30, seed=0)


def test_tiny_imagenet_builder(tmp_path):
  make_tiny_imagenet(tmp_path / 'manual')
  data_dir = tmp_path / 'data'
  builder = tfds_loading.get_builder('fewshot_tiny_imagenet',
                                     data_dir=data_dir,
                                     manual_dir=tmp_path / 'manual')
  assert builder.info.splits['train'].num_examples == 3 * TINY_PER_CLASS
  assert builder.info.features['label'].names == sorted(WNIDS)
  examples = _read_all(data_dir, 'train', 'fewshot_tiny_imagenet')
  assert all(e['image'].shape == (64, 64, 3) for e in examples)
  descriptions = tiny_imagenet.tiny_imagenet_descriptions(data_dir=data_dir)
  assert descriptions == {w: f'class {w}, thing' for w in sorted(WNIDS)}

  dataset = tfds_loading.load_class_dataset(
      'fewshot_tiny_imagenet', 'train', data_dir=data_dir)
  assert dataset.images.shape == (3 * TINY_PER_CLASS, 64, 64, 3)
  assert dataset.class_names == tuple(sorted(WNIDS))
  gray = [np.array_equal(x[..., 0], x[..., 1]) and
          np.array_equal(x[..., 0], x[..., 2]) for x in dataset.images]
  assert sum(gray) == 1 and dataset.labels[gray.index(True)] == 0


def test_tiny_imagenet_errors(tmp_path):
  (tmp_path / 'manual' / 'tiny-imagenet').mkdir(parents=True)
  (tmp_path / 'manual' / 'README').write_text('not empty')
  with pytest.raises(FileNotFoundError, match='tiny-imagenet-200-train.zip'):
    tfds_loading.get_builder('fewshot_tiny_imagenet',
                             data_dir=tmp_path / 'data',
                             manual_dir=tmp_path / 'manual')
  path = tmp_path / 'manual' / 'tiny-imagenet' / 'tiny-imagenet-200-train.zip'
  _write_zip(path, {
      'tiny-imagenet-200/wnids.txt': b'n01443537\n',
      'tiny-imagenet-200/words.txt': b'n01443537\tgoldfish\n',
      'tiny-imagenet-200/train/n02/images/n02_0.JPEG': b'',
  })
  with pytest.raises(ValueError, match='not in tiny-imagenet-200/wnids.txt'):
    tfds_loading.get_builder('fewshot_tiny_imagenet',
                             data_dir=tmp_path / 'data',
                             manual_dir=tmp_path / 'manual')


def test_tiny_imagenet_split_file():
  split = tiny_imagenet.tiny_imagenet_class_split()
  assert {k: len(v) for k, v in split.items()} == {
      'train': 120, 'val': 40, 'test': 40}
  everything = [w for v in split.values() for w in v]
  assert len(set(everything)) == 200
  record = json.loads(tiny_imagenet.SPLIT_FILE.read_text())
  # The committed lists are what the script makes from the same wnids.
  from helpers import load_module  # pylint: disable=g-import-not-at-top
  module = load_module(tiny_imagenet.SPLIT_FILE.with_name(
      'make_tiny_imagenet_split.py'))
  assert module.make_split(everything, record['seed']) == split


def test_tiny_imagenet_splits(tmp_path, monkeypatch):
  make_tiny_imagenet(tmp_path / 'manual')
  monkeypatch.setattr(tiny_imagenet, 'tiny_imagenet_class_split', lambda: {
      'train': [WNIDS[0]], 'val': [WNIDS[2]], 'test': [WNIDS[1]]})
  splits = tiny_imagenet.tiny_imagenet_splits(
      data_dir=tmp_path / 'data', manual_dir=tmp_path / 'manual',
      image_size=32)
  assert splits['val'].class_names == (WNIDS[2],)
  assert all(s.images.shape == (TINY_PER_CLASS, 32, 32, 3)
             for s in splits.values())


class FewshotTestVariableImages(tfds.core.GeneratorBasedBuilder):
  """A generic dataset: other keys, images of varying sizes, a -1 label."""

  VERSION = tfds.core.Version('0.1.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'picture': tfds.features.Image(shape=(None, None, 3)),
            'kind': tfds.features.ClassLabel(names=['cat', 'dog', 'eel']),
            'family': np.int64,
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(10):
      buffer = io.BytesIO()
      Image.fromarray(np.full((10 + i, 12, 3), i, np.uint8)).save(buffer, 'PNG')
      yield str(i), {'picture': buffer.getvalue(),
                     'kind': i % 3 if i < 9 else -1,
                     'family': int(i % 3 == 2)}


def test_load_any_tfds_dataset(tmp_path):
  kwargs = dict(data_dir=tmp_path, image_key='picture', label_key='kind')
  with pytest.raises(ValueError, match='pass image_size'):
    tfds_loading.load_class_dataset('fewshot_test_variable_images', 'train',
                                    **kwargs)
  dataset = tfds_loading.load_class_dataset(
      'fewshot_test_variable_images', 'train', group_key='family',
      image_size=8, **kwargs)
  assert dataset.class_names == ('cat', 'dog', 'eel')
  assert dataset.class_groups == ('0', '0', '1')
  assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # No -1.
  assert dataset.images.shape == (9, 8, 8, 3)
  firsts = dataset.images[:, 0, 0, 0]  # Example i is filled with value i.
  assert [sorted(firsts[dataset.labels == c]) for c in range(3)] == [
      [0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_corrupt_cache_is_rebuilt(omniglot_env):
  manual_dir, data_dir, _ = omniglot_env
  kwargs = dict(data_dir=data_dir, manual_dir=manual_dir, image_size=12)
  first = tfds_loading.load_class_dataset('fewshot_omniglot', 'small2',
                                          **kwargs)
  [path] = (data_dir / 'fewshot_cache').rglob('small2-12-*.npz')
  path.write_bytes(path.read_bytes()[:100])
  again = tfds_loading.load_class_dataset('fewshot_omniglot', 'small2',
                                          **kwargs)
  assert np.array_equal(first.images, again.images)
  assert path.stat().st_size > 1000


def test_environment_defaults(tmp_path, monkeypatch):
  monkeypatch.setenv(tfds_loading.DATA_DIR_ENV, str(tmp_path / 'd'))
  monkeypatch.setenv(tfds_loading.MANUAL_DIR_ENV, str(tmp_path / 'm'))
  assert tfds_loading.default_data_dir() == str(tmp_path / 'd')
  assert tfds_loading.default_manual_dir() == str(tmp_path / 'm')
  assert tfds_loading.default_data_dir('x') == 'x'
  monkeypatch.delenv(tfds_loading.DATA_DIR_ENV)
  assert tfds_loading.default_data_dir() is None


def test_real_small1_prepares(tmp_path, shared_data):
  """The real small1 zip: 2,720 images of 136 characters, values 0/255.

  The other three archives are small generated ones, to keep this fast.
  """
  make_omniglot(tmp_path / 'manual')
  target = tmp_path / 'manual' / 'omniglot' / 'images_background_small1.zip'
  target.unlink()
  target.symlink_to(shared_data / 'omniglot' / 'images_background_small1.zip')
  dataset = tfds_loading.load_class_dataset(
      'fewshot_omniglot', 'small1', data_dir=tmp_path / 'data',
      manual_dir=tmp_path / 'manual', group_key='alphabet')
  assert dataset.images.shape == (2720, 105, 105, 1)
  assert dataset.num_classes == 136
  assert len(set(dataset.class_groups)) == 5
  assert np.all(dataset.class_counts() == 20)
  assert np.array_equal(np.unique(dataset.images), [0, 255])
