"""Pretrains a backbone with a classifier on all meta-training images; resumes.

SIGTERM or Ctrl-C saves a checkpoint first; the same command resumes.

  python experiments/pretrain.py --config configs/pretrain_resnet12_tiny_imagenet.py \
      --workdir runs/pretrain_resnet12

Afterwards `fewshot.backbones.load('resnet12', weights='runs/pretrain_resnet12')`
returns the backbone, and `--config.backbone.weights=runs/pretrain_resnet12`
makes a training config start from it.
"""

import json
import signal
import sys
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from fewshot import pretrain
from fewshot._utils import quiet_library_logs
from fewshot.ops import tune_malloc

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Pretraining config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and logs go here.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  quiet_library_logs()
  tune_malloc()  # before any JAX work; see fewshot/ops/__init__.py
  results = pretrain.pretrain_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results))
  if 'stopped_by' in results:  # stopped by a signal, checkpoint saved
    sys.exit(128 + signal.Signals[results['stopped_by']].value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
