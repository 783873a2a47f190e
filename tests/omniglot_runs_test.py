"""Tests of `read_omniglot_runs` on a generated folder in the release layout."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image
import pytest

from fewshot.data import omniglot

NUM_RUNS = 2
WAYS = 20


def _save_bits(path: pathlib.Path, bits: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(bits).convert('1').save(path)


def make_runs(root: pathlib.Path, seed: int = 0) -> list[np.ndarray]:
  """Writes `root/runNN/...`; test item i is a noisy copy of its class.

  Returns:
    Per run, `[WAYS]` index of the correct training image of each test item.
  """
  rng = np.random.default_rng(seed)
  answers = []
  for run in range(1, NUM_RUNS + 1):
    name = f'run{run:02d}'
    classes = rng.random((WAYS, 105, 105)) < 0.5
    answer = rng.permutation(WAYS)
    lines = []
    for c in range(WAYS):
      _save_bits(root / name / 'training' / f'class{c + 1:02d}.png',
                 classes[c])
    for i in range(WAYS):
      _save_bits(root / name / 'test' / f'item{i + 1:02d}.png',
                 classes[answer[i]])
      lines.append(f'{name}/test/item{i + 1:02d}.png '
                   f'{name}/training/class{answer[i] + 1:02d}.png')
    # Published files list the items in order; shuffle to test the parsing.
    order = rng.permutation(WAYS)
    (root / name / 'class_labels.txt').write_text(
        '\n'.join(lines[i] for i in order) + '\n')
    answers.append(answer)
  return answers


def test_reads_runs(tmp_path):
  answers = make_runs(tmp_path / 'all_runs')
  runs = omniglot.read_omniglot_runs(tmp_path / 'all_runs', image_size=None)
  assert [r.name for r in runs] == ['run01', 'run02']
  for run, answer in zip(runs, answers):
    assert run.training_images.shape == (WAYS, 105, 105, 1)
    assert run.test_images.shape == (WAYS, 105, 105, 1)
    assert run.training_images.dtype == np.uint8
    assert np.array_equal(np.unique(run.training_images), [0, 255])
    assert np.array_equal(run.test_labels, answer)
    assert run.test_labels.dtype == np.int32
    for i in range(WAYS):
      assert np.array_equal(run.test_images[i],
                            run.training_images[run.test_labels[i]])


def test_resizes(tmp_path):
  make_runs(tmp_path)
  runs = omniglot.read_omniglot_runs(tmp_path)  # Default image_size=28.
  assert runs[0].training_images.shape == (WAYS, 28, 28, 1)
  assert runs[1].test_images.shape == (WAYS, 28, 28, 1)


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    omniglot.read_omniglot_runs(tmp_path / 'nowhere')


def test_no_runs(tmp_path):
  (tmp_path / 'other').mkdir()
  with pytest.raises(ValueError, match='No runNN/ folders'):
    omniglot.read_omniglot_runs(tmp_path)


def test_missing_labels_file(tmp_path):
  make_runs(tmp_path)
  (tmp_path / 'run02' / 'class_labels.txt').unlink()
  with pytest.raises(FileNotFoundError, match='run02/class_labels.txt'):
    omniglot.read_omniglot_runs(tmp_path)


def test_stray_file(tmp_path):
  make_runs(tmp_path)
  (tmp_path / 'run01' / 'training' / 'notes.txt').write_text('x')
  with pytest.raises(ValueError, match='notes.txt'):
    omniglot.read_omniglot_runs(tmp_path)


def test_missing_subfolder(tmp_path):
  make_runs(tmp_path)
  for path in (tmp_path / 'run01' / 'test').iterdir():
    path.unlink()
  (tmp_path / 'run01' / 'test').rmdir()
  with pytest.raises(FileNotFoundError, match='run01/test'):
    omniglot.read_omniglot_runs(tmp_path)


@pytest.mark.parametrize('bad_line, message', [
    ('run01/test/item01.png', 'expected'),
    ('run01/test/item01.png run01/training/class99.png', 'class99'),
    ('run01/test/item01.png run01/training/class01.png\n'
     'run01/test/item01.png run01/training/class02.png', 'labelled twice'),
])
def test_bad_labels_file(tmp_path, bad_line, message):
  make_runs(tmp_path)
  (tmp_path / 'run01' / 'class_labels.txt').write_text(bad_line + '\n')
  with pytest.raises(ValueError, match=message):
    omniglot.read_omniglot_runs(tmp_path)


def test_unlabelled_item(tmp_path):
  make_runs(tmp_path)
  path = tmp_path / 'run02' / 'class_labels.txt'
  path.write_text('\n'.join(path.read_text().splitlines()[1:]) + '\n')
  with pytest.raises(ValueError, match='no label'):
    omniglot.read_omniglot_runs(tmp_path)
