"""`load_config(name, arg)`: a `configs/<name>.py` file's config, for the
table scripts of benchmarks/ (run as `python benchmarks/<script>.py`, which
puts this folder on `sys.path`)."""

import importlib.util
import os

import ml_collections

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


def load_config(name: str, arg: str | None = None
                ) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s `get_config(arg)`."""
  path = os.path.join(CONFIGS, f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
