"""Helpers shared by the tests: loading config files and scripts, a simulated kill."""

import importlib.util
import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'


def load_module(path: pathlib.Path):
  """The Python file at `path` as a module (not a package's: loaded by path)."""
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_module(name: str):
  """`configs/<name>.py` as a module (configs are loaded by path, not import)."""
  return load_module(CONFIGS / f'{name}.py')


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/<name>.py:get_config(arg)`."""
  return load_config_module(name).get_config(arg)


def killed_after_checkpoint(monkeypatch, step: int, run) -> None:
  """Runs `run()` as if the process were killed right after saving `step`.

  The checkpoint of `step` is written completely (a real pre-emption can
  come at any time after it), then KeyboardInterrupt stops the run.
  """
  import pytest  # pylint: disable=g-import-not-at-top
  from fewshot.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  original_save = Checkpointer.save

  def save_then_die(self, saved_step, state, config_dict):
    original_save(self, saved_step, state, config_dict)
    if saved_step == step:
      self.wait()
      raise KeyboardInterrupt(f'simulated pre-emption after step {step}')

  monkeypatch.setattr(Checkpointer, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(Checkpointer, 'save', original_save)


def restore_train_state(config, workdir):
  """`(restored, experiment, initial)` train states of `workdir`'s latest
  checkpoint, via the harness's own Checkpointer."""
  import jax  # pylint: disable=g-import-not-at-top
  from fewshot import builder  # pylint: disable=g-import-not-at-top
  from fewshot.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from fewshot.objectives import init_state  # pylint: disable=g-import-not-at-top
  experiment = builder.build(config)
  state = init_state(experiment.objective, experiment.optimizer,
                     experiment.train_data, config.seed)
  checkpointer = Checkpointer(pathlib.Path(workdir) / 'checkpoints')
  restored, _ = checkpointer.restore(jax.eval_shape(lambda: state))
  checkpointer.close()
  return restored, experiment, state
