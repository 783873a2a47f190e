"""Offline, a dataset not found fails in seconds, saying what goes where.

No dataset is prepared and no network is used: the probe's socket is patched
(refused, or hanging to stand for a dead name server), and a download that
is attempted at all fails the test.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds

from fewshot.data import domains, multimnist, sources, text_splits
from fewshot.data import tfds_loading
from fewshot.data.builders import omniglot as omniglot_builder

from helpers import REPO

FAST_S = 20.0
OMNIGLOT_ZIPS = ('images_background.zip', 'images_evaluation.zip',
                 'images_background_small1.zip',
                 'images_background_small2.zip')
IDX_STEMS = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
             't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
  """No test may reach TFDS's download manager, nor read $FEWSHOT_*."""
  def download(self, urls):
    del self
    raise AssertionError(f'a download was attempted: {urls}')
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', download)
  monkeypatch.delenv('FEWSHOT_MANUAL_DIR', raising=False)
  monkeypatch.delenv('FEWSHOT_DATA_DIR', raising=False)


@pytest.fixture
def refused(monkeypatch):
  """Every probe's connect fails at once, whatever this machine's network."""
  calls = []

  def connect(address, timeout=None, **kwargs):
    del kwargs
    calls.append((address, timeout))
    raise ConnectionRefusedError(111, 'Connection refused')
  monkeypatch.setattr(socket, 'create_connection', connect)
  return calls


def _fails_fast(fn, *args, **kwargs) -> str:
  """Runs `fn`; returns its FileNotFoundError's message, checking the time."""
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    fn(*args, **kwargs)
  elapsed = time.monotonic() - start
  assert elapsed < FAST_S, f'took {elapsed:.1f} s: {info.value}'
  return str(info.value)


def _names_everything(message: str, files, where: str, *,
                      config_key: bool = True) -> None:
  assert '$FEWSHOT_MANUAL_DIR' in message, message
  if config_key:
    assert '--config.data.manual_dir' in message, message
  for name in files:
    assert name in message, (name, message)
  assert where in message, (where, message)


# Omniglot: the manual dir given lacks the zips / none given and offline.


@pytest.mark.parametrize('layout', ['missing_dir', 'empty_dir', 'no_subdir',
                                    'one_zip_missing'])
def test_omniglot_manual_dir_without_the_zips_fails_at_once(
    tmp_path, refused, layout):
  manual = tmp_path / 'manual'
  if layout != 'missing_dir':
    manual.mkdir()
  if layout == 'no_subdir':
    (manual / 'mnist').mkdir()
  if layout == 'one_zip_missing':
    (manual / 'omniglot').mkdir()
    for name in OMNIGLOT_ZIPS[1:]:
      (manual / 'omniglot' / name).write_bytes(b'')
  message = _fails_fast(tfds_loading.get_builder, 'fewshot_omniglot',
                        data_dir=tmp_path / 'data', manual_dir=manual)
  _names_everything(message, OMNIGLOT_ZIPS, f'{manual}/omniglot/')
  if layout == 'one_zip_missing':
    assert f'lacks {OMNIGLOT_ZIPS[0]}' in message, message
  assert not refused  # given a manual dir, the network is never tried


def test_omniglot_manual_dir_from_the_environment(tmp_path, monkeypatch,
                                                  refused):
  monkeypatch.setenv('FEWSHOT_MANUAL_DIR', str(tmp_path / 'nonexistent'))
  message = _fails_fast(tfds_loading.get_builder, 'fewshot_omniglot',
                        data_dir=tmp_path / 'data')
  _names_everything(message, OMNIGLOT_ZIPS, f'{tmp_path}/nonexistent/omniglot/')
  assert 'does not exist' in message
  assert not refused


def test_omniglot_without_manual_dir_offline(tmp_path, refused):
  message = _fails_fast(tfds_loading.get_builder, 'fewshot_omniglot',
                        data_dir=tmp_path / 'data')
  _names_everything(message, OMNIGLOT_ZIPS, '<manual_dir>/omniglot/')
  assert 'no manual dir is set' in message
  assert 'github.com:443' in message and 'refused' in message
  assert refused == [(('github.com', 443), sources.PROBE_TIMEOUT_S)]


def test_omniglot_without_manual_dir_dead_name_server(tmp_path, monkeypatch):
  """A connect (or name lookup) that hangs is abandoned after a few seconds."""
  monkeypatch.setattr(socket, 'create_connection',
                      lambda *args, **kwargs: time.sleep(60))
  start = time.monotonic()
  message = _fails_fast(tfds_loading.get_builder, 'fewshot_omniglot',
                        data_dir=tmp_path / 'data')
  assert time.monotonic() - start < sources.PROBE_TIMEOUT_S + 5
  assert 'did not answer within 3 s' in message
  _names_everything(message, OMNIGLOT_ZIPS, '<manual_dir>/omniglot/')


def test_omniglot_through_tfds_directly_probes_too(tmp_path, refused):
  """`tfds.builder(...).download_and_prepare` without the zips, offline."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'README').write_text('not empty')
  builder = tfds.builder('fewshot_omniglot', data_dir=tmp_path / 'data',
                         file_format='array_record')
  message = _fails_fast(
      builder.download_and_prepare,
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  _names_everything(message, OMNIGLOT_ZIPS, f'{manual}/omniglot/')
  assert refused


def test_omniglot_online_hands_over_to_the_download(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'unreachable', lambda *_: None)
  with pytest.raises(FileNotFoundError, match='the download from .* failed'):
    tfds_loading.get_builder('fewshot_omniglot', data_dir=tmp_path / 'data')


def test_probe_uses_the_https_proxy(monkeypatch, refused):
  monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
  monkeypatch.delenv('no_proxy', raising=False)
  monkeypatch.delenv('NO_PROXY', raising=False)
  why = sources.unreachable('github.com')
  assert refused[0][0] == ('proxy.example', 3128)
  assert 'proxy.example:3128' in why


def test_omniglot_check_passes_with_the_zips(tmp_path, refused):
  folder = tmp_path / 'omniglot'
  folder.mkdir()
  for name in OMNIGLOT_ZIPS:
    (folder / name).write_bytes(b'')
  omniglot_builder.FewshotOmniglot.check_sources(str(tmp_path))
  assert not refused


# Tiny-ImageNet (never downloaded).


@pytest.mark.parametrize('given', [True, False])
def test_tiny_imagenet_fails_at_once(tmp_path, refused, given):
  manual = tmp_path / 'manual' if given else None
  message = _fails_fast(tfds_loading.get_builder, 'fewshot_tiny_imagenet',
                        data_dir=tmp_path / 'data', manual_dir=manual)
  where = f'{manual}/tiny-imagenet/' if given else '<manual_dir>/tiny-imagenet/'
  _names_everything(message, ['tiny-imagenet-200-train.zip'], where)
  assert not refused


# A TFDS dataset of someone else's, not prepared, offline.


def test_other_tfds_dataset_offline(tmp_path, refused):
  message = _fails_fast(tfds_loading.get_builder, 'mnist',
                        data_dir=tmp_path / 'data')
  _names_everything(message, ['train-images-idx3-ubyte.gz'], '<manual_dir>/')
  assert refused


# The loaders that read the manual dir without TFDS.


@pytest.mark.parametrize('name,subdir,files', [
    ('mnist', 'mnist', IDX_STEMS),
    ('usps', 'usps', ('zip.train', 'zip.test')),
    ('fashion_mnist', 'fashion-mnist', IDX_STEMS),
    ('pacs', 'pacs', ('pacs_128.zip',)),
])
@pytest.mark.parametrize('given', [True, False])
def test_domains_fail_at_once(tmp_path, monkeypatch, name, subdir, files,
                              given):
  monkeypatch.setattr(domains, 'FASHION_SYSTEM_DIR', str(tmp_path / 'system'))
  manual = tmp_path / 'manual' if given else None
  message = _fails_fast(domains.load_domain, name, manual_dir=manual,
                        **({'domain': 'photo'} if name == 'pacs' else {}))
  where = f'{manual}/{subdir}/' if given else f'<manual_dir>/{subdir}/'
  _names_everything(message, files, where, config_key=False)


@pytest.mark.parametrize('source,subdir', [('mnist', 'mnist'),
                                           ('fashion', 'fashion-mnist')])
def test_multimnist_fails_at_once(tmp_path, monkeypatch, source, subdir):
  monkeypatch.setattr(multimnist, 'FASHION_SYSTEM_DIR', str(tmp_path / 'sys'))
  message = _fails_fast(multimnist.default_source_dir, source,
                        tmp_path / 'manual')
  _names_everything(message, IDX_STEMS, f'{tmp_path}/manual/{subdir}/',
                    config_key=False)


def test_banking77_fails_at_once(tmp_path):
  (tmp_path / 'banking77').mkdir()
  (tmp_path / 'banking77' / 'train.csv').write_text('text,category\n')
  message = _fails_fast(text_splits.banking77_splits, tokenizer='unused',
                        manual_dir=tmp_path)
  _names_everything(message, ['train.csv', 'test.csv'],
                    f'{tmp_path}/banking77/')
  assert 'lacks test.csv' in message


# The user's command, end to end (fails before any training or compiling).


def test_train_script_without_the_archives(tmp_path):
  env = dict(os.environ, FEWSHOT_MANUAL_DIR=str(tmp_path / 'nonexistent'),
             FEWSHOT_DATA_DIR=str(tmp_path / 'data'), JAX_PLATFORMS='cpu')
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, 'experiments/train.py', '--config',
       'configs/protonet_omniglot.py', '--workdir', str(tmp_path / 'run')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  elapsed = time.monotonic() - start
  assert result.returncode != 0
  assert elapsed < 60, f'took {elapsed:.1f} s'
  # One line, no traceback: train.py prints what the error says.
  last, = [l for l in result.stderr.strip().splitlines()
           if 'Omniglot not found' in l]
  assert last.startswith('train.py: FileNotFoundError: Omniglot not found')
  assert 'Traceback' not in result.stderr
  _names_everything(last, OMNIGLOT_ZIPS,
                    f'{tmp_path}/nonexistent/omniglot/')
  assert not pathlib.Path(tmp_path / 'run' / 'checkpoints').exists()
