"""The Tiny-ImageNet distillation table (RFS): teacher, born-again, Conv-4s.

  FEWSHOT_MANUAL_DIR=../shared/data python benchmarks/distillation_table.py --out runs/distill_table --epochs 8

Trains, each for `--epochs` on the 120 meta-train classes at 32x32: the
ResNet-12 teacher (`configs/pretrain_resnet12_tiny_imagenet.py`), a
born-again ResNet-12 distilled from it, a Conv-4 trained alone (alpha=0)
and a Conv-4 distilled from the teacher (`configs/distill_tiny_imagenet.py`).
Then scores each with a linear probe on the same 600 seeded 5-way 1-shot
and 5-shot episodes of the 40 meta-test classes, one JSON line per figure,
and the paired gaps (born-again - teacher, distilled - alone) per setting,
with the 95% CI of the per-episode differences (the same episodes for
every model, so the pair is the test; `significant` when it excludes 0).
A run that is stopped resumes each training where it stopped (workdirs
under `--out`).
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import logging  # pylint: disable=g-import-not-at-top

import numpy as np  # pylint: disable=g-import-not-at-top

from config_files import load_config  # benchmarks/ (sys.path)
from fewshot import builder, harness  # pylint: disable=g-import-not-at-top
from fewshot.evaluators import workdir as evaluation  # pylint: disable=g-import-not-at-top
from fewshot.stats import mean_confidence_interval  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='runs/distill_table')
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--episodes', type=int, default=600)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  out = os.path.abspath(args.out)
  teacher = os.path.join(out, 'teacher')
  runs = {
      'teacher': ('pretrain_resnet12_tiny_imagenet', f'epochs={args.epochs}'),
      'born_again': ('distill_tiny_imagenet',
                     f'teacher={teacher},epochs={args.epochs}'),
      'conv4_alone': ('distill_tiny_imagenet',
                      f'teacher={teacher},student=conv4,alpha=0,'
                      f'epochs={args.epochs}'),
      'conv4_distilled': ('distill_tiny_imagenet',
                          f'teacher={teacher},student=conv4,'
                          f'epochs={args.epochs}'),
  }
  for name, (config_name, arg) in runs.items():
    workdir = os.path.join(out, name)
    config = load_config(config_name, arg)
    with config.unlocked():
      config.eval.test_at_end = False
      config.train.eval_every = config.train.num_steps
    harness.train_and_evaluate(config, workdir)  # resumes; done is done
  accuracies = {}
  for shots in (1, 5):
    for name, (config_name, arg) in runs.items():
      config = load_config(config_name, f'{arg},shots={shots}')
      with config.unlocked():
        config.algorithm = dict(name='linear_probe')
        config.eval.num_episodes = args.episodes
      result = evaluation.evaluate_workdir(
          builder.build(config, pretrained=False), os.path.join(out, name),
          per_episode=True)
      accuracies[name, shots] = result
      print(json.dumps(dict(model=name, shots=shots, epochs=args.epochs,
                            accuracy=100 * result['accuracy'],
                            ci95=100 * result['ci95'],
                            episodes=result['episodes'])), flush=True)
  for shots in (1, 5):
    for better, worse in (('born_again', 'teacher'),
                          ('conv4_distilled', 'conv4_alone')):
      a, b = accuracies[better, shots], accuracies[worse, shots]
      # The same episodes for every model: the paired gap's CI is the test.
      gap, gap_ci = mean_confidence_interval(
          100 * (np.asarray(a['accuracies']) - np.asarray(b['accuracies'])))
      print(json.dumps(dict(gap=f'{better} - {worse}', shots=shots,
                            points=gap, paired_ci95=gap_ci,
                            significant=bool(gap - gap_ci > 0),
                            beyond_cis=bool(a['accuracy'] - a['ci95'] >
                                            b['accuracy'] + b['ci95'])
                            )), flush=True)


if __name__ == '__main__':
  main()
