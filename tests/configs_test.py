"""Every config file builds, and its argument parser rejects unknown keys."""

import importlib.util
import pathlib

import pytest

from fewshot import pretrain
from fewshot import train
from fewshot._utils import check_options
from fewshot.algorithms import ALGORITHMS
from fewshot.config_args import parse_arg

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] /
                  'configs').glob('*.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# What each kind of config file configures, by the entry point it documents.
_SECTIONS = {
    'train': ('data', 'backbone', 'algorithm', 'optimizer', 'train', 'eval'),
    'pretrain': ('data', 'backbone', 'algorithm', 'head', 'optimizer',
                 'train', 'eval'),
    'evaluate': ('data', 'backbone', 'algorithm', 'eval'),
    'transfer_report': ('target', 'pretrained', 'scratch', 'sizes', 'eval'),
}


def _kind(path):
  if path.stem.startswith('transfer_report'):
    return 'transfer_report'
  if path.stem.startswith('transfer_'):
    return 'evaluate'
  if path.stem.startswith('pretrain_'):
    return 'pretrain'
  return 'train'


def _check_algorithm(section):
  options = dict(section)
  name = options.pop('name')
  check_options(ALGORITHMS[name], options, f'algorithm {name!r}')


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_documents_its_command(path):
  module = _load(path)
  config = module.get_config()
  kind = _kind(path)
  assert f'experiments/{kind}.py' in module.__doc__
  for section in _SECTIONS[kind]:
    assert section in config, section
  # Every section's keys are accepted by what it configures (no data needed).
  if kind == 'train':
    train.make_optimizer(num_steps=config.train.num_steps, **config.optimizer)
  if kind == 'pretrain':
    pretrain.make_pretrain_optimizer(num_steps=config.train.num_steps,
                                     **config.optimizer)
  if kind == 'transfer_report':
    _check_algorithm(config.pretrained.algorithm)
    _check_algorithm(config.scratch.algorithm)
  else:
    _check_algorithm(config.algorithm)
  with pytest.raises(ValueError, match='Unknown config argument'):
    module.get_config('no_such_argument=1')


def test_transfer_config_variants():
  module = _load(next(p for p in CONFIGS if p.stem == 'transfer_tiny_imagenet'))
  for arg in ('algorithm=fine_tune', 'algorithm=simpleshot',
              'backbone=resnet12,weights=runs/x,algorithm=fine_tune'):
    config = module.get_config(arg)
    _check_algorithm(config.algorithm)
    assert config.eval.precompute_features == (
        config.algorithm.name != 'fine_tune')
  stages = module.get_config('algorithm=fine_tune,steps=9').algorithm.unfreeze
  assert [start for start, _ in stages] == [0, 3, 6]
  with pytest.raises(ValueError, match='needs weights'):
    module.get_config('backbone=resnet12')


def test_parse_arg_types_values_like_defaults():
  args = parse_arg('ways=20,lr=0.5,name=x,flag=true', ways=5, lr=1.0,
                   name='a', flag=False)
  assert (args.ways, args.lr, args.name, args.flag) == (20, 0.5, 'x', True)
  with pytest.raises(ValueError, match='key=value'):
    parse_arg('ways', ways=5)
