"""Issue 14's comparison table: ProtoNet against metric losses, one budget.

  FEWSHOT_MANUAL_DIR=../shared/data FEWSHOT_DATA_DIR=~/fewshot_data \
      python benchmarks/metric_table.py --dataset tiny_features --steps 20000 \
      --loss_rates arcface=100 --out runs/metric_table_tiny

Trains every row with the same budget, seed and validation protocol, then
scores each trained embedding on the same retrieval split (every test image
against all the others: MAP@R, R-precision, precision@1, recall@K, NMI of
k-means) and the same seeded test episodes (nearest centroid), one JSON line
per row and a Markdown table at the end. Workdirs go under `--out`; a
stopped table resumes each run where it stopped, and finished runs are only
evaluated.

Datasets:
  tiny_features  Tiny-ImageNet's 120/40/40 class split as frozen
                 EfficientNet-Lite0 ImageNet features (128x128 input, every
                 split embedded once and cached under $FEWSHOT_DATA_DIR);
                 the trained network is a linear 1280 -> 128 map for every
                 row. In-domain: ImageNet holds these classes.
  omniglot       background -> evaluation alphabets at 28x28, Conv-4 from
                 scratch (the recipe of WORKSPACE's Omniglot table).
Rows: frozen (tiny_features only: the features themselves, untrained),
protonet (32-way 1-shot 3-query episodes: 128 inputs a step, as the P=32 x
K=4 batches of the metric rows), triplet (semi-hard), multi_similarity,
supcon, proxy_anchor, arcface; `--rows` picks some. `--loss_rates` sets the
learning-rate multiplier of a loss's own parameters (proxies, class weights),
the one setting chosen on validation classes (`loss=rate,...`).
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fewshot.ops import tune_cpu  # pylint: disable=g-import-not-at-top

tune_cpu()

from absl import logging  # pylint: disable=g-import-not-at-top

from config_files import load_config  # benchmarks/ (sys.path)
from fewshot import builder, harness  # pylint: disable=g-import-not-at-top
from fewshot.evaluators import workdir as evaluation  # pylint: disable=g-import-not-at-top

ROWS = ('frozen', 'protonet', 'triplet', 'multi_similarity', 'supcon',
        'proxy_anchor', 'arcface')
DATASETS = {
    # name: (protonet config, its argument; metric config, its argument)
    'tiny_features': (
        'protonet_tiny_imagenet',
        'features=efficientnet_lite0,train_ways=32,train_shots=1,queries=3,'
        'embedding_dim=128',
        'metric_tiny_imagenet', 'features=efficientnet_lite0'),
    'omniglot': (
        'protonet_omniglot', 'train_ways=32',
        'metric_omniglot', ''),
}


def _arg(*parts):
  return ','.join(p for p in parts if p)


def row_config(dataset, row, steps, seed, loss_rate, shots=1, ways=5):
  """The config of one row, trained with `steps` and evaluated at
  `ways`-way `shots`-shot."""
  protonet, protonet_arg, metric, metric_arg = DATASETS[dataset]
  common = f'steps={steps},ways={ways},shots={shots}'
  if dataset == 'tiny_features':
    common += f',seed={seed}'  # the Omniglot configs take no seed argument
  if row == 'frozen':
    if dataset != 'tiny_features':
      raise ValueError("The 'frozen' row is the features themselves "
                       '(tiny_features only).')
    config = load_config(metric, _arg(metric_arg, 'projection=none', common))
  elif row == 'protonet':
    config = load_config(protonet, _arg(protonet_arg, common))
    if dataset == 'omniglot':
      with config.unlocked():
        config.objective.queries = 3
        config.objective.shots = 1
  else:
    rate = f'loss_rate={loss_rate}' if loss_rate != 1.0 else ''
    config = load_config(metric, _arg(metric_arg, f'loss={row}', common, rate))
  with config.unlocked():
    config.seed = seed
    config.eval.test_at_end = False
    config.eval.retrieval_nmi = True
  return config


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dataset', choices=sorted(DATASETS),
                      default='tiny_features')
  parser.add_argument('--out', default='runs/metric_table')
  parser.add_argument('--steps', type=int, default=20000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--rows', default=','.join(ROWS))
  parser.add_argument('--loss_rates', default='',
                      help='e.g. arcface=100,proxy_anchor=10')
  parser.add_argument('--episodes', type=int, default=1000)
  parser.add_argument('--shots', default='1,5')
  parser.add_argument('--ways', type=int, default=5)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  rates = {k: float(v) for k, v in (
      item.split('=') for item in args.loss_rates.split(',') if item)}
  rows = [r for r in args.rows.split(',') if r]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    raise SystemExit(f'Unknown rows {unknown}; known: {ROWS}.')
  shots = [int(s) for s in args.shots.split(',')]
  table = []
  for row in rows:
    workdir = os.path.join(os.path.abspath(args.out), row)
    rate = rates.get(row, 1.0)
    config = row_config(args.dataset, row, args.steps, args.seed, rate)
    if row == 'frozen':
      workdir = None  # nothing to train: the frozen features themselves
    else:
      harness.train_and_evaluate(config, workdir)  # resumes; done is done
    result = dict(row=row, dataset=args.dataset, steps=args.steps,
                  seed=args.seed, loss_rate=rate)
    retrieval = evaluation.evaluate_workdir(
        builder.build(config, pretrained=False), workdir,
        protocol='retrieval')
    result.update({k: retrieval[k] for k in (
        'map_at_r', 'r_precision', 'precision_at_1', 'recall_at_k', 'nmi',
        'images', 'classes', 'embedding_dim')})
    for shot in shots:
      config = row_config(args.dataset, row, args.steps, args.seed, rate,
                          shots=shot, ways=args.ways)
      with config.unlocked():
        config.eval.num_episodes = args.episodes
      episodes = evaluation.evaluate_workdir(
          builder.build(config, pretrained=False), workdir)
      result[f'{args.ways}w{shot}s'] = episodes['accuracy']
      result[f'{args.ways}w{shot}s_ci95'] = episodes['ci95']
      result['episodes'] = episodes['episodes']
    print(json.dumps(result), flush=True)
    table.append(result)
  pct = lambda x: f'{100 * x:.2f}'
  header = ['row', 'MAP@R', 'R-precision', 'P@1', 'NMI'] + [
      f'{args.ways}-way {s}-shot' for s in shots]
  print('| ' + ' | '.join(header) + ' |')
  print('|' + ' --- |' * len(header))
  for r in table:
    cells = [r['row'], pct(r['map_at_r']), pct(r['r_precision']),
             pct(r['precision_at_1']), pct(r['nmi'])] + [
                 f"{pct(r[f'{args.ways}w{s}s'])} +- "
                 f"{pct(r[f'{args.ways}w{s}s_ci95'])}" for s in shots]
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
