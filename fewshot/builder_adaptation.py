"""ConfigDict -> the `Experiment` of a domain-adaptation config.

The adaptation part of `fewshot.builder` (which dispatches here when
`objective.name='adaptation'`). Sections:

* `source`, `target`: domains, `fewshot.data.domains.load_domain` options
  (`name`, and `domain`, `root`, `image_size`, `channels`, ...), and
  optionally `features`: a frozen backbone that embeds every split once
  (`fewshot.builder_features.embedded_splits`; the trained network is then an
  `mlp` backbone with the bottleneck and head);
* `objective`: `method` (`fewshot.objectives.adaptation.METHODS`, or
  'oracle': the same classifier trained on the target's labels, or
  'adabn': source-only training, then BatchNorm statistics re-estimated
  on the target's training images at evaluation) and the objective's
  options (`batch_size`, `trade_off`, `pseudo_labels`, ...);
* `eval`: `batch_size` (embedding), `test_at_end`.

The target's labels never enter training data (the oracle's excepted):
the training data holds the target's images only. Validation and test
report `source_accuracy` and `target_accuracy` (with `_ci95`), on the
domains' 'val' and 'test' splits; nothing selects on them.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from fewshot._utils import check_options
from fewshot.builder import (build_algorithm, build_backbone, build_optimizer,
                             pretrained_learner)
from fewshot.builder_features import embedded_splits
from fewshot.data.batches import labelled_images
from fewshot.data.dataset import ClassDataset
from fewshot.data.domains import load_domain
from fewshot.evaluators.adaptation import adaptation_evaluator
from fewshot.evaluators.retrieval import Embedder
from fewshot.experiment import Experiment
from fewshot.objectives.adaptation import METHODS, adaptation, needs_target

BUILDER_METHODS = METHODS + ('oracle', 'adabn')


def _domain(config, role: str) -> dict[str, ClassDataset]:
  if role not in config:
    raise ValueError(f'An adaptation config needs a {role!r} section (a '
                     'domain: name=mnist|usps|fashion_mnist|pacs|folder, '
                     '...).')
  options = dict(config[role])
  if 'name' not in options:
    raise ValueError(f'config.{role} needs a name.')
  features = options.pop('features', None)
  domain_options = dict(options)
  splits = load_domain(options.pop('name'), **options)
  if features is not None:
    splits = embedded_splits(dict(features), splits, domain_options)
  return splits


def check_domains(source: ClassDataset, target: ClassDataset) -> None:
  """Closed-set adaptation: the same classes, in the same order, and the
  same image shape in both domains."""
  if source.num_classes != target.num_classes:
    raise ValueError(
        f'The source has {source.num_classes} classes and the target '
        f'{target.num_classes}: closed-set adaptation needs the same classes '
        f'in both (source {list(source.class_names)}, target '
        f'{list(target.class_names)}).')
  if source.class_names != target.class_names:
    raise ValueError(
        f'The source classes {list(source.class_names)} differ from the '
        f'target classes {list(target.class_names)}: closed-set adaptation '
        'needs the same class names (folder names) in both domains.')
  if source.image_shape != target.image_shape:
    raise ValueError(
        f'Source images are {source.image_shape} and target images '
        f'{target.image_shape}: give both domains the same image_size and '
        'channels.')


def build_adaptation(config: ml_collections.ConfigDict, *,
                     pretrained: bool = True) -> Experiment:
  """The `Experiment` of an adaptation config (see the module docstring)."""
  options = dict(config.objective)
  options.pop('name')
  method = options.pop('method', 'source_only')
  if method not in BUILDER_METHODS:
    raise ValueError(f'Unknown adaptation method {method!r}; known: '
                     f'{", ".join(BUILDER_METHODS)}.')
  for supplied in ('num_classes', 'num_steps'):
    if supplied in options:
      raise ValueError(f'objective.{supplied} is set by the builder; remove '
                       'it from the config.')
  check_options(adaptation, options, "the adaptation objective")
  source, target = _domain(config, 'source'), _domain(config, 'target')
  for split in ('train', 'val', 'test'):
    check_domains(source[split], target[split])
  train_method = 'source_only' if method in ('oracle', 'adabn') else method
  labelled = target['train'] if method == 'oracle' else source['train']
  if options.get('batch_size', 128) > labelled.images.shape[0]:
    raise ValueError(f'batch_size {options["batch_size"]} exceeds the '
                     f'{labelled.images.shape[0]} labelled training images.')
  backbone = build_backbone(config.backbone, pretrained=pretrained)
  objective = adaptation(backbone, num_classes=source['train'].num_classes,
                         num_steps=config.train.num_steps,
                         method=train_method, **options)
  train_data = {'source': labelled_images(labelled)}
  if needs_target(train_method, options.get('pseudo_labels')):
    train_data['target'] = target['train'].images  # images only, no labels

  batch_size = config.eval.get('batch_size', 1000)
  adabn_images = target['train'].images if method == 'adabn' else None

  def evaluator(split):
    return adaptation_evaluator(
        backbone, {'source': source[split], 'target': target[split]},
        batch_size=batch_size, adabn_images=adabn_images)

  validate = evaluator('val')
  learner = pretrained_learner(
      build_algorithm(config.algorithm, backbone), source['train'],
      lambda params: params['backbone'])._replace(
          model_state=lambda state: state['backbone'])
  initial = lambda: objective.init(jax.random.key(config.seed),
                                   train_data)[:2]
  info = dict(objective='adaptation', method=method,
              source=_describe(config.source), target=_describe(config.target),
              backbone=config.backbone.name,
              weights=config.backbone.get('weights'))
  return Experiment(objective=objective, optimizer=build_optimizer(config),
                    train_data=train_data, learner=learner, validate=validate,
                    evaluators={'val': validate, 'test': evaluator('test')},
                    initial=initial, seed=config.seed, info=info,
                    embedder=Embedder(backbone,
                                      lambda params: params['backbone'],
                                      lambda state: state['backbone']))


def _describe(section) -> str:
  options: dict[str, Any] = dict(section)
  return '/'.join(str(options[k]) for k in ('name', 'domain', 'root')
                  if options.get(k))


__all__ = ['BUILDER_METHODS', 'build_adaptation', 'check_domains']
