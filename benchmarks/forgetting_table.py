"""EfficientNet-Lite0 (ImageNet) -> PACS sketch: accuracy, parameters, forgetting.

For each number of labelled sketches per class, every adaptation method
fine-tunes the ImageNet backbone on them (`fine_tune`, full-batch Adam) and
reports the sketch accuracy on PACS's held-out sketches (the committed
validation split, disjoint from the labelled ones), the trainable
parameters, and the ImageNet accuracy of the pretrained 1000-way classifier
(kept fixed) on Tiny-ImageNet images before and after (its 200 classes are
ImageNet classes, mapped by WordNet id). One JSON line per row; a plot of
the trade-off with `--plot`.

  FEWSHOT_MANUAL_DIR=../shared/data python benchmarks/forgetting_table.py --shots 1 5 20 --out runs/forgetting

Methods: probe (the head alone), full, lora_r4 and lora_r8 (the 1x1
expansion, projection and head convolutions), bitfit (BatchNorm biases;
the convolutions have none), adapters (bottlenecks of 32 after blocks 3,
7, 11 and 15).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import pathlib
import time
import zipfile

import numpy as np
from PIL import Image

from fewshot import backbones
from fewshot import peft
from fewshot.backbones import pretrained_weights
from fewshot.data.dataset import ClassDataset
from fewshot.data.domains import load_domain
from fewshot.evaluators.forgetting import forgetting_report, rows_as_dicts
from fewshot.ops import tune_cpu

LORA_TARGETS = ('blocks_[0-9]+/(expand|project)_conv', 'head_conv')
ADAPTER_PATHS = ('blocks_3', 'blocks_7', 'blocks_11', 'blocks_15')


def tiny_imagenet_source(manual_dir: pathlib.Path, per_class: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`per_class` seeded training images of each Tiny-ImageNet class, with
  their ImageNet class indices."""
  wnids = [line.split('\t')[0] for line in (pathlib.Path(
      pretrained_weights.__file__).with_name('imagenet_classes.txt')
                                            .read_text().splitlines()) if line]
  index = {w: i for i, w in enumerate(wnids)}
  archive = manual_dir / 'tiny-imagenet' / 'tiny-imagenet-200-train.zip'
  rng = np.random.default_rng(seed)
  images, labels = [], []
  with zipfile.ZipFile(archive) as zf:
    by_class = {}
    for name in zf.namelist():
      parts = name.split('/')
      if len(parts) == 5 and parts[4].endswith('.JPEG'):
        by_class.setdefault(parts[2], []).append(name)
    for wnid in sorted(by_class):
      for name in rng.choice(sorted(by_class[wnid]), per_class, replace=False):
        image = Image.open(io.BytesIO(zf.read(name))).convert('RGB')
        images.append(np.asarray(image))
        labels.append(index[wnid])
  return np.stack(images), np.array(labels)


def labelled_subset(train: ClassDataset, shots: int, seed: int
                    ) -> ClassDataset:
  rng = np.random.default_rng(seed)
  rows = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), shots,
                                    replace=False)
                         for c in range(train.num_classes)])
  return ClassDataset(train.images[rows], train.labels[rows],
                      train.class_names)


def methods():
  def lora(rank):
    return functools.partial(peft.peft_backbone,
                             rules=peft.lora_rules(LORA_TARGETS, rank))
  return {
      'probe': None,
      'full': lambda backbone: backbone,
      'lora_r4': lora(4),
      'lora_r8': lora(8),
      'bitfit': functools.partial(peft.peft_backbone,
                                  rules=peft.bitfit_rules()),
      'adapters': functools.partial(peft.peft_backbone, adapters=ADAPTER_PATHS,
                                    adapter_size=32),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shots', type=int, nargs='+', default=[1, 5, 20])
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--source_per_class', type=int, default=5)
  parser.add_argument('--input_size', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', type=pathlib.Path, default=None)
  parser.add_argument('--plot', action='store_true')
  args = parser.parse_args()
  tune_cpu()
  manual_dir = pathlib.Path(os.environ.get('FEWSHOT_MANUAL_DIR',
                                           '../shared/data'))
  source_images, source_labels = tiny_imagenet_source(
      manual_dir, args.source_per_class, args.seed)
  sketch = load_domain('pacs', domain='sketch', manual_dir=manual_dir)
  backbone = backbones.create('efficientnet_lite0', 'imagenet',
                              input_size=args.input_size)
  classifier = pretrained_weights.load_variables('efficientnet_lite0')[
      'params']['classifier']
  rows = []
  for shots in args.shots:
    start = time.time()
    report = forgetting_report(
        backbone, classifier, source_images, source_labels,
        labelled_subset(sketch['train'], shots, args.seed), sketch['val'],
        methods(), steps=args.steps, seed=args.seed)
    for row in rows_as_dicts(report):
      row.update(shots=shots, steps=args.steps,
                 source_images=len(source_labels),
                 test_images=len(sketch['val'].labels),
                 seconds=round(time.time() - start, 1))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'rows.jsonl').write_text(
        ''.join(json.dumps(r) + '\n' for r in rows))
    if args.plot:
      import matplotlib  # pylint: disable=g-import-not-at-top
      matplotlib.use('Agg')
      from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
      figure, axis = plt.subplots(figsize=(6, 4))
      for shots in args.shots:
        chosen = [r for r in rows if r['shots'] == shots]
        axis.scatter([100 * r['forgetting'] for r in chosen],
                     [100 * r['target_accuracy'] for r in chosen],
                     label=f'{shots} per class')
        for r in chosen:
          axis.annotate(r['method'], (100 * r['forgetting'],
                                      100 * r['target_accuracy']), fontsize=7)
      axis.set_xlabel('ImageNet accuracy lost (points)')
      axis.set_ylabel('PACS sketch accuracy (%)')
      axis.legend()
      figure.tight_layout()
      figure.savefig(args.out / 'tradeoff.png', dpi=120)


if __name__ == '__main__':
  main()
