"""ANIL (head-only inner loop), Conv-4, Omniglot, 28x28: `maml_omniglot` with `algorithm=anil`.

  python experiments/train.py --config configs/anil_omniglot.py:ways=5,shots=1 \
      --workdir runs/anil_omniglot_5w1s
  python experiments/evaluate.py --config configs/anil_omniglot.py:ways=5,shots=1 \
      --workdir runs/anil_omniglot_5w1s --config.eval.num_episodes=1000

Takes the same config argument as configs/maml_omniglot.py. Because only the
head adapts, the inner loop runs on features computed once per episode;
ANIL's inner steps are nearly free, so it evaluates with 10 of them.
Measured (WORKSPACE.md): 5-way 1-shot, 1,000 meta-batches (12.6 minutes),
94.38 +- 0.38 over 1,000 test episodes.
"""

import importlib.util
import pathlib

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  path = pathlib.Path(__file__).with_name('maml_omniglot.py')
  spec = importlib.util.spec_from_file_location('maml_omniglot', path)
  maml_omniglot = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(maml_omniglot)
  arg = 'algorithm=anil' + (f',{arg}' if arg else '')
  config = maml_omniglot.get_config(arg)
  if 'eval_inner_steps=' not in arg:
    config.algorithm.eval_inner_steps = 10
  return config
