"""ConfigDict -> data, backbone, objective, optimizer and evaluators.

With the harness and the entry scripts, the only reader of a ConfigDict:
everything below takes plain keyword arguments. Sections map onto
constructors: `config.backbone` -> `backbones.create(**...)`,
`config.algorithm` -> `ALGORITHMS[name](backbone, **...)`,
`config.objective` -> `objectives.OBJECTIVES[name](..., **...)`,
`config.optimizer` -> `optimizers.make_optimizer(**...)`; `config.eval`
sets the few-shot evaluators. A config without `objective` evaluates the
configured model as it is (e.g. a pretrained backbone with a linear probe).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fewshot import backbones
from fewshot import peft
from fewshot import data as data_lib
from fewshot import workdir as workdir_lib
from fewshot._utils import check_options
from fewshot.algorithms import ALGORITHMS
from fewshot.algorithms.base import Algorithm
from fewshot.backbones import text_weights
from fewshot.backbones.loading import is_path
from fewshot.data.batches import labelled_images
from fewshot.data.sampling import EpisodeSpec
from fewshot.evaluators.episodes import (FewShotLearner, feature_cache,
                                         few_shot_evaluator)
from fewshot.evaluators.few_label import few_label_evaluator
from fewshot.evaluators.retrieval import Embedder, retrieval_evaluator
from fewshot.experiment import Experiment
from fewshot.features import FEATURE_ALGORITHMS
from fewshot.objectives import (OBJECTIVES, distillation, episodic, metric,
                                supervised)
from fewshot.objectives.metric import embedder_params, metric_embedder
from fewshot.optimizers import make_optimizer
from fewshot.reports import ReportModel


def load_splits(section: ml_collections.ConfigDict,
                needed: tuple[str, ...] = ('train', 'val', 'test')
                ) -> dict[str, data_lib.ClassDataset]:
  """The class splits of a `data` section (`data.load_splits` options).

  With a `features` subsection (a backbone section with pretrained
  `weights`, plus an optional `batch_size`) every split is that frozen
  backbone's features `[M, D]` instead (`embedded_splits`).
  """
  options = dict(section)
  features = options.pop('features', None)
  data_options = dict(options)
  if 'tokenizer' in options:
    options['tokenizer'] = tokenizer_path(options['tokenizer'])
  splits = data_lib.load_splits(options.pop('name'), **options)
  for split in needed:
    if split not in splits:
      raise ValueError(f'The dataset has no {split!r} split.')
  if features is not None:
    from fewshot.builder_features import embedded_splits  # pylint: disable=g-import-not-at-top
    splits = embedded_splits(dict(features), splits, data_options)
  return splits


def tokenizer_path(tokenizer: str) -> str:
  """A text data section's `tokenizer`: a pretrained text backbone's name
  ('minilm_l6', or 'minilm_l6/all_minilm_l6_v2' naming the weights) or the
  path of a Hugging Face tokenizer.json."""
  name, _, source = str(tokenizer).partition('/')
  if name in text_weights.KNOWN_TEXT_WEIGHTS and (
      not source or source in text_weights.KNOWN_TEXT_WEIGHTS[name]):
    return str(text_weights.tokenizer_file(
        name, source or text_weights.DEFAULT_SOURCE))
  return str(tokenizer)


def build_backbone(section: ml_collections.ConfigDict, *,
                   pretrained: bool = True) -> backbones.Backbone:
  """The backbone of a `backbone` section, from its `weights` if `pretrained`.

  `weights` is a named source ('imagenet') or the path of a workdir whose
  backbone the run starts from (`fewshot.workdir.load_backbone`).
  """
  options = dict(section)
  name, weights = options.pop('name'), options.pop('weights', None)
  peft_section = options.pop('peft', None)
  if weights and pretrained and is_path(weights):
    input_size = options.pop('input_size', None)
    input_channels = options.pop('input_channels', None)
    loaded = workdir_lib.load_backbone(weights, name, **options)
    backbone = backbones.with_input_adapter(loaded.backbone, input_size,
                                            input_channels)
  else:
    backbone = backbones.create(name, weights if pretrained else None,
                                **options)
  if peft_section is not None:
    backbone = peft_backbone_of(dict(peft_section), backbone)
  return backbone


# backbone.peft's `method` -> what it trains.
PEFT_METHODS = ('lora', 'bitfit', 'adapters')


def peft_backbone_of(section: dict[str, Any],
                     backbone: backbones.Backbone) -> backbones.Backbone:
  """A `backbone.peft` section: `method` 'lora' (`targets`, `rank`,
  `alpha`, `train`), 'bitfit' (`norm_scales`) or 'adapters' (`paths`,
  `size`, `activation`, `train`), on `backbone`
  (`fewshot.peft.peft_backbone`)."""
  options = dict(section)
  method = options.pop('method', None)
  if method == 'lora':
    check_options(peft.lora_rules, options, 'backbone.peft (lora)')
    rules = peft.lora_rules(tuple(options.pop('targets')), **{
        k: tuple(v) if k == 'train' else v for k, v in options.items()})
    return peft.peft_backbone(backbone, rules)
  if method == 'bitfit':
    check_options(peft.bitfit_rules, options, 'backbone.peft (bitfit)')
    return peft.peft_backbone(backbone, peft.bitfit_rules(**options))
  if method == 'adapters':
    known = {'paths', 'size', 'activation', 'train'}
    unknown = sorted(set(options) - known)
    if unknown or 'paths' not in options:
      raise ValueError(f'backbone.peft (adapters) needs paths and accepts '
                       f'{sorted(known)}; got {sorted(options)}.')
    rules = [(pattern, 'full') for pattern in options.get('train', ())]
    return peft.peft_backbone(
        backbone, rules, adapters=tuple(options['paths']),
        adapter_size=options.get('size', 64),
        adapter_activation=options.get('activation', 'gelu'))
  raise ValueError(f'backbone.peft.method must be one of {PEFT_METHODS}, got '
                   f'{method!r}.')


def parameter_info(backbone: backbones.Backbone,
                   sample_inputs: Any) -> dict[str, Any]:
  """The backbone's trainable and total parameter counts (shapes only).

  For a PEFT backbone the trainable ones are its LoRA factors, adapters and
  fully trained leaves; otherwise every backbone parameter (what
  `fine_tune` or an objective may update; a frozen-feature algorithm
  trains none of them).
  """
  params, state = jax.eval_shape(backbone.init, jax.random.key(0),
                                 jnp.asarray(sample_inputs))
  if isinstance(state, dict) and peft.FROZEN in state:
    count = peft.count_parameters(params, state)
  else:
    size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    count = peft.ParameterCount(trainable=size, total=size)
  return dict(trainable_parameters=count.trainable,
              total_parameters=count.total, parameters=str(count))


def build_algorithm(section: ml_collections.ConfigDict,
                    backbone: backbones.Backbone) -> Algorithm:
  """An `algorithm` section (a registered name and its options) on `backbone`."""
  options = dict(section)
  name = options.pop('name')
  if name not in ALGORITHMS:
    raise ValueError(f'Unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}.')
  check_options(ALGORITHMS[name], options, f'algorithm {name!r}')
  return ALGORITHMS[name](backbone, **options)


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> optax.GradientTransformation:
  options = dict(config.optimizer)
  check_options(make_optimizer, options, 'the optimizer')
  return make_optimizer(num_steps=config.train.num_steps, **options)


class _Built(NamedTuple):
  """What an objective builder returns (see `_OBJECTIVE_BUILDERS`)."""
  objective: Any
  train_data: Any           # host arrays, placed by the harness
  learner: FewShotLearner
  initial: Callable[[], tuple[Any, Any]]
  embedder: Embedder


def _backbone_params(params):
  return params['backbone']


def pretrained_learner(algorithm, train, embedder_of):
  """The evaluating algorithm's own meta-parameters (e.g. ProtoNet's cosine
  scale), with the trained network's in place of its random backbone."""
  algorithm_params = dict(algorithm.init(
      jax.random.key(0), jnp.asarray(train.images[:2]))[0])
  algorithm_params.pop('backbone')
  return FewShotLearner(
      algorithm,
      lambda params: {**algorithm_params, 'backbone': embedder_of(params)})


def _episodic(options, splits, backbone, make_algorithm, seed):
  algorithm = make_algorithm(backbone)
  spec = EpisodeSpec(options['ways'], options['shots'], options['queries'])
  data_lib.check_spec(spec, splits['train'].class_counts(),
                      splits['train'].class_names, 'meta-train split')
  objective = episodic(algorithm, **options)
  learner = FewShotLearner(algorithm, lambda params: params)
  initial = lambda: algorithm.init(jax.random.key(seed),
                                   jnp.asarray(splits['test'].images[:2]))
  return _Built(objective, data_lib.index_by_class(splits['train']), learner,
                initial, Embedder(backbone, _backbone_params))


def _supervised(options, splits, backbone, make_algorithm, seed):
  train = splits['train']
  if options['batch_size'] > len(train.images):
    raise ValueError(f'batch_size {options["batch_size"]} exceeds the '
                     f'{len(train.images)} training images.')
  objective = supervised(backbone, num_classes=train.num_classes, **options)
  learner = pretrained_learner(make_algorithm(backbone), train,
                                _backbone_params)
  data = labelled_images(train)
  initial = lambda: objective.init(jax.random.key(seed), data)[:2]
  return _Built(objective, data, learner, initial,
                Embedder(backbone, _backbone_params))


def _metric(options, splits, backbone, make_algorithm, seed):
  train = splits['train']
  data_lib.check_class_balanced(
      options['classes_per_batch'], options['images_per_class'],
      train.class_counts(), train.class_names, 'training split')
  objective = metric(backbone, num_classes=train.num_classes, **options)
  embedder = metric_embedder(backbone, options.get('projection', 'linear'),
                             options.get('embedding_dim'))
  learner = pretrained_learner(make_algorithm(embedder), train,
                                embedder_params)
  data = data_lib.index_by_class(train)

  def initial():
    if options.get('projection', 'linear') != 'none':
      raise ValueError(
          "A metric config's projection head is trained, so without a "
          'workdir it would be random: give --workdir, or evaluate the '
          "pretrained backbone alone with objective.projection='none'.")
    return objective.init(jax.random.key(seed), data)[:2]

  return _Built(objective, data, learner, initial,
                Embedder(embedder, embedder_params))


def _teacher(option, sample_images, seed):
  """`(teacher backbone, {'params', 'state', 'head'})` of `objective.teacher`:
  a workdir (its backbone and classifier head) or a backbone section
  (`name`, `weights`, ...; a head only if `weights` is a workdir)."""
  if isinstance(option, str):
    section = {'name': workdir_lib.stored_backbone_name(option),
               'weights': option}
  else:
    section = dict(option)
  if not section.get('weights'):
    raise ValueError('objective.teacher needs trained weights: a workdir, or '
                     "a backbone section with weights ('imagenet' or a "
                     'workdir).')
  teacher = build_backbone(ml_collections.ConfigDict(section))
  params, state = teacher.init(jax.random.key(seed), sample_images)
  head = (workdir_lib.load_head(section['weights'])
          if is_path(section['weights']) else None)
  return teacher, {'params': params, 'state': state, 'head': head}


def _distillation(options, splits, backbone, make_algorithm, seed):
  train = splits['train']
  if options['batch_size'] > len(train.images):
    raise ValueError(f'batch_size {options["batch_size"]} exceeds the '
                     f'{len(train.images)} training images.')
  options = dict(options)
  teacher, variables = _teacher(options.pop('teacher'),
                                jnp.asarray(train.images[:2]), seed)
  objective = distillation(backbone, teacher=teacher,
                           teacher_variables=variables,
                           num_classes=train.num_classes, **options)
  learner = pretrained_learner(make_algorithm(backbone), train,
                               _backbone_params)._replace(
                                   model_state=lambda state: state['backbone'])
  data = labelled_images(train)
  initial = lambda: objective.init(jax.random.key(seed), data)[:2]
  return _Built(objective, data, learner, initial,
                Embedder(backbone, _backbone_params,
                         lambda state: state['backbone']))


# objective name -> (its factory's arguments that the builder supplies,
#   (options, splits, backbone, make_algorithm, seed) -> _Built).
_OBJECTIVE_BUILDERS = {
    'episodic': ((), _episodic),
    'supervised': (('num_classes',), _supervised),
    'metric': (('num_classes',), _metric),
    'distillation': (('num_classes', 'teacher_variables'), _distillation),
}


def _build_objective(section, splits, backbone, make_algorithm, seed):
  options = dict(section)
  name = options.pop('name')
  if name not in OBJECTIVES or name not in _OBJECTIVE_BUILDERS:
    raise ValueError(f'Unknown objective {name!r}; known: '
                     f'{sorted(set(OBJECTIVES) & set(_OBJECTIVE_BUILDERS))}.')
  factory = OBJECTIVES[name]
  check_options(factory, options, f'objective {name!r}')
  parameters = inspect.signature(factory).parameters.values()
  supplied, build = _OBJECTIVE_BUILDERS[name]
  supplied = set(supplied) | {p.name for p in parameters
                              if p.kind == p.POSITIONAL_OR_KEYWORD}
  if set(options) & supplied:
    raise ValueError(f'objective.{sorted(set(options) & supplied)[0]} is set '
                     f'by the builder from the data; remove it from the '
                     'config.')
  missing = sorted(p.name for p in parameters
                   if p.default is p.empty and p.name not in supplied
                   and p.name not in options)
  if missing:
    raise ValueError(f'objective {name!r} needs {missing} in the config\'s '
                     'objective section.')
  return build(options, splits, backbone, make_algorithm, seed)


def _eval_spec(config, splits, names) -> EpisodeSpec:
  spec = EpisodeSpec(config.eval.ways, config.eval.shots, config.eval.queries)
  for split in names:
    data_lib.check_spec(spec, splits[split].class_counts(),
                        splits[split].class_names, f'meta-{split} split')
  return spec


def _check_precompute(algorithm_section, backbone_section, what: str) -> None:
  """Features embedded once are exact only for frozen-feature learners on
  backbones that treat images independently in evaluation mode."""
  name = algorithm_section.name
  if name not in FEATURE_ALGORITHMS:
    raise ValueError(
        f'{what} needs a frozen-feature algorithm '
        f'({", ".join(FEATURE_ALGORITHMS)}); {name!r} adapts the backbone.')
  if backbone_section.get('norm') == 'batch':
    raise ValueError(
        f"{what} needs per-image features, but norm='batch' normalises each "
        'episode with its own statistics.')


def _feature_cache(config, backbone):
  """`config.eval.precompute_features`: embed each split once per evaluation
  (validation included)."""
  if not config.eval.get('precompute_features', False):
    return None
  _check_precompute(config.algorithm, config.backbone,
                    'eval.precompute_features')
  return feature_cache(functools.partial(build_algorithm, config.algorithm),
                       backbone, config.eval.get('feature_batch_size', 256))


def _retrieval(config, embedder, dataset):
  """The retrieval evaluator of a split (`eval.retrieval_distance`)."""
  if config.backbone.get('norm') == 'batch':
    raise ValueError(
        "Retrieval needs per-image embeddings, but norm='batch' normalises "
        'each batch with its own statistics (transductive), so an image\'s '
        'embedding would depend on the images batched with it.')
  return retrieval_evaluator(
      embedder, dataset,
      distance=config.eval.get('retrieval_distance', 'cosine'),
      batch_size=config.eval.get('feature_batch_size', 256),
      nmi=config.eval.get('retrieval_nmi', True))


def build(config: ml_collections.ConfigDict, *,
          pretrained: bool = True) -> Experiment:
  """Builds the experiment a config describes (see `Experiment`).

  With `pretrained=False` a `config.backbone.weights` source is not read (a
  run's own checkpoint supersedes the weights it started from).
  """
  has_objective = 'objective' in config
  if has_objective and config.objective.get('name') == 'multitask':
    from fewshot.builder_multitask import build_multitask  # pylint: disable=g-import-not-at-top
    return build_multitask(config, pretrained=pretrained)
  if has_objective and config.objective.get('name') == 'adaptation':
    from fewshot.builder_adaptation import build_adaptation  # pylint: disable=g-import-not-at-top
    return build_adaptation(config, pretrained=pretrained)
  splits = load_splits(config.data, ('train', 'val', 'test') if has_objective
                       else ('train', 'test'))
  backbone = build_backbone(config.backbone, pretrained=pretrained)
  make_algorithm = functools.partial(build_algorithm, config.algorithm)
  if has_objective:
    optimizer = build_optimizer(config)
    built = _build_objective(config.objective, splits, backbone,
                             make_algorithm, config.seed)
  else:
    optimizer = None
    algorithm = make_algorithm(backbone)
    built = _Built(
        None, None, FewShotLearner(algorithm, lambda params: params),
        lambda: algorithm.init(jax.random.key(config.seed),
                               jnp.asarray(splits['test'].images[:2])),
        Embedder(backbone, _backbone_params))
  eval_splits = [s for s in ('val', 'test') if s in splits]
  features = _feature_cache(config, built.embedder.backbone)
  if config.data.get('protocol') == 'few_label':
    # Fit once on the labelled 'train' split, test every example.
    evaluators = {split: few_label_evaluator(
        built.learner, splits['train'], splits[split],
        batch_size=config.eval.get('feature_batch_size', 256),
        features=features) for split in eval_splits}
    validate = evaluators.get('val') if has_objective else None
  else:
    spec = _eval_spec(config, splits, eval_splits)
    evaluator = functools.partial(
        few_shot_evaluator, built.learner, spec=spec,
        images_per_chunk=config.eval.images_per_chunk, features=features)
    evaluators = {split: evaluator(splits[split],
                                   num_episodes=config.eval.num_episodes,
                                   key=jax.random.key(config.eval.seed))
                  for split in eval_splits}
    validate = None
    if has_objective:
      validate = evaluator(splits['val'],
                           num_episodes=config.eval.val_episodes,
                           key=jax.random.key(config.eval.seed + 1))
  retrieval = {split: functools.partial(
      _retrieval, config, built.embedder, splits[split])
               for split in eval_splits}
  frozen = config.data.get('features')
  info = dict(algorithm=config.algorithm.name, backbone=config.backbone.name,
              weights=config.backbone.get('weights'),
              features=(f'{frozen.name}:{frozen.weights}' if frozen
                        else None),
              norm=config.backbone.get('norm'),
              peft=config.backbone.get('peft', {}).get('method'),
              **parameter_info(backbone, splits['test'].images[:2]))
  return Experiment(objective=built.objective, optimizer=optimizer,
                    train_data=built.train_data, learner=built.learner,
                    validate=validate, evaluators=evaluators,
                    initial=built.initial, seed=config.seed, info=info,
                    embedder=built.embedder, retrieval=retrieval)


def _report_model(section: ml_collections.ConfigDict):
  precompute = bool(section.get('precompute_features', False))
  if precompute:
    _check_precompute(section.algorithm, section.backbone,
                      f'{section.label}: precompute_features')
  return ReportModel(
      label=section.label, backbone=build_backbone(section.backbone),
      make_algorithm=functools.partial(build_algorithm, section.algorithm),
      precompute_features=precompute,
      feature_batch_size=section.get('feature_batch_size', 256))


def transfer_report_inputs(config: ml_collections.ConfigDict
                           ) -> dict[str, Any]:
  """The arguments of `fewshot.reports.negative_transfer_report`.

  Config sections: `target` (a dataset: `load_splits` options plus
  `split`), `pretrained` and `scratch` (each `label`, `backbone`,
  `algorithm`, optional `precompute_features`, `feature_batch_size`),
  `sizes` (shots per class), `eval` (ways, queries, num_episodes,
  images_per_chunk, seed) and optionally `source` (a dataset standing for
  the pretraining distribution, with `split` and `mmd_images`).
  """
  def split_of(section):
    options = dict(section)
    split = options.pop('split')
    options.pop('mmd_images', None)
    return load_splits(ml_collections.ConfigDict(options), (split,))[split]

  inputs = dict(
      target=split_of(config.target), pretrained=_report_model(
          config.pretrained), scratch=_report_model(config.scratch),
      sizes=tuple(config.sizes), ways=config.eval.ways,
      queries=config.eval.queries, num_episodes=config.eval.num_episodes,
      images_per_chunk=config.eval.images_per_chunk,
      episode_seed=config.eval.seed, seed=config.seed)
  if config.get('source') is not None:
    inputs.update(source=split_of(config.source),
                  mmd_images=config.source.mmd_images)
  return inputs


__all__ = ['PEFT_METHODS', 'build', 'build_algorithm', 'build_backbone',
           'parameter_info', 'peft_backbone_of', 'tokenizer_path',
           'build_optimizer', 'load_splits', 'pretrained_learner',
           'transfer_report_inputs']
