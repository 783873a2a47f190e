"""ANIL (head-only inner loop), Conv-4, Omniglot, 28x28: `maml_omniglot` with `algorithm=anil`.

  python experiments/train.py --config configs/anil_omniglot.py:ways=5,shots=1 \
      --workdir runs/anil_omniglot_5w1s
  python experiments/evaluate.py --config configs/anil_omniglot.py:ways=5,shots=1 \
      --workdir runs/anil_omniglot_5w1s --config.eval.num_episodes=1000

Takes the same config argument as configs/maml_omniglot.py, with
`algorithm=anil` as its default. Because only the head adapts, the inner
loop runs on features computed once per episode, so ANIL's 10 evaluation
inner steps are nearly free.
Measured (WORKSPACE.md): 5-way 1-shot, 1,000 meta-batches (12.6 minutes),
94.38 +- 0.38 over 1,000 test episodes.
"""

import importlib.util
import pathlib

import ml_collections

from fewshot.config_args import parse_arg


def _maml_omniglot():
  path = pathlib.Path(__file__).with_name('maml_omniglot.py')
  spec = importlib.util.spec_from_file_location('maml_omniglot', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  maml_omniglot = _maml_omniglot()
  arguments = dict(maml_omniglot.ARGUMENTS, algorithm='anil')
  return maml_omniglot.config_from_args(parse_arg(arg, **arguments))
