"""MAML, Conv-4 (32 filters), Tiny-ImageNet-200 (committed 120/40/40 class split).

The mini-ImageNet settings of Finn et al. 2017 on 64x64 Tiny-ImageNet: 5-way,
meta-batch 4, five inner steps of 0.01 (ten at evaluation), 15 queries per
class, 32 filters against overfitting, outer Adam 1e-3, transductive
BatchNorm. First order with `algorithm=fomaml`.

  python experiments/train.py --config configs/maml_tiny_imagenet.py:shots=1 \
      --workdir runs/maml_tiny_imagenet_1shot
  python experiments/evaluate.py --config configs/maml_tiny_imagenet.py:shots=1 \
      --workdir runs/maml_tiny_imagenet_1shot

Config argument: ways, shots, algorithm, steps, image_size, filters, remat.
Measured (WORKSPACE.md): a short first run, 312 meta-batches (20 minutes on
a 2-core CPU beside other jobs), 5-way 1-shot 37.39 +- 0.76 over 600 test
episodes; far from converged.
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, parse_arg,
                                 train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, ways=5, shots=1, algorithm='maml', steps=60000,
                   image_size=64, filters=32, remat=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section('tiny_imagenet', image_size=args.image_size)
  config.backbone = dict(name='conv4', filters=args.filters, norm='batch')
  config.algorithm = dict(name=args.algorithm, inner_steps=5,
                          inner_learning_rate=0.01, eval_inner_steps=10,
                          remat=args.remat)
  if args.algorithm != 'proto_maml':
    config.algorithm.num_ways = args.ways
  config.optimizer = dict(name='adam', learning_rate=1e-3, schedule='constant')
  config.objective = dict(name='episodic', ways=args.ways, shots=args.shots,
                          queries=15, meta_batch_size=4)
  config.train = train_section(num_steps=args.steps, log_every=50,
                               eval_every=1000, checkpoint_every_steps=1000,
                               checkpoint_every_secs=300, max_checkpoints=3)
  config.eval = eval_section(ways=args.ways, shots=args.shots,
                             val_episodes=200, images_per_chunk=1024)
  return config
