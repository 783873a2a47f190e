"""The config-driven negative-transfer report on generated data."""

import ml_collections
import numpy as np

from fewshot import reports


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
      backbone=dict(name='conv4', filters=8, num_blocks=2,
                    norm='batch_running'),
      algorithm=dict(name='linear_probe', solver='ridge'),
      precompute_features=True, feature_batch_size=16)
  config.scratch = dict(
      label='conv4 fine-tuned from scratch',
      backbone=dict(name='conv4', filters=8, num_blocks=2, norm='none'),
      algorithm=dict(name='fine_tune', steps=2))
  config.sizes = (1, 3)
  config.eval = dict(ways=3, queries=4, num_episodes=6, images_per_chunk=64,
                     seed=1)
  return config


def test_report_rows_verdicts_and_mmd():
  result = reports.negative_transfer_report(_config())
  assert [row['size'] for row in result['rows']] == [1, 3]
  for row in result['rows']:
    assert 0.0 <= row['pretrained'] <= 1.0 and 0.0 <= row['scratch'] <= 1.0
    np.testing.assert_allclose(row['gap'], row['pretrained'] - row['scratch'],
                               atol=1e-6)
    expected = ('negative' if row['gap'] < -row['gap_ci95'] else
                'positive' if row['gap'] > row['gap_ci95'] else
                'inconclusive')
    assert row['verdict'] == expected
  assert result['negative_sizes'] == [
      row['size'] for row in result['rows'] if row['verdict'] == 'negative']
  assert result['markdown'].count('\n') == 3  # header, rule, two rows
  # Two halves of one distribution are closer than source and target.
  mmd = result['mmd']
  assert mmd['source_half_vs_half'] < mmd['source_vs_target']
  assert mmd['images_per_sample'] == 40
