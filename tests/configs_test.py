"""Every config file builds, and its argument parser is strict."""

import pytest

from fewshot._utils import check_options
from fewshot.algorithms import ALGORITHMS
from fewshot.config_args import eval_section, parse_arg
from fewshot.objectives import OBJECTIVES
from fewshot.optimizers import make_optimizer
from helpers import CONFIGS, load_config, load_config_module

PATHS = sorted(CONFIGS.glob('*.py'))

# What each kind of config file configures, by the entry point it documents.
_SECTIONS = {
    'train': ('data', 'backbone', 'algorithm', 'objective', 'optimizer',
              'train', 'eval'),
    'evaluate': ('data', 'backbone', 'algorithm', 'eval'),
    'transfer_report': ('target', 'pretrained', 'scratch', 'sizes', 'eval'),
}


def _kind(path):
  if path.stem.startswith('transfer_report'):
    return 'transfer_report'
  if path.stem.startswith(('transfer_', 'text_')):
    return 'evaluate'
  return 'train'


def _check_section(registry, section, what):
  options = dict(section)
  name = options.pop('name')
  check_options(registry[name], options, f'{what} {name!r}')


@pytest.mark.parametrize('path', PATHS, ids=lambda p: p.stem)
def test_config_builds_and_documents_its_command(path):
  module = load_config_module(path.stem)
  config = module.get_config()
  kind = _kind(path)
  assert f'experiments/{kind}.py' in module.__doc__
  sections = _SECTIONS[kind]
  if 'source' in config:  # adaptation: two domains instead of one dataset
    sections = ('source', 'target') + tuple(s for s in sections if s != 'data')
  for section in sections:
    assert section in config, section
  # Every section's keys are accepted by what it configures (no data needed).
  if kind == 'train':
    make_optimizer(num_steps=config.train.num_steps, **config.optimizer)
    _check_section(OBJECTIVES, config.objective, 'objective')
  if kind == 'transfer_report':
    _check_section(ALGORITHMS, config.pretrained.algorithm, 'algorithm')
    _check_section(ALGORITHMS, config.scratch.algorithm, 'algorithm')
  else:
    _check_section(ALGORITHMS, config.algorithm, 'algorithm')
  with pytest.raises(ValueError, match='Unknown config argument'):
    module.get_config('no_such_argument=1')


def test_transfer_config_variants():
  for arg in ('algorithm=fine_tune', 'algorithm=simpleshot',
              'backbone=resnet12,weights=runs/x,algorithm=fine_tune'):
    config = load_config('transfer_tiny_imagenet', arg)
    _check_section(ALGORITHMS, config.algorithm, 'algorithm')
    assert config.eval.precompute_features == (
        config.algorithm.name != 'fine_tune')
  stages = load_config('transfer_tiny_imagenet',
                       'algorithm=fine_tune,steps=9').algorithm.unfreeze
  assert [start for start, _ in stages] == [0, 3, 6]
  with pytest.raises(ValueError, match='needs weights'):
    load_config('transfer_tiny_imagenet', 'backbone=resnet12')


def test_parse_arg_types_values_like_defaults():
  args = parse_arg('ways=20,lr=0.5,name=x,flag=true', ways=5, lr=1.0,
                   name='a', flag=False)
  assert (args.ways, args.lr, args.name, args.flag) == (20, 0.5, 'x', True)
  assert parse_arg('flag=0', flag=True).flag is False
  with pytest.raises(ValueError, match='key=value'):
    parse_arg('ways', ways=5)
  with pytest.raises(ValueError, match="shift='flase' is not a boolean"):
    parse_arg('shift=flase', shift=False)
  with pytest.raises(ValueError, match="ways='five' is not of type int"):
    parse_arg('ways=five', ways=5)


def test_a_type_default_means_not_set_and_zero_means_zero():
  assert parse_arg(None, queries=int).queries is None
  assert parse_arg('queries=0', queries=int).queries == 0
  # MAML: unset values follow the paper; 0 evaluation steps is 0 steps.
  config = load_config('maml_omniglot', 'eval_inner_steps=0')
  assert config.algorithm.eval_inner_steps == 0
  assert config.objective.queries == config.objective.shots == 1
  assert config.optimizer.schedule == 'constant'
  assert load_config('maml_omniglot',
                     'decay_start=0').optimizer.schedule == 'cosine'
  twenty = load_config('maml_omniglot', 'ways=20,queries=3')
  assert (twenty.algorithm.inner_steps, twenty.algorithm.inner_learning_rate,
          twenty.objective.meta_batch_size, twenty.objective.queries) == (
              5, 0.1, 16, 3)


def test_anil_is_maml_with_another_algorithm():
  anil, maml = load_config('anil_omniglot', 'ways=20'), load_config(
      'maml_omniglot', 'ways=20,algorithm=anil')
  assert anil.to_dict() == maml.to_dict()
  assert anil.algorithm.name == 'anil'
  assert load_config('anil_omniglot', 'eval_inner_steps=3'
                     ).algorithm.eval_inner_steps == 3


def test_shared_sections():
  assert eval_section()['num_episodes'] == 600
  assert eval_section(ways=20)['ways'] == 20
  with pytest.raises(ValueError, match='Unknown eval setting'):
    eval_section(episodes=5)
  configs = [load_config(p.stem) for p in PATHS if _kind(p) != 'transfer_report']
  assert all(c.eval.seed == 2017 for c in configs)


@pytest.mark.parametrize('name', ['metric_tiny_imagenet',
                                  'protonet_tiny_imagenet'])
def test_features_argument_trains_an_mlp_on_frozen_features(name):
  from fewshot import backbones  # pylint: disable=g-import-not-at-top
  config = load_config(name, 'features=efficientnet_lite0')
  assert dict(config.data.features) == dict(
      name='efficientnet_lite0', weights='imagenet', input_size=128,
      batch_size=256)
  assert config.backbone.name == 'mlp'
  options = dict(config.backbone)
  options.pop('name')
  backbones.create('mlp', **options)  # every option is the module's
  # Both tables' configs embed the same images (one cache entry).
  assert config.data.image_size == 64
