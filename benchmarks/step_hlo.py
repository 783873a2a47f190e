"""Dumps the optimised HLO of the ProtoNet and MAML training steps, canonicalised.

Two checkouts compile the same program when their dumps are equal byte for
byte: the dump drops the debug tables, `metadata` and `stack_frame_id`s, and
renames every `%instruction` in order of first appearance, so Python
function names (which name the instructions) do not count. Works on this
API (`fewshot.objectives`) and on the one before issue 13 (`fewshot.train`):

  python benchmarks/step_hlo.py /tmp/new                     # this checkout
  PYTHONPATH=<old worktree> python benchmarks/step_hlo.py /tmp/old
  cmp /tmp/old_maml.hlo /tmp/new_maml.hlo

Prints one JSON line per step: its name, lines and output file.
"""

from __future__ import annotations

import json
import re
import sys

import jax

from fewshot import backbones
from fewshot.algorithms import maml, protonet
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits

try:  # the API of this checkout
  from fewshot.objectives import episodic, init_state, make_train_step
  from fewshot.optimizers import make_optimizer
  OLD_API = False
except ImportError:  # before issue 13
  from fewshot.train import init_state, make_optimizer, make_train_step  # pylint: disable=g-import-not-at-top
  OLD_API = True


def canonical(text: str) -> str:
  """`text` without debug tables and metadata, instructions renamed in order."""
  head, _, rest = text.partition('\nFileNames\n')
  body = rest[rest.index('\n%'):] if '\n%' in rest else rest
  text = head + body
  text = re.sub(r', metadata=\{[^}]*\}', '', text)
  text = re.sub(r',? ?stack_frame_id=\d+', '', text)
  text = re.sub(r'^HloModule \S+', 'HloModule', text, flags=re.M)
  names = {}
  return re.sub(r'%[A-Za-z_][\w.\-]*',
                lambda m: '%v' + str(names.setdefault(m.group(0), len(names))),
                text)


def step_text(algorithm, spec: tuple[int, int, int], tasks: int, splits) -> str:
  optimizer = make_optimizer(name='adam', learning_rate=1e-3)
  data = sampling.to_device(splits['train'])
  if OLD_API:
    state = init_state(algorithm, optimizer, splits['train'].images[:2], 0)
    step = make_train_step(algorithm, optimizer, sampling.EpisodeSpec(*spec),
                           tasks)
  else:
    objective = episodic(algorithm, ways=spec[0], shots=spec[1],
                         queries=spec[2], meta_batch_size=tasks)
    state = init_state(objective, optimizer, data, 0)
    step = make_train_step(objective, optimizer)
  compiled = jax.jit(step, donate_argnums=0).lower(state, data).compile()
  return canonical(compiled.as_text())


def main() -> None:
  prefix = sys.argv[1] if len(sys.argv) > 1 else 'step'
  splits = synthetic_splits(num_classes=(64, 5, 5), images_per_class=20,
                            image_size=28, channels=1)
  steps = {
      'protonet': (protonet(backbones.create('conv4', norm='batch_running')),
                   (5, 1, 15), 1),
      'maml': (maml(backbones.create('conv4', norm='batch'), num_ways=5,
                    inner_steps=1, inner_learning_rate=0.4), (5, 1, 15), 32),
  }
  for name, (algorithm, spec, tasks) in steps.items():
    text = step_text(algorithm, spec, tasks, splits)
    path = f'{prefix}_{name}.hlo'
    with open(path, 'w') as f:
      f.write(text)
    print(json.dumps({'benchmark': f'{name}_step_hlo', 'value': text.count('\n'),
                      'unit': 'lines', 'file': path, 'old_api': OLD_API}))


if __name__ == '__main__':
  main()
