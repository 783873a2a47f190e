"""Helpers shared by the tests: loading a config file by name."""

import importlib.util
import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'


def load_config_module(name: str):
  """`configs/<name>.py` as a module (configs are loaded by path, not import)."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/<name>.py:get_config(arg)`."""
  return load_config_module(name).get_config(arg)
