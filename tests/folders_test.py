"""The class-folder loader: plain, pre-split and zipped layouts."""

import zipfile

import numpy as np
import pytest
from PIL import Image

from fewshot import data


def _write(root, classes=5, per_class=3, prefix=''):
  for c in range(classes):
    folder = root / prefix / f'class_{c}'
    folder.mkdir(parents=True)
    for i in range(per_class):
      pixels = np.full((10, 12, 3), 40 * c + i, np.uint8)
      Image.fromarray(pixels).save(folder / f'{i}.png')


def test_a_class_folder_is_split_by_class(tmp_path):
  _write(tmp_path, classes=5)
  splits = data.load_splits('folder', root=str(tmp_path), image_size=8,
                            channels=1, fractions=(0.6, 0.2, 0.2))
  assert [splits[s].num_classes for s in ('train', 'val', 'test')] == [3, 1, 1]
  names = [n for s in splits.values() for n in s.class_names]
  assert sorted(names) == [f'class_{c}' for c in range(5)]
  train = splits['train']
  assert train.images.shape == (9, 8, 8, 1) and train.images.dtype == np.uint8
  # Each image keeps its own class's pixel value.
  for image, label in zip(train.images, train.labels):
    c = int(train.class_names[label].split('_')[1])
    assert 40 * c <= image.mean() <= 40 * c + 3


def test_split_folders_and_zips(tmp_path):
  for split, classes in (('train', 3), ('val', 2), ('test', 2)):
    _write(tmp_path / 'mine', classes=classes, prefix=split)
  archive = tmp_path / 'mine.zip'
  with zipfile.ZipFile(archive, 'w') as z:
    for path in (tmp_path / 'mine').rglob('*.png'):
      z.write(path, path.relative_to(tmp_path).as_posix())
    z.writestr('__MACOSX/mine/train/class_0/._0.png', b'not an image')
  for root in (tmp_path / 'mine', archive):
    splits = data.load_splits('folder', root=str(root), image_size=6)
    assert {s: splits[s].num_classes for s in splits} == dict(
        train=3, val=2, test=2)
    assert splits['val'].images.shape == (6, 6, 6, 3)


def test_bad_roots_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither a folder nor a zip'):
    data.load_splits('folder', root=str(tmp_path / 'missing'))
  (tmp_path / 'flat').mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'flat' / 'a.png')
  with pytest.raises(ValueError, match='Expected .*<class>/<image>'):
    data.load_splits('folder', root=str(tmp_path / 'flat'))
