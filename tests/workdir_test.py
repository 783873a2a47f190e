"""A run's workdir: reading its trained backbone back, clear errors otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot import builder
from fewshot import harness
from fewshot import workdir as workdir_lib
from fewshot.evaluators import workdir as evaluation
from helpers import restore_train_state
from supervised_test import straight_run  # pylint: disable=unused-import


def test_load_returns_the_trained_backbone(straight_run):
  config, workdir, _ = straight_run
  state, experiment, fresh = restore_train_state(config, workdir)
  backbone = builder.build_backbone(config.backbone)
  loaded = workdir_lib.load_backbone(str(workdir))
  assert loaded.module == workdir_lib.load_backbone(str(workdir),
                                                    'resnet12').module
  assert loaded.module == backbone.module
  assert set(loaded.variables) == {'params', 'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, loaded.params,
               state.params['backbone'])
  jax.tree.map(np.testing.assert_array_equal, loaded.model_state,
               state.model_state)
  # Training moved the parameters away from the initialisation.
  first_kernel = lambda params: params['layer1']['conv1']['kernel']
  assert not np.array_equal(first_kernel(fresh.params['backbone']),
                            first_kernel(loaded.params))
  images = jnp.asarray(builder.load_splits(config.data)['val'].images[:6])
  features = jax.jit(loaded.module.apply)(loaded.variables, images)
  expected, _ = jax.jit(backbone.apply, static_argnums=3)(
      state.params['backbone'], state.model_state, images, False)
  assert features.shape == (6, 4)
  np.testing.assert_array_equal(features, expected)
  # `config.backbone.weights=<workdir>` (here its checkpoints folder) starts
  # from it.
  section = config.backbone.copy_and_resolve_references()
  section.weights = str(workdir / 'checkpoints')
  started = builder.build_backbone(section)
  params, model_state = started.init(jax.random.key(123), images)
  jax.tree.map(np.testing.assert_array_equal, (params, model_state),
               (loaded.params, loaded.model_state))


def test_loading_another_architecture_is_a_clear_error(straight_run):
  _, workdir, _ = straight_run
  with pytest.raises(ValueError, match=r'holds a resnet12\(.*'
                     r'widths=\(4, 4, 4, 4\).*not the resnet18'):
    workdir_lib.load_backbone(str(workdir), 'resnet18')
  with pytest.raises(ValueError, match=r'another architecture.*'
                     r'widths=\(4, 4, 4, 8\).*'
                     r'has shape \(4,\) in the checkpoint but \(8,\)'):
    workdir_lib.load_backbone(str(workdir), 'resnet12', widths=(4, 4, 4, 8))
  # The BN mode may change: transductive BN simply ignores running stats.
  assert list(workdir_lib.load_backbone(str(workdir), norm='batch').variables
              ) == ['params']
  with pytest.raises(FileNotFoundError, match='no config.json'):
    workdir_lib.load_backbone(str(workdir / 'nothing_here'))


def test_load_reads_a_meta_training_workdir(tmp_path):
  """Episodic workdirs hold the backbone at params['backbone'] too."""
  import harness_test  # pylint: disable=g-import-not-at-top
  config = harness_test._tiny_config(steps=2)  # pylint: disable=protected-access
  config.eval.test_at_end = False
  harness.train_and_evaluate(config, str(tmp_path))
  params, model_state, _ = evaluation.restore(builder.build(config),
                                              str(tmp_path))
  loaded = workdir_lib.load_backbone(str(tmp_path), 'conv4')
  assert loaded.module.filters == 8 and loaded.module.norm == 'batch_running'
  jax.tree.map(np.testing.assert_array_equal,
               (loaded.params, loaded.model_state),
               (params['backbone'], model_state))


def test_backbones_load_points_a_path_to_the_workdir_module(tmp_path):
  with pytest.raises(ValueError, match='fewshot.workdir.load_backbone'):
    backbones.load('conv4', weights=str(tmp_path))
