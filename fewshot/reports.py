"""Negative-transfer reports: pretrained versus from scratch, and source-target MMD.

They answer "does this pretrained backbone help on that target data, and at
which sizes?": two models are evaluated on the same seeded target episodes
at several shots (`fewshot.transfer.transfer_report`, paired per episode),
and the source and target feature distributions are compared by MMD.
`fewshot.builder.transfer_report_inputs` builds the arguments of
`negative_transfer_report` from a config (`configs/transfer_report_omniglot.py`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fewshot import features as features_lib
from fewshot.algorithms.baselines import linear_probe
from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import Backbone
from fewshot.data.dataset import ClassDataset
from fewshot.data.sampling import (DeviceDataset, EpisodeSpec, check_spec,
                                   to_device)
from fewshot.evaluators.episodes import episode_accuracies
from fewshot.transfer.diagnostics import TransferReport, mmd, transfer_report


class ReportModel(NamedTuple):
  """One side of a report: a backbone and the learner that adapts it.

  With `precompute_features` the target split is embedded once by the
  frozen backbone (a frozen-feature learner only).
  """
  label: str
  backbone: Backbone
  make_algorithm: Callable[[Backbone], Algorithm]
  precompute_features: bool = False
  feature_batch_size: int = 256


def _accuracies_fn(model: ReportModel, data: DeviceDataset, *, ways: int,
                   queries: int, num_episodes: int, images_per_chunk: int,
                   seed: int, episode_seed: int, sample_images: Any):
  """`shots -> [E] accuracies` of one model on the target episodes.

  Also returns `(backbone, backbone_params, model_state)` as built.
  """
  algorithm = model.make_algorithm(model.backbone)
  params, model_state = jax.jit(algorithm.init)(jax.random.key(seed),
                                                jnp.asarray(sample_images))
  embedding = (model.backbone, params['backbone'], model_state)
  if model.precompute_features:
    start = time.time()
    algorithm, params, model_state, data = features_lib.on_features(
        model.make_algorithm, model.backbone, params, model_state, data,
        batch_size=model.feature_batch_size)
    jax.block_until_ready(data.images)
    logging.info('%s: target features %s in %.1f s', model.label,
                 data.images.shape, time.time() - start)
  counts = np.asarray(data.class_counts)

  def accuracies(shots: int) -> np.ndarray:
    spec = EpisodeSpec(ways, int(shots), queries)
    check_spec(spec, counts, split='target split')
    evaluate = jax.jit(episode_accuracies(algorithm, spec, num_episodes,
                                          images_per_chunk=images_per_chunk))
    start = time.time()
    result = np.asarray(evaluate(params, model_state, data,
                                 jax.random.key(episode_seed)))
    logging.info('%s, %d-shot: %.2f%% (%.1f s)', model.label, shots,
                 100 * result.mean(), time.time() - start)
    return result

  return accuracies, embedding


def _sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return images[np.sort(rng.choice(len(images), min(count, len(images)),
                                   replace=False))]


def negative_transfer_report(
    target: ClassDataset, pretrained: ReportModel, scratch: ReportModel, *,
    sizes: Sequence[int], ways: int, queries: int, num_episodes: int,
    episode_seed: int, seed: int = 0, images_per_chunk: int = 1024,
    source: ClassDataset | None = None, mmd_images: int = 500
) -> dict[str, Any]:
  """Pretrained versus from-scratch on one target split, and source-target MMD.

  Args:
    target: the target classes.
    pretrained, scratch: the two models, evaluated on the same seeded
      `ways`-way episodes with `queries` queries per class at each of
      `sizes` shots (episodes from `key(episode_seed)`; parameters from
      `key(seed)`).
    num_episodes, images_per_chunk: the evaluation.
    source: a dataset standing for the pretraining distribution: the MMD
      between the pretrained backbone's features of `2 * mmd_images`
      source and `mmd_images` target images is reported next to the MMD
      between two disjoint halves of the source (what "the same
      distribution" looks like).

  Returns:
    `{'rows': [...], 'markdown': str, 'mmd': {...}, 'negative_sizes': [...]}`
    (see `fewshot.transfer.TransferReport`).
  """
  data = to_device(target)
  options = dict(ways=ways, queries=queries, num_episodes=num_episodes,
                 images_per_chunk=images_per_chunk, seed=seed,
                 episode_seed=episode_seed, sample_images=target.images[:2])
  pretrained_fn, (backbone, backbone_params, model_state) = _accuracies_fn(
      pretrained, data, **options)
  scratch_fn, _ = _accuracies_fn(scratch, data, **options)
  report = transfer_report(pretrained_fn, scratch_fn, tuple(sizes),
                           paired=True, size_name='shots')
  result = {'rows': report.rows, 'markdown': report.markdown(),
            'negative_sizes': report.negative_sizes,
            'pretrained': pretrained.label, 'scratch': scratch.label,
            'episodes': num_episodes, 'ways': ways}
  if source is not None:
    embed = jax.jit(lambda x: features_lib.extract_features(
        backbone, backbone_params, model_state, x, batch_size=250))
    source_features = embed(jnp.asarray(_sample(source.images, 2 * mmd_images,
                                                seed)))
    target_features = embed(jnp.asarray(_sample(target.images, mmd_images,
                                                seed + 1)))
    half = source_features.shape[0] // 2
    result['mmd'] = {
        'source_vs_target': float(mmd(source_features[:half],
                                      target_features)),
        'source_half_vs_half': float(mmd(source_features[:half],
                                         source_features[half:])),
        'images_per_sample': int(min(half, target_features.shape[0])),
    }
  return result


def linear_probe_transfer_report(
    backbone: Any, pretrained_params: Any, model_state: Any, data: Any, *,
    shots: Sequence[int] = (1, 5, 20, 100), num_ways: int = 5,
    num_queries: int = 15, num_episodes: int = 100,
    key: jax.Array | None = None, scratch_seed: int = 0,
    print_table: bool = False, **probe_options: Any) -> TransferReport:
  """Linear probe on pretrained features versus on a random backbone's.

  The scratch model is the same architecture with random weights (from
  `scratch_seed`), probed the same way: the gap measures what pretraining
  contributes at each shot count. Both are evaluated on the same seeded
  episodes (`paired`). For a scratch model *trained* on the target data, call
  `transfer_report` with your own callables.

  Args:
    backbone: a `fewshot.backbones.Backbone`.
    pretrained_params, model_state: its pretrained parameters and state.
    data: a `fewshot.data.DeviceDataset` of target classes; every class
      needs `max(shots) + num_queries` images.
    shots: labelled target images per class.
    num_ways, num_queries, num_episodes: the test episodes.
    key: PRNG key of the episodes (default `key(0)`).
    scratch_seed: seed of the random backbone.
    print_table: print the markdown table.
    **probe_options: for `fewshot.algorithms.linear_probe`.
  """
  key = jax.random.key(0) if key is None else key
  algorithm = linear_probe(backbone, **probe_options)
  sample_images = data.images[:2]
  scratch_params, scratch_state = algorithm.init(jax.random.key(scratch_seed),
                                                 sample_images)
  pretrained_meta = {**scratch_params, 'backbone': pretrained_params}
  class_counts = np.asarray(data.class_counts)

  evaluators = {}  # size -> jitted evaluation, shared by both models

  def accuracies(meta_params, state):
    def run(size):
      if size not in evaluators:
        spec = EpisodeSpec(num_ways, int(size), num_queries)
        check_spec(spec, class_counts, split='target dataset')
        evaluators[size] = jax.jit(
            episode_accuracies(algorithm, spec, num_episodes))
      return np.asarray(evaluators[size](meta_params, state, data, key))
    return run

  return transfer_report(accuracies(pretrained_meta, model_state),
                         accuracies(scratch_params, scratch_state), shots,
                         paired=True, size_name='shots',
                         print_table=print_table)


__all__ = ['ReportModel', 'linear_probe_transfer_report',
           'negative_transfer_report']
