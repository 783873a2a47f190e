"""Trains any objective the config names; re-running on the same workdir resumes.

  python experiments/train.py --config configs/protonet_omniglot.py --workdir runs/proto
  python experiments/train.py --config configs/pretrain_synthetic.py --workdir runs/pretrain

`config.objective.name` says what is trained: 'episodic' (meta-training a
few-shot algorithm) or 'supervised' (pretraining a backbone with a
classifier). SIGTERM or Ctrl-C saves a checkpoint first; the same command
resumes.
"""

import json
import signal
import sys
from typing import Sequence

from absl import app
from absl import flags

from fewshot import config_flags  # ml_collections', overrides checked
from fewshot import harness
from fewshot.checkpoint import ArchitectureMismatch, UnreadableCheckpoints
from fewshot.config_drift import ConfigDriftError
from fewshot._utils import quiet_library_logs
from fewshot.ops import tune_cpu

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and logs go here.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume a workdir whose config.json differs from --config in fields '
    'that change the computation (the change is recorded in the workdir\'s '
    'config_changes.jsonl); without it such a resume stops with the list of '
    'differing fields.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() first (multi-host runs; the cluster '
    'is detected from the environment, e.g. SLURM or Cloud TPU).')


# Errors whose message names the problem and the fix: printed without a
# traceback, exit status 1.
USER_ERRORS = (harness.NonFiniteError, ConfigDriftError,
               ArchitectureMismatch, UnreadableCheckpoints, FileNotFoundError)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  quiet_library_logs()
  tune_cpu()  # before any JAX work; see fewshot/ops/__init__.py
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  try:
    results = harness.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value,
        allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except USER_ERRORS as e:  # what the message says is all there is to know
    sys.exit(f'train.py: {type(e).__name__}: {e}')
  print(json.dumps(results))
  if 'stopped_by' in results:  # stopped by a signal, checkpoint saved
    sys.exit(128 + signal.Signals[results['stopped_by']].value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
