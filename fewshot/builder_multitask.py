"""ConfigDict -> the `Experiment` of a multi-task config (`objective.name='multitask'`).

The multi-task part of `fewshot.builder` (which dispatches here). Sections:

* `data`: the default dataset of the streams, a `fewshot.data.multilabel`
  task dataset (`name='multimnist'`, ...) for minibatch streams or a class
  dataset (`fewshot.data.load_splits`) for episode streams; a stream's own
  `data` overrides it (tasks on different datasets);
* `objective.streams`: `{stream: {batch_size, rotate}}` or `{stream: {ways,
  shots, queries}}` (episodes), optionally `data`;
* `objective.tasks`: `{task: {stream, kind, labels, outputs, head,
  init_scale}}`; `outputs` defaults to the classes found in the labels (or
  the target width); the mapping's order is the task order;
* `objective.gradients`: the task gradients a Gram-reading weighting
  combines: 'parameters' (default), 'features' or 'features_summed'
  (`fewshot.objectives.multitask`);
* `objective.weighting`: `{name, **options}` (`fewshot.multitask`); a
  fixed weighting's `weights` is `{task: weight}`, and DWA's and GradNorm's
  `period` defaults to an epoch of the first minibatch stream;
* `algorithm`: the few-shot learner that scores the shared backbone on
  episodes (an episode task's held-out classes, `eval.fewshot_data`);
* `eval`: `batch_size` (embedding), `baselines` (single-task workdirs for
  Delta-p), the episode settings of episode tasks (`ways`, `shots`,
  `queries`, `num_episodes`, `val_episodes`, `seed`) and optionally
  `fewshot_data` (a class dataset whose 'test' classes score the shared
  backbone few-shot, at `fewshot_shots`-shot and each of `fewshot_ways`).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np

from fewshot import data as data_lib
from fewshot.builder import (build_algorithm, build_backbone, build_optimizer,
                             load_splits, pretrained_learner)
from fewshot.data.multilabel import load_task_splits
from fewshot.data.sampling import EpisodeSpec, index_by_class
from fewshot.evaluators.episodes import few_shot_evaluator
from fewshot.evaluators.multitask import TASK_METRICS, multitask_evaluator
from fewshot.evaluators.retrieval import Embedder
from fewshot.experiment import Experiment
from fewshot.multitask import make_weighting
from fewshot.objectives.multitask import (ROTATION, Stream, Task,
                                          check_tasks, multitask)
from fewshot.workdir import METRICS, read_metrics

_EPISODE_KEYS = ('ways', 'shots', 'queries')
_SPLITS = ('train', 'val', 'test')


def _plain(section) -> dict[str, Any]:
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  return dict(section)


def _stream(name: str, options: dict[str, Any]) -> Stream:
  options = dict(options)
  options.pop('data', None)
  if set(_EPISODE_KEYS) & set(options):
    missing = [k for k in _EPISODE_KEYS if k not in options]
    if missing:
      raise ValueError(f'Episode stream {name!r} needs {missing}.')
    spec = EpisodeSpec(*(options.pop(k) for k in _EPISODE_KEYS))
    if options:
      raise ValueError(f'Unknown option(s) {sorted(options)} for episode '
                       f'stream {name!r}.')
    return Stream(episodes=spec)
  unknown = sorted(set(options) - {'batch_size', 'rotate'})
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} for stream {name!r}; it '
                     "accepts ['batch_size', 'rotate'] or ['ways', 'shots', "
                     "'queries'].")
  if 'batch_size' not in options:
    raise ValueError(f'Stream {name!r} needs batch_size (or ways, shots, '
                     'queries for episodes).')
  return Stream(batch_size=options['batch_size'],
                rotate=bool(options.get('rotate', False)))


def _load_stream_data(streams, sections, default_data):
  """`{stream: {split: MultiLabelImages or ClassDataset}}`, each dataset
  section loaded once."""
  loaded, result = {}, {}
  for name, stream in streams.items():
    section = _plain(sections[name].get('data') or default_data)
    key = (stream.episodes is not None, json.dumps(section, sort_keys=True,
                                                    default=str))
    if key not in loaded:
      if stream.episodes is not None:
        loaded[key] = load_splits(ml_collections.ConfigDict(section))
      else:
        options = dict(section)
        loaded[key] = load_task_splits(options.pop('name'), **options)
    result[name] = loaded[key]
  return result


def _task(name: str, options: dict[str, Any], streams, stream_data) -> Task:
  options = dict(options)
  unknown = sorted(set(options) - {'stream', 'kind', 'labels', 'outputs',
                                   'head', 'init_scale'})
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} for task {name!r}.')
  if 'stream' not in options:
    raise ValueError(f'Task {name!r} needs a stream; the streams are '
                     f'{sorted(streams)}.')
  stream_name = options['stream']
  kind = options.get('kind', 'classify')
  if stream_name not in streams:
    raise ValueError(f'Task {name!r} reads stream {stream_name!r}, but the '
                     f'streams are {sorted(streams)}.')
  if kind == 'episodes':
    return Task(**options)
  labels = options.get('labels') or name
  splits = stream_data[stream_name]
  known = set(splits['train'].labels) | (
      {ROTATION} if streams[stream_name].rotate else set())
  if labels not in known:
    raise ValueError(f'Task {name!r} reads labels {labels!r}, but stream '
                     f'{stream_name!r} has {sorted(known)}.')
  if labels == ROTATION:
    found = 4
  elif kind == 'regress':
    found = int(np.prod(splits['train'].labels[labels].shape[1:]))
  else:
    found = 1 + max(int(np.max(splits[s].labels[labels])) for s in _SPLITS)
  outputs = options.get('outputs', found)
  if kind != 'regress' and outputs < found:
    raise ValueError(f'Task {name!r} has a {outputs}-class head, but its '
                     f'labels {labels!r} go up to class {found - 1}.')
  if kind == 'regress' and outputs != found:
    raise ValueError(f'Task {name!r} has {outputs} outputs, but its targets '
                     f'{labels!r} have {found}.')
  return Task(**dict(options, outputs=outputs))


def _weighting(section, task_names, streams, stream_data):
  options = _plain(section)
  name = options.pop('name', 'equal')
  if 'weights' in options:
    weights = dict(options['weights'])
    unknown = sorted(set(weights) - set(task_names))
    if unknown:
      raise ValueError(f'Weights for {unknown}, which no task is named; the '
                       f'tasks are {list(task_names)}.')
    options['weights'] = tuple(float(weights.get(t, 0.0)) for t in task_names)
  if name in ('dwa', 'gradnorm') and 'period' not in options:
    first = next(s for s in sorted(streams) if streams[s].episodes is None)
    options['period'] = max(1, stream_data[first]['train'].num_images //
                            streams[first].batch_size)
  return make_weighting(name, **options)


def read_baselines(workdirs, tasks: dict[str, Task]
                   ) -> dict[str, dict[str, float]]:
  """`{task: {metric: value}}` from the last test record of single-task
  workdirs' `metrics.jsonl` (`test_<task>_<metric>`)."""
  found = {}
  for workdir in workdirs:
    try:
      records = read_metrics(workdir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'Baseline {workdir} has no {METRICS}; train '
                              'it first.') from e
    tests = [r for r in records if any(k.startswith('test_') for k in r)]
    if not tests:
      raise ValueError(f'Baseline {workdir} has no test results yet.')
    for name, task in tasks.items():
      metric = TASK_METRICS[task.kind][0]
      value = tests[-1].get(f'test_{name}_{metric}')
      if value is not None:
        found[name] = {metric: float(value)}
  missing = sorted(set(tasks) - set(found))
  if missing:
    raise ValueError(f'No single-task baseline among {list(workdirs)} has '
                     f'test results for task(s) {missing}.')
  return found


def build_multitask(config: ml_collections.ConfigDict, *,
                    pretrained: bool = True) -> Experiment:
  """The `Experiment` of a multi-task config (see the module docstring)."""
  section = _plain(config.objective)
  section.pop('name')
  unknown = sorted(set(section) - {'gradients', 'tasks', 'streams',
                                    'weighting'})
  if unknown:
    raise ValueError(f'Unknown multitask objective option(s) {unknown}; it '
                     "accepts ['gradients', 'streams', 'tasks', "
                     "'weighting'].")
  stream_sections = dict(section.get('streams') or {})
  task_sections = dict(section.get('tasks') or {})
  if not task_sections:
    raise ValueError('objective.tasks is empty: a multi-task objective needs '
                     'at least one task.')
  streams = {name: _stream(name, options)
             for name, options in stream_sections.items()}
  stream_data = _load_stream_data(streams, stream_sections,
                                  config.get('data'))
  for name, splits in stream_data.items():
    for split in _SPLITS:
      if split not in splits:
        raise ValueError(f'The data of stream {name!r} has no {split!r} '
                         'split.')
      size = (splits[split].num_images if streams[name].episodes is None
              else len(splits[split].labels))
      if size == 0:
        raise ValueError(f'Stream {name!r} has no {split} images.')
    if streams[name].episodes is None and (
        streams[name].batch_size > splits['train'].num_images):
      raise ValueError(f'Stream {name!r}: batch_size '
                       f'{streams[name].batch_size} exceeds its '
                       f'{splits["train"].num_images} training images.')
  tasks = {name: _task(name, options, streams, stream_data)
           for name, options in task_sections.items()}
  check_tasks(tasks, streams)
  weighting = _weighting(section.get('weighting') or {'name': 'equal'},
                         tuple(tasks), streams, stream_data)
  backbone = build_backbone(config.backbone, pretrained=pretrained)
  objective = multitask(backbone, tasks=tasks, streams=streams,
                        weighting=weighting,
                        gradients=section.get('gradients') or 'parameters')

  eval_section = config.eval
  spec = EpisodeSpec(eval_section.get('ways', 5), eval_section.get('shots', 1),
                     eval_section.get('queries', 15))
  learner = pretrained_learner(
      build_algorithm(config.algorithm, backbone),
      stream_data[sorted(streams)[0]]['train'],
      lambda params: params['backbone'])._replace(
          model_state=lambda state: state['backbone'])
  train_data = {}
  for name, stream in streams.items():
    train = stream_data[name]['train']
    if stream.episodes is not None:
      data_lib.check_spec(stream.episodes, train.class_counts(),
                          train.class_names, f'stream {name!r}')
      train = index_by_class(train)
    train_data[name] = train
  baselines = None
  if eval_section.get('baselines'):
    baselines = read_baselines(tuple(eval_section.baselines), tasks)

  def evaluator(split, num_episodes, seed, with_baselines):
    episodic = {}
    for name, task in tasks.items():
      if task.kind == 'episodes':
        dataset = stream_data[task.stream][split]
        data_lib.check_spec(spec, dataset.class_counts(), dataset.class_names,
                            f'{split} split of stream {task.stream!r}')
        episodic[name] = few_shot_evaluator(
            learner, dataset, spec, num_episodes, jax.random.key(seed),
            images_per_chunk=eval_section.get('images_per_chunk', 2048))
    return multitask_evaluator(
        backbone, tasks, streams,
        {name: stream_data[name][split] for name in streams},
        batch_size=eval_section.get('batch_size', 1000), episodic=episodic,
        baselines=baselines if with_baselines else None)

  seed = eval_section.get('seed', 2017)
  num_episodes = eval_section.get('num_episodes', 600)
  evaluators = {'val': evaluator('val', num_episodes, seed, False),
                'test': _with_fewshot(config, learner,
                                      evaluator('test', num_episodes, seed,
                                                True))}
  validate = evaluator('val', eval_section.get('val_episodes', 300),
                       seed + 1, False)
  initial = lambda: objective.init(jax.random.key(config.seed),
                                   train_data)[:2]
  info = dict(objective='multitask', tasks=list(tasks),
              weighting=weighting.name, backbone=config.backbone.name,
              weights=config.backbone.get('weights'))
  return Experiment(objective=objective, optimizer=build_optimizer(config),
                    train_data=train_data, learner=learner,
                    validate=validate, evaluators=evaluators,
                    initial=initial, seed=config.seed, info=info,
                    embedder=Embedder(backbone,
                                      lambda params: params['backbone'],
                                      lambda state: state['backbone']))


def _with_fewshot(config, learner, evaluate):
  """Adds few-shot scores of the shared backbone on `eval.fewshot_data`'s
  test classes (`fewshot_<N>way_accuracy`, `fewshot_<N>way_ci95`)."""
  section = config.eval.get('fewshot_data')
  if not section:
    return evaluate
  test = load_splits(section, ('test',))['test']
  shots = config.eval.get('fewshot_shots', 1)
  queries = config.eval.get('fewshot_queries', 15)
  scorers = {}
  for ways in tuple(config.eval.get('fewshot_ways', (5, 20))):
    spec = EpisodeSpec(ways, shots, queries)
    data_lib.check_spec(spec, test.class_counts(), test.class_names,
                        'few-shot test split')
    scorers[ways] = few_shot_evaluator(
        learner, test, spec, config.eval.get('fewshot_episodes', 1000),
        jax.random.key(config.eval.get('seed', 2017)),
        images_per_chunk=config.eval.get('images_per_chunk', 2048))

  def run(params, model_state):
    result = evaluate(params, model_state)
    for ways, score in scorers.items():
      summary = score(params, model_state)
      result[f'fewshot_{ways}way_accuracy'] = summary['accuracy']
      result[f'fewshot_{ways}way_ci95'] = summary['ci95']
    return result

  return run


__all__ = ['build_multitask', 'read_baselines']
