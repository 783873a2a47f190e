"""An unknown `--config.<key>` names its section and the keys that exist.

The scripts run as subprocesses with a bad override: they must exit 1 with
absl's flag error, before any JAX work, without a traceback.
"""

import os
import re
import subprocess
import sys

from absl import flags
import pytest

from fewshot import config_flags
from helpers import REPO, load_config

EXPERIMENTS = REPO / 'experiments'
CONFIG = 'configs/protonet_synthetic.py'
SCRIPTS = sorted(p.name for p in EXPERIMENTS.glob('*.py')
                 if not p.name.startswith('_'))


def _has_config_flag(script: str) -> bool:
  # pretrain.py runs train.py's main with train.py's flags.
  text = (EXPERIMENTS / script).read_text()
  return ('DEFINE_config_file' in text or
          re.search(r'^import train\b', text, re.M) is not None)


CONFIG_SCRIPTS = [s for s in SCRIPTS if _has_config_flag(s)]
TRAIN_KEYS = sorted(load_config('protonet_synthetic').train.keys())


def _run(script: str, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, f'experiments/{script}', '--config', CONFIG,
       '--workdir', '/nonexistent/never_written', *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_every_script_with_a_config_flag_uses_the_checked_one():
  for script in SCRIPTS:
    text = (EXPERIMENTS / script).read_text()
    assert 'ml_collections import config_flags' not in text, script
    if 'DEFINE_config_file' in text:
      assert 'from fewshot import config_flags' in text, script


def test_the_scripts_with_a_config_flag_are_found():
  assert {'train.py', 'evaluate.py', 'pretrain.py',
          'transfer_report.py'} <= set(CONFIG_SCRIPTS)


@pytest.mark.parametrize('script', CONFIG_SCRIPTS)
def test_unknown_key_names_its_section_and_the_keys(script):
  result = _run(script, '--config.train.no_such_key=1')
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert ("Unknown config key --config.train.no_such_key: section 'train' "
          "has no key 'no_such_key'; its keys are: "
          f'{", ".join(TRAIN_KEYS)}.') in result.stderr, result.stderr
  assert result.stderr.startswith('FATAL Flags parsing error'), result.stderr


def test_unknown_section_lists_the_sections():
  result = _run('train.py', '--config.trian.num_steps=2')
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  match = re.search(r"no section 'trian'; its sections are: ([^.(]*)",
                    result.stderr)
  assert match, result.stderr
  assert match[1].strip().split(', ') == [
      'algorithm', 'backbone', 'data', 'eval', 'objective', 'optimizer',
      'train']
  assert 'top-level keys: seed' in result.stderr
  assert "Did you mean 'train'?" in result.stderr


def _parse(*overrides: str, **kwargs):
  argv = ['prog', '--config', str(REPO / CONFIG), *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      'config', None, 'test', flag_values=flag_values, sys_argv=argv,
      **kwargs)
  flag_values(argv)
  return holder.value


def test_good_overrides_still_apply():
  config = _parse('--config.train.num_steps=2', '--config.seed=3',
                  '--config.data.noise=0.5')
  assert config.train.num_steps == 2
  assert config.seed == 3
  assert config.data.noise == 0.5
  assert config.is_locked
  assert _parse().train.num_steps == load_config(
      'protonet_synthetic').train.num_steps


@pytest.mark.parametrize('override,expected', [
    ('--config.train.num_step=2',
     "section 'train' has no key 'num_step'; its keys are: "
     f"{', '.join(TRAIN_KEYS)}. Did you mean 'num_steps'?"),
    ('--config.nosuch=1', "the config has no key 'nosuch'; its sections are"),
    ('--config.train.deeper.key=1',
     "Unknown config section --config.train.deeper.key: section 'train' has "
     "no section 'deeper'"),
    ('--config.seed.x=1',
     'seed is 0, not a config section, so it has no keys to set'),
])
def test_bad_overrides_are_flag_errors(override, expected):
  with pytest.raises(flags.IllegalFlagValueError) as info:
    _parse(override)
  assert expected in str(info.value)


def test_the_check_alone():
  config = load_config('protonet_synthetic')
  assert config_flags.unknown_override_error(config, 'train.num_steps') is None
  assert config_flags.unknown_override_error(config, 'seed') is None
  assert 'has no key' in config_flags.unknown_override_error(
      config, 'eval.wayz')
  with pytest.raises(flags.IllegalFlagValueError, match="section 'eval'"):
    config_flags.check_overrides(config, ['train.num_steps', 'eval.wayz'])
