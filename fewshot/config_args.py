"""What `configs/*.py` share: the argument parser and the common sections.

`parse_arg` turns `get_config`'s string argument into typed values;
`data_section` is the data section with its `FEWSHOT_*` environment
defaults, and `eval_section` the few-shot evaluation settings every config
starts from (the flax examples' `configs/default.py`, importable here
because `--config` files are loaded by path).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')


def _parse_bool(key: str, value: str) -> bool:
  if value.lower() in _TRUE:
    return True
  if value.lower() in _FALSE:
    return False
  raise ValueError(f'Config argument {key}={value!r} is not a boolean: use '
                   f'one of {_TRUE + _FALSE}.')


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`'ways=20,shots=5'` -> ConfigDict over `defaults`, typed like them.

  A default that is a type (`queries=int`) means "not set": the value is
  None unless the argument gives one of that type. Booleans are
  'true'/'false' (or 1/0, yes/no), nothing else.

  Raises:
    ValueError: a key that is not in `defaults`, a malformed item, or a
      value that is not of its key's type.
  """
  values = {k: None if isinstance(v, type) else v for k, v in defaults.items()}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'Config argument {item!r} is not of the form key=value.')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; known: '
                       f'{sorted(defaults)}.')
    default = defaults[key]
    kind = default if isinstance(default, type) else type(default)
    if kind is bool:
      values[key] = _parse_bool(key, value)
    else:
      try:
        values[key] = kind(value)
      except ValueError as e:
        raise ValueError(f'Config argument {key}={value!r} is not of type '
                         f'{kind.__name__}.') from e
  return ml_collections.ConfigDict(values)


def data_section(name: str, **options: Any) -> dict[str, Any]:
  """A `data` section: `fewshot.data.load_splits(name, **options)`.

  The TFDS manual and data directories default to `FEWSHOT_MANUAL_DIR` and
  `FEWSHOT_DATA_DIR` (`--config.data.manual_dir=...` overrides them).
  """
  return dict(name=name, manual_dir=os.environ.get('FEWSHOT_MANUAL_DIR'),
              data_dir=os.environ.get('FEWSHOT_DATA_DIR'), **options)


def features_section(backbone: str, weights: str | None = None,
                     input_size: int | None = None,
                     batch_size: int = 256) -> dict[str, Any]:
  """A data section's `features`: the frozen backbone that embeds every
  split once (`fewshot.builder_features.embedded_splits`).

  `weights` defaults to 'imagenet'; `input_size` to 128 for
  efficientnet_lite0 (the images are resized on the device).
  """
  section = dict(name=backbone, weights=weights or 'imagenet',
                 batch_size=batch_size)
  if input_size is None and backbone == 'efficientnet_lite0':
    input_size = 128
  if input_size:
    section['input_size'] = input_size
  return section


def train_section(**settings: Any) -> dict[str, Any]:
  """The `train` section: `fewshot.harness.train`'s settings.

  Configs give `num_steps`, `log_every`, `eval_every` and
  `checkpoint_every_steps`; the rest default to: a checkpoint at least
  every 300 s, 2 kept, TensorBoard events beside `metrics.jsonl`, and a
  stop at the first non-finite loss or gradient (`nonfinite='skip'` drops
  such updates instead, failing after `max_consecutive_nonfinite` in a row).
  """
  section = dict(checkpoint_every_secs=300, max_checkpoints=2,
                 tensorboard=True, nonfinite='stop',
                 max_consecutive_nonfinite=20)
  section.update(settings)
  return section


def eval_section(**overrides: Any) -> dict[str, Any]:
  """The `eval` section: seeded few-shot episodes of the val and test classes.

  Defaults: 5-way 1-shot 15-query episodes, 600 at test (the literature's
  count) and 300 at each validation, seed 2017 (test episodes; validation
  uses seed + 1), a test at the end of training, and the NMI of k-means
  clusters with the retrieval metrics (`experiments/evaluate.py --protocol
  retrieval`).
  """
  section = dict(ways=5, shots=1, queries=15, num_episodes=600,
                 val_episodes=300, images_per_chunk=2048, seed=2017,
                 test_at_end=True, retrieval_nmi=True)
  optional = ('precompute_features', 'feature_batch_size',
              'retrieval_distance',
              # multi-task configs (fewshot.builder_multitask)
              'batch_size', 'baselines', 'fewshot_data', 'fewshot_ways',
              'fewshot_shots', 'fewshot_queries', 'fewshot_episodes')
  unknown = sorted(set(overrides) - set(section) - set(optional))
  if unknown:
    raise ValueError(f'Unknown eval setting(s) {unknown}; known: '
                     f'{sorted(section)}, {", ".join(optional)}.')
  section.update(overrides)
  return section


# loss -> (its options, miner, the miner's options): the recipes the metric
# configs start from (pytorch-metric-learning's defaults and examples).
METRIC_RECIPES = {
    'contrastive': ({}, None, {}),
    'triplet': (dict(margin=0.2), 'semihard', dict(margin=0.2)),
    'multi_similarity': ({}, 'multi_similarity', dict(epsilon=0.1)),
    'ntxent': (dict(temperature=0.07), None, {}),
    'supcon': (dict(temperature=0.1), None, {}),
    'proxy_nca': (dict(softmax_scale=10.0), None, {}),
    'proxy_anchor': (dict(margin=0.1, alpha=32.0), None, {}),
    'normface': (dict(temperature=0.05), None, {}),
    'cosface': (dict(margin=0.35, scale=64.0), None, {}),
    'arcface': (dict(margin=28.6, scale=64.0), None, {}),
    'subcenter_arcface': (dict(margin=28.6, scale=64.0, sub_centers=3), None,
                          {}),
}


def metric_objective(loss: str, miner: str | None = None, **options: Any
                     ) -> dict[str, Any]:
  """A `metric` objective section from `METRIC_RECIPES[loss]`.

  `miner` None takes the recipe's miner, 'none' mines nothing; `options`
  are the objective's other settings (classes_per_batch, ...).
  """
  if loss not in METRIC_RECIPES:
    raise ValueError(f'Unknown metric loss {loss!r}; known: '
                     f'{sorted(METRIC_RECIPES)}.')
  loss_options, recipe_miner, miner_options = METRIC_RECIPES[loss]
  if miner is None:
    miner = recipe_miner
  elif miner == 'none':
    miner = None
  if miner != recipe_miner:
    miner_options = {}
  return dict(name='metric', loss=loss, loss_options=dict(loss_options),
              miner=miner, miner_options=dict(miner_options), **options)


__all__ = ['METRIC_RECIPES', 'data_section', 'eval_section', 'features_section',
           'metric_objective', 'parse_arg']
