"""Config-driven transfer reports: `negative_transfer_report(config)`.

Like `fewshot.train`, this module reads a ConfigDict (see
`configs/transfer_report_omniglot.py`) and nothing below it does. It answers
"does this pretrained backbone help on that target data, and at which
sizes?": a pretrained model and a from-scratch model are evaluated on the
same seeded target episodes at several shots
(`fewshot.transfer.transfer_report`, paired per episode), and the source and
target feature distributions are compared by MMD.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewshot import data as data_lib
from fewshot import features as features_lib
from fewshot import train
from fewshot.data.sampling import EpisodeSpec, check_spec
from fewshot.evaluate import episode_accuracies
from fewshot.transfer.diagnostics import mmd, transfer_report


def _accuracies_fn(section, data, config, sample_images):
  """`shots -> [E] accuracies` of one model on the target episodes.

  Also returns `(backbone, backbone_params, model_state)` as built.
  """
  backbone = train.build_backbone(section)
  algorithm = train.build_algorithm(section, backbone)
  params, model_state = jax.jit(algorithm.init)(jax.random.key(config.seed),
                                                jnp.asarray(sample_images))
  embedding = (backbone, params['backbone'], model_state)
  if section.get('precompute_features', False):
    if section.algorithm.name not in features_lib.FEATURE_ALGORITHMS:
      raise ValueError(f'precompute_features needs one of '
                       f'{features_lib.FEATURE_ALGORITHMS}, not '
                       f'{section.algorithm.name!r}.')
    start = time.time()
    algorithm, params, model_state, data = features_lib.on_features(
        functools.partial(train.build_algorithm, section), backbone, params,
        model_state, data, batch_size=section.get('feature_batch_size', 256))
    jax.block_until_ready(data.images)
    logging.info('%s: target features %s in %.1f s', section.label,
                 data.images.shape, time.time() - start)
  counts = np.asarray(data.class_counts)

  def accuracies(shots: int) -> np.ndarray:
    spec = EpisodeSpec(config.eval.ways, int(shots), config.eval.queries)
    check_spec(spec, counts, split='target split')
    evaluate = jax.jit(episode_accuracies(
        algorithm, spec, config.eval.num_episodes,
        images_per_chunk=config.eval.images_per_chunk))
    start = time.time()
    result = np.asarray(evaluate(params, model_state, data,
                                 jax.random.key(config.eval.seed)))
    logging.info('%s, %d-shot: %.2f%% (%.1f s)', section.label, shots,
                 100 * result.mean(), time.time() - start)
    return result

  return accuracies, embedding


def _sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return images[np.sort(rng.choice(len(images), min(count, len(images)),
                                   replace=False))]


def negative_transfer_report(config: ml_collections.ConfigDict
                             ) -> dict[str, Any]:
  """Pretrained versus from-scratch on one target split, and source-target MMD.

  Config sections: `target` (a dataset, `load_splits` options plus `split`),
  `pretrained` and `scratch` (each `label`, `backbone`, `algorithm`,
  optional `precompute_features`), `sizes` (shots per class), `eval`
  (ways, queries, num_episodes, images_per_chunk, seed) and optionally
  `source` (a dataset standing for the pretraining distribution, with
  `split` and `mmd_images`) for the MMD between the pretrained backbone's
  features of source and target images, next to the MMD between two
  disjoint halves of the source (what "the same distribution" looks like).

  Returns:
    `{'rows': [...], 'markdown': str, 'mmd': {...}, 'negative_sizes': [...]}`
    (see `fewshot.transfer.TransferReport`).
  """
  target_options = dict(config.target)
  target_split = target_options.pop('split')
  target = data_lib.load_splits(target_options.pop('name'),
                                **target_options)[target_split]
  data = data_lib.to_device(target)
  sample_images = target.images[:2]
  pretrained, (backbone, backbone_params, model_state) = _accuracies_fn(
      config.pretrained, data, config, sample_images)
  scratch, _ = _accuracies_fn(config.scratch, data, config, sample_images)
  report = transfer_report(pretrained, scratch, tuple(config.sizes),
                           paired=True, size_name='shots')
  result = {'rows': report.rows, 'markdown': report.markdown(),
            'negative_sizes': report.negative_sizes,
            'pretrained': config.pretrained.label,
            'scratch': config.scratch.label,
            'episodes': config.eval.num_episodes, 'ways': config.eval.ways}

  if config.get('source') is not None:
    source_options = dict(config.source)
    source_split = source_options.pop('split')
    count = source_options.pop('mmd_images')
    source = data_lib.load_splits(source_options.pop('name'),
                                  **source_options)[source_split]
    embed = jax.jit(lambda x: features_lib.extract_features(
        backbone, backbone_params, model_state, x, batch_size=250))
    source_features = embed(jnp.asarray(_sample(source.images, 2 * count,
                                                config.seed)))
    target_features = embed(jnp.asarray(_sample(target.images, count,
                                                config.seed + 1)))
    half = source_features.shape[0] // 2
    result['mmd'] = {
        'source_vs_target': float(mmd(source_features[:half],
                                      target_features)),
        'source_half_vs_half': float(mmd(source_features[:half],
                                         source_features[half:])),
        'images_per_sample': int(min(half, target_features.shape[0])),
    }
  return result


__all__ = ['negative_transfer_report']
