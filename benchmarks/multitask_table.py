"""The MultiMNIST table: single-task baselines and every weighting, 3 seeds.

  python benchmarks/multitask_table.py --out runs/multitask_table --steps 210

For each dataset (mnist, fashion, mixed) and seed, trains the single-task
baselines (`:tasks=left`, `:tasks=right`) and the two-task model under
each weighting method with the same budget (`configs/multitask_multimnist.py`),
then prints one JSON line per run and, per dataset and method, the mean
test accuracy of each task and Delta-p (against the same seed's baselines)
with its 95% CI over seeds, and the tasks that gain or lose. Finished runs
are kept in `<out>/runs.jsonl` and skipped when the script is run again.
A method `name@gradients` trains with `gradients=...` (for example
`mgda@features`, MGDA-UB, or `pcgrad@features_summed`).
"""

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # pylint: disable=g-import-not-at-top

from config_files import load_config  # benchmarks/ (sys.path)
from fewshot import harness
from fewshot.multitask import delta_p, task_gaps
from fewshot.stats import mean_confidence_interval

TASKS = ('left', 'right')
METHODS = ('equal', 'uncertainty', 'dwa', 'gradnorm', 'pcgrad', 'cagrad',
           'mgda')


def _run(out, dataset, seed, method, tasks, steps, period, done):
  name = f'{dataset}/{method if len(tasks) > 1 else tasks[0]}-s{seed}'
  if name in done:
    return done[name]
  weighting, _, gradients = method.partition('@')
  config = load_config('multitask_multimnist',
                       f'dataset={dataset},method={weighting},'
                       f'gradients={gradients or "parameters"},'
                       f'tasks={"+".join(tasks)},seed={seed},steps={steps}')
  config.train.eval_every = steps
  config.train.log_every = max(steps // 5, 1)
  if weighting in ('dwa', 'gradnorm'):
    config.objective.weighting.period = period
  results = harness.train_and_evaluate(config, os.path.join(out, name))
  record = dict(run=name, dataset=dataset, seed=seed, method=method,
                tasks=list(tasks), steps=steps,
                test={t: results['test'][f'{t}_accuracy'] for t in tasks})
  print(json.dumps(record), flush=True)
  with open(os.path.join(out, 'runs.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')
  done[name] = record
  return record


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='runs/multitask_table')
  parser.add_argument('--steps', type=int, default=210)
  parser.add_argument('--period', type=int, default=21,
                      help="DWA's and GradNorm's window in steps")
  parser.add_argument('--datasets', default='mnist,fashion,mixed')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--seeds', default='1,2,3')
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
  seeds = [int(s) for s in args.seeds.split(',')]
  methods = args.methods.split(',')
  for dataset in args.datasets.split(','):
    single = {t: [] for t in TASKS}
    for seed in seeds:
      for task in TASKS:
        single[task].append(_run(args.out, dataset, seed, 'equal', (task,),
                                 args.steps, args.period, done)['test'][task])
    print(json.dumps(dict(dataset=dataset, method='single_task', **{
        t: mean_confidence_interval(single[t]) for t in TASKS})), flush=True)
    for method in methods:
      multi = {t: [] for t in TASKS}
      deltas = []
      for i, seed in enumerate(seeds):
        record = _run(args.out, dataset, seed, method, TASKS, args.steps,
                      args.period, done)
        for t in TASKS:
          multi[t].append(record['test'][t])
        deltas.append(delta_p(
            {t: {'accuracy': record['test'][t]} for t in TASKS},
            {t: {'accuracy': single[t][i]} for t in TASKS},
            {t: {'accuracy': True} for t in TASKS}))
      gaps = task_gaps(multi, single, {t: True for t in TASKS})
      print(json.dumps(dict(
          dataset=dataset, method=method, steps=args.steps,
          **{t: mean_confidence_interval(multi[t]) for t in TASKS},
          delta_p=mean_confidence_interval(deltas),
          delta_p_seeds=deltas, gain=gaps['gain'], lose=gaps['lose'],
          gaps={t: (g['gap'], g['ci95']) for t, g in gaps['tasks'].items()})),
            flush=True)


if __name__ == '__main__':
  main()
