"""One Markdown table of workdirs: final metrics, wall time, config changes.

  python experiments/summarize.py runs/proto_1shot runs/proto_5shot

Columns: run, final step, the final validation and test metrics (accuracy
as `mean ± 95% CI` in %), wall time (first to last log record), and each
config key (dotted, from config.json) whose value differs between the runs.
"""

import csv
import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags

from fewshot import run_tables
from fewshot.workdir import CONFIG, read_metrics

_FORMAT = flags.DEFINE_enum('format', 'markdown', ['markdown', 'csv'],
                            'Table format.')


def _run(workdir: str) -> tuple[str, list, dict]:
  """`(name, records, config)` of a workdir."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'No workdir {workdir}: no such directory.')
  records = read_metrics(workdir)
  path = os.path.join(workdir, CONFIG)
  config = {}
  if os.path.exists(path):
    with open(path) as f:
      config = json.load(f)
  return os.path.basename(os.path.normpath(workdir)), records, config


def main(argv: Sequence[str]) -> None:
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError('Give one or more workdirs.')
  try:
    runs = [_run(w) for w in workdirs]
  except FileNotFoundError as e:
    raise SystemExit(f'summarize.py: {e}') from e
  names = [name for name, _, _ in runs]
  if len(set(names)) < len(names):  # same basename: name runs by path
    runs = [(w, r, c) for w, (_, r, c) in zip(workdirs, runs)]
  rows = run_tables.runs_table(runs)
  if _FORMAT.value == 'csv':
    csv.writer(sys.stdout).writerows(rows)
  else:
    print(run_tables.markdown_table(rows))


if __name__ == '__main__':
  app.run(main)
