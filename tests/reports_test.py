"""The negative-transfer reports on generated data, against direct evaluation."""

import jax
import ml_collections
import numpy as np
import pytest

from fewshot import backbones
from fewshot import builder
from fewshot import reports
from fewshot.algorithms import linear_probe
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.evaluators import episode_accuracies
from fewshot.stats import mean_confidence_interval


def _config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.target = dict(name='synthetic', split='test', num_classes=(2, 2, 6),
                       images_per_class=8, image_size=12, noise=20.0)
  # A source of another kind: much noisier images of other templates.
  config.source = dict(name='synthetic', split='train', num_classes=(6, 2, 2),
                       images_per_class=20, image_size=12, noise=120.0,
                       seed=3, mmd_images=40)
  config.pretrained = dict(
      label='conv4 + ridge probe',
      backbone=dict(name='conv4', filters=8, num_blocks=1,
                    norm='batch_running'),
      algorithm=dict(name='linear_probe', solver='ridge'),
      precompute_features=True, feature_batch_size=16)
  config.scratch = dict(
      label='conv4 fine-tuned from scratch',
      backbone=dict(name='conv4', filters=8, num_blocks=1, norm='none'),
      algorithm=dict(name='fine_tune', steps=2))
  config.sizes = (1, 3)
  config.eval = dict(ways=3, queries=4, num_episodes=6, images_per_chunk=64,
                     seed=1)
  return config


def _direct_accuracies(section, config, shots):
  """One model's per-episode accuracies, evaluated without the report."""
  target = builder.transfer_report_inputs(config)['target']
  data = sampling.to_device(target)
  algorithm = builder.build_algorithm(
      section.algorithm, builder.build_backbone(section.backbone))
  params, state = jax.jit(algorithm.init)(jax.random.key(config.seed),
                                          data.images[:2])
  spec = sampling.EpisodeSpec(config.eval.ways, shots, config.eval.queries)
  return np.asarray(jax.jit(episode_accuracies(algorithm, spec, 6))(
      params, state, data, jax.random.key(config.eval.seed)))


def test_report_rows_are_the_paired_episode_accuracies_and_mmd():
  config = _config()
  result = reports.negative_transfer_report(
      **builder.transfer_report_inputs(config))
  assert [row['size'] for row in result['rows']] == [1, 3]
  for row in result['rows'][:1]:  # one size: each direct evaluation costs
    # The precomputed-feature pretrained side and the scratch side equal
    # their models' own evaluation on the same episodes; the gap's CI is
    # the paired (per-episode difference) interval.
    pretrained = _direct_accuracies(config.pretrained, config, row['size'])
    scratch = _direct_accuracies(config.scratch, config, row['size'])
    np.testing.assert_allclose(row['pretrained'], pretrained.mean(), atol=1e-6)
    np.testing.assert_allclose(row['scratch'], scratch.mean(), atol=1e-6)
    gap, gap_ci = mean_confidence_interval(pretrained - scratch)
    np.testing.assert_allclose([row['gap'], row['gap_ci95']], [gap, gap_ci],
                               atol=1e-6)
  assert result['markdown'].count('\n') == 3  # header, rule, two rows
  # Two halves of one distribution are closer than source and target.
  mmd = result['mmd']
  assert mmd['source_half_vs_half'] < mmd['source_vs_target']
  assert mmd['images_per_sample'] == 40


def test_a_model_against_itself_is_inconclusive_with_a_zero_gap():
  config = _config()
  config.scratch = config.pretrained
  del config['source']
  result = reports.negative_transfer_report(
      **builder.transfer_report_inputs(config))
  for row in result['rows']:
    assert row['gap'] == 0.0 and row['gap_ci95'] == 0.0
    assert row['verdict'] == 'inconclusive' and not row['negative_transfer']
  assert result['negative_sizes'] == [] and 'mmd' not in result


def test_linear_probe_transfer_report_against_direct_evaluation():
  data = sampling.to_device(synthetic_splits(
      num_classes=(1, 1, 4), images_per_class=5, image_size=16)['test'])
  backbone = backbones.create('conv4', filters=8, num_blocks=1)
  # "Pretrained" weights that are the scratch model's own: a zero gap.
  scratch_params, state = linear_probe(backbone).init(jax.random.key(5),
                                                      data.images[:2])
  report = reports.linear_probe_transfer_report(
      backbone, scratch_params['backbone'], state, data, shots=(2,),
      num_ways=3, num_queries=2, num_episodes=4, scratch_seed=5)
  assert [(row['size'], row['gap'], row['verdict']) for row in report.rows
          ] == [(2, 0.0, 'inconclusive')]
  # Other weights: the pretrained row is the probe's own evaluation.
  other, _ = backbone.init(jax.random.key(9), data.images[:2])
  report = reports.linear_probe_transfer_report(
      backbone, other, state, data, shots=(2,), num_ways=3, num_queries=2,
      num_episodes=4, scratch_seed=5)
  algorithm = linear_probe(backbone)
  direct = jax.jit(episode_accuracies(
      algorithm, sampling.EpisodeSpec(3, 2, 2), 4))(
          {**scratch_params, 'backbone': other}, state, data,
          jax.random.key(0))
  np.testing.assert_allclose(report.rows[0]['pretrained'],
                             np.mean(direct), atol=1e-6)
  with pytest.raises(ValueError, match='images per class'):
    reports.linear_probe_transfer_report(backbone, other, state, data,
                                         shots=(4,), num_ways=3,
                                         num_queries=2, num_episodes=2)
