"""Adaptation tables: every pair, method and seed at one budget.

  python benchmarks/adaptation_table.py --out runs/adaptation_table --steps 1000
  python benchmarks/adaptation_table.py --config adapt_pacs --extra features=true \
      --pairs photo:sketch,photo:art_painting,heldout:sketch --methods source_only,dann,mcc,self_training \
      --out runs/pacs_features

For each seed, pair and method trains `configs/<--config>.py` (default
`adapt_digits`: MNIST <-> USPS) with the same budget and `--extra`
arguments, and prints one JSON line per run (target and source test
accuracy); at the end, per pair and method, the mean target accuracy with
its 95% CI over seeds. 'self_training' is source-only plus pseudo-labels. A
pair `heldout:<domain>` is leave-one-domain-out (`configs/adapt_pacs.py`'s
`heldout`: ERM on the other domains; only its source_only method runs).
Finished runs are kept in `<out>/runs.jsonl` and skipped when the script
is run again.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import logging  # pylint: disable=g-import-not-at-top

from config_files import load_config  # benchmarks/ (sys.path)
from fewshot import harness  # pylint: disable=g-import-not-at-top
from fewshot.stats import mean_confidence_interval  # pylint: disable=g-import-not-at-top

METHODS = ('source_only', 'dann', 'cdan_e', 'mcc', 'mmd', 'coral', 'adabn',
           'self_training', 'oracle')


def _run(out, config_name, extra, pair, method, seed, steps, done):
  name = f'{pair.replace(":", "2")}/{method}-s{seed}'
  if name in done:
    return done[name]
  source, target = pair.split(':')
  domains = (f'heldout={target}' if source == 'heldout'
             else f'source={source},target={target}')
  arg = f'{domains},seed={seed},steps={steps},'
  arg += ('method=source_only,self_training=true' if method == 'self_training'
          else f'method={method}')
  config = load_config(config_name, f'{arg},{extra}' if extra else arg)
  config.train.eval_every = steps
  results = harness.train_and_evaluate(config, os.path.join(out, name))
  record = dict(run=name, pair=pair, method=method, seed=seed, steps=steps,
                target=results['test']['target_accuracy'],
                source=results['test']['source_accuracy'])
  print(json.dumps(record), flush=True)
  with open(os.path.join(out, 'runs.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')
  done[name] = record
  return record


def _methods(pair, methods):
  """Leave-one-domain-out pairs train ERM only."""
  return ['source_only'] if pair.startswith('heldout:') else methods


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='runs/adaptation_table')
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--pairs', default='mnist:usps,usps:mnist')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--seeds', default='1,2,3')
  parser.add_argument('--config', default='adapt_digits')
  parser.add_argument('--extra', default='',
                      help='more config arguments, e.g. features=true')
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  os.makedirs(args.out, exist_ok=True)
  done = {}
  path = os.path.join(args.out, 'runs.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        done[record['run']] = record
  pairs, methods = args.pairs.split(','), args.methods.split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  for seed in seeds:  # seed-major: a stopped table has whole seeds
    for pair in pairs:
      for method in _methods(pair, methods):
        _run(args.out, args.config, args.extra, pair, method, seed,
             args.steps, done)
  for pair in pairs:
    for method in _methods(pair, methods):
      runs = [done[f'{pair.replace(":", "2")}/{method}-s{s}'] for s in seeds]
      target = [100 * r['target'] for r in runs]
      print(json.dumps(dict(
          pair=pair, method=method, steps=args.steps, seeds=seeds,
          target=mean_confidence_interval(target) if len(seeds) > 1
          else (target[0], 0.0),
          source=sum(100 * r['source'] for r in runs) / len(runs))),
            flush=True)


if __name__ == '__main__':
  main()
