"""Negative-transfer report: pretrained vs from scratch on target data, and MMD.

  FEWSHOT_MANUAL_DIR=../shared/data python experiments/transfer_report.py \
      --config configs/transfer_report_omniglot.py

Prints the markdown table; the last line is one JSON object (rows with
accuracies, gaps and verdicts per size, and the MMD figures).
"""

import json
from typing import Sequence

from absl import app
from absl import flags

from fewshot import config_flags  # ml_collections', overrides checked
from fewshot import builder
from fewshot import reports
from fewshot._utils import quiet_library_logs
from fewshot.ops import tune_cpu

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Report config.',
                                          lock_config=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  quiet_library_logs()
  tune_cpu()  # before any JAX work; see fewshot/ops/__init__.py
  result = reports.negative_transfer_report(
      **builder.transfer_report_inputs(_CONFIG.value))
  print(result['markdown'])
  if 'mmd' in result:
    print('MMD^2 source vs target {source_vs_target:.4f}; source half vs '
          'half {source_half_vs_half:.4f} ({images_per_sample} images per '
          'sample)'.format(**result['mmd']))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
