"""Learning curves of one or more workdirs, drawn into one PNG.

  python experiments/plot.py --workdir runs/proto --output curves.png
  python experiments/plot.py --workdir runs/a runs/b --labels adam,sgd

Panels: training loss, training accuracy (where logged), validation
accuracy with its 95% CI band (and validation MSE, where logged); one
colour per run, one line style per task/head/domain. Needs matplotlib
(`pip install -e '.[plots]'`).
"""

import os
from typing import Sequence

from absl import app
from absl import flags

from fewshot import plots
from fewshot.workdir import read_metrics

_WORKDIR = flags.DEFINE_multi_string(
    'workdir', None, 'Workdir(s) of experiments/train.py; more may follow '
    'as arguments (--workdir a b) or as repeated flags.')
_OUTPUT = flags.DEFINE_string('output', 'curves.png', 'PNG to write.')
_LABELS = flags.DEFINE_list('labels', None, 'One legend label per workdir '
                            '(default: the workdir names).')
_TITLE = flags.DEFINE_string('title', None, 'Figure title.')
_DPI = flags.DEFINE_integer('dpi', 100, 'Resolution of the PNG.')


def main(argv: Sequence[str]) -> None:
  workdirs = list(_WORKDIR.value or []) + list(argv[1:])
  if not workdirs:
    raise app.UsageError('Give at least one --workdir.')
  labels = _LABELS.value or [os.path.basename(os.path.normpath(w))
                             for w in workdirs]
  if len(labels) != len(workdirs):
    raise app.UsageError(f'{len(labels)} labels for {len(workdirs)} '
                         'workdirs.')
  try:
    runs = [(label, read_metrics(w)) for label, w in zip(labels, workdirs)]
  except FileNotFoundError as e:
    raise SystemExit(f'plot.py: {e}') from e
  figure = plots.curves(runs, title=_TITLE.value, dpi=_DPI.value)
  figure.savefig(_OUTPUT.value)
  print(f'Wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
