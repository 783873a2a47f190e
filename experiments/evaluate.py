"""Evaluates a workdir's latest checkpoint; the last line printed is JSON.

  python experiments/evaluate.py --config configs/protonet_omniglot.py --workdir runs/proto
  python experiments/evaluate.py --config configs/transfer_tiny_imagenet.py:backbone=efficientnet_lite0

  python experiments/evaluate.py --config configs/protonet_omniglot.py --workdir runs/proto \
      --histogram runs/proto/test_accuracies.png

Without --workdir the configured model itself is evaluated: a pretrained
backbone (`config.backbone.weights`) with a linear probe, SimpleShot or
per-episode fine-tuning.
  python experiments/evaluate.py --config configs/protonet_omniglot.py --workdir runs/proto \
      --protocol omniglot_runs --runs_dir path/to/all_runs
  python experiments/evaluate.py --config configs/metric_omniglot.py:loss=arcface \
      --workdir runs/arcface --protocol retrieval
"""

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags

from fewshot import config_flags  # ml_collections', overrides checked
from fewshot import builder
from fewshot._utils import quiet_library_logs
from fewshot.checkpoint import ArchitectureMismatch, UnreadableCheckpoints
from fewshot.records import config_differences
from fewshot.evaluators import workdir as evaluation
from fewshot.ops import tune_cpu

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Workdir written by train.py (any objective); omit it '
    'to evaluate the configured pretrained backbone (config.backbone.weights) '
    'as it is.')
_PROTOCOL = flags.DEFINE_enum('protocol', 'episodes',
                              ['episodes', 'retrieval', 'omniglot_runs'],
                              'Seeded test episodes; retrieval metrics over '
                              'every image of the split (precision@1, '
                              'R-precision, MAP@R, recall@K); or Lake et '
                              'al.\'s runs.')
_RUNS_DIR = flags.DEFINE_string('runs_dir', None,
                                'Folder holding run01..run20 (omniglot_runs).')
_SPLIT = flags.DEFINE_enum('split', 'test', ['test', 'val'], 'Split to test.')
_HISTOGRAM = flags.DEFINE_string(
    'histogram', None, 'Write a PNG histogram of the per-episode accuracies '
    'here (episodes protocol; needs matplotlib).')


# The sections that decide a checkpoint's parameter shapes.
_MODEL_SECTIONS = ('backbone.', 'algorithm.', 'objective.')


def _model_fields_changed(workdir: str, config) -> str:
  """' --config differs from the workdir's config.json in: <field>: <there>
  there, <here> here; ...' for the model sections, or ''."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    stored = json.load(f)
  here = json.loads(json.dumps(config.to_dict()))
  changed = {k: v for k, v in config_differences([stored, here]).items()
             if k.startswith(_MODEL_SECTIONS)}
  if not changed:
    return ''
  listed = '; '.join(f'{k}: {there!r} there, {now!r} here'
                     for k, (there, now) in changed.items())
  return f" --config differs from the workdir's config.json in: {listed}."


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  try:
    _evaluate()
  except ArchitectureMismatch as e:
    sys.exit(f'evaluate.py: {e}'
             f'{_model_fields_changed(_WORKDIR.value, _CONFIG.value)}')
  except (UnreadableCheckpoints, FileNotFoundError) as e:
    sys.exit(f'evaluate.py: {type(e).__name__}: {e}')


def _evaluate() -> None:
  quiet_library_logs()
  tune_cpu()  # before any JAX work; see fewshot/ops/__init__.py
  if _HISTOGRAM.value and _PROTOCOL.value != 'episodes':
    raise app.UsageError('--histogram needs --protocol episodes.')
  if _PROTOCOL.value == 'omniglot_runs':
    if not _RUNS_DIR.value or not _WORKDIR.value:
      raise app.UsageError('--protocol omniglot_runs needs --runs_dir and '
                           '--workdir.')
    from fewshot.data.omniglot import read_omniglot_runs  # pylint: disable=g-import-not-at-top
    runs = read_omniglot_runs(_RUNS_DIR.value,
                              image_size=_CONFIG.value.data.image_size)
    result = evaluation.evaluate_omniglot_runs(
        builder.build(_CONFIG.value, pretrained=False), _WORKDIR.value, runs)
    print(f"error rate {result['error_rate']:.2f}% over "
          f"{result['trials']} trials ({result['runs']} runs)")
  else:
    experiment = builder.build(_CONFIG.value,
                               pretrained=_WORKDIR.value is None)
    if 'parameters' in experiment.info:
      print(f"{experiment.info['backbone']}: {experiment.info['parameters']}",
            flush=True)
    result = evaluation.evaluate_workdir(experiment, _WORKDIR.value,
                                         split=_SPLIT.value,
                                         protocol=_PROTOCOL.value,
                                         per_episode=bool(_HISTOGRAM.value))
    if _HISTOGRAM.value:  # a file, not thousands of numbers in the JSON line
      from fewshot.plots import accuracy_histogram  # pylint: disable=g-import-not-at-top
      accuracy_histogram(
          result.pop('accuracies'), ci95=result['ci95'],
          title=f"{_WORKDIR.value or experiment.info.get('backbone')}: "
          f"{result['ways']}-way {result['shots']}-shot {result['split']}, "
          f"{result['episodes']} episodes").savefig(_HISTOGRAM.value)
      result['histogram'] = _HISTOGRAM.value
    if _PROTOCOL.value == 'retrieval':
      recall = ', '.join(f'R@{k} {100 * v:.2f}'
                         for k, v in result['recall_at_k'].items())
      if 'nmi' in result:
        recall += f", NMI {100 * result['nmi']:.2f}"
      print(f"{result['split']} retrieval over {result['images']} images of "
            f"{result['classes']} classes: MAP@R "
            f"{100 * result['map_at_r']:.2f}, R-precision "
            f"{100 * result['r_precision']:.2f}, precision@1 "
            f"{100 * result['precision_at_1']:.2f}, {recall}")
    elif result['protocol'] == 'few_label':
      print(f"{result['ways']}-way, {result['shots']} labelled per class: "
            f"{result['split']} accuracy {100 * result['accuracy']:.2f}% "
            f"+- {100 * result['ci95']:.2f} (95% CI, {result['examples']} "
            f"examples)")
    else:
      print(f"{result['ways']}-way {result['shots']}-shot {result['split']} "
            f"accuracy {100 * result['accuracy']:.2f}% "
            f"+- {100 * result['ci95']:.2f} (95% CI, {result['episodes']} "
            f"episodes)")
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
