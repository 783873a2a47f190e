"""Every config file builds, and its argument parser rejects unknown keys."""

import importlib.util
import pathlib

import pytest

from fewshot import train
from fewshot.config_args import parse_arg

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] /
                  'configs').glob('*.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_documents_its_command(path):
  module = _load(path)
  config = module.get_config()
  assert 'experiments/train.py' in module.__doc__
  for section in ('data', 'backbone', 'algorithm', 'optimizer', 'train',
                  'eval'):
    assert section in config, section
  # Every section's keys are accepted by what it configures (no data needed).
  train.make_optimizer(num_steps=config.train.num_steps, **config.optimizer)
  with pytest.raises(ValueError, match='Unknown config argument'):
    module.get_config('no_such_argument=1')


def test_parse_arg_types_values_like_defaults():
  args = parse_arg('ways=20,lr=0.5,name=x,flag=true', ways=5, lr=1.0,
                   name='a', flag=False)
  assert (args.ways, args.lr, args.name, args.flag) == (20, 0.5, 'x', True)
  with pytest.raises(ValueError, match='key=value'):
    parse_arg('ways', ways=5)
