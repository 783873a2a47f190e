"""Supervised ResNet-12 pretraining on the 120 Tiny-ImageNet meta-train classes.

The "good embedding" of Tian et al. (2020): cross-entropy on all 60,000
meta-train images, then nearest-centroid few-shot evaluation of the frozen
features on the 40 meta-val (and at the end meta-test) classes.

  FEWSHOT_MANUAL_DIR=../shared/data python experiments/train.py \
      --config configs/pretrain_resnet12_tiny_imagenet.py \
      --workdir runs/pretrain_resnet12_tiny_imagenet

`experiments/train.py` runs it because the config's objective is
'supervised'. Then `fewshot.workdir.load_backbone(<workdir>)` returns the
backbone, and any config whose backbone section reads
`dict(name='resnet12', widths=..., weights=<workdir>)` starts from it.

The default is sized for a 2-core CPU, not for accuracy: 32x32 images
(`ClassDataset` resized once and cached), widths (16, 40, 80, 160)
(`width=16`: 0.78M parameters instead of 12.4M), 8 epochs of batch 64
(7,496 steps). Measured on the 2-core VM (step time of a few steps, not a
full run): 0.23 s per step (280 images/s) when otherwise idle, so about 29
minutes of training plus an estimated 2-3 minutes of evaluation (8
validations of 100 episodes, 600 test episodes); 0.63 s per step (101
images/s) while other jobs loaded the machine (load average ~6), i.e. about
80 minutes. Idle, the same step ran 120 images/s at `width=32`
(`width=32,epochs=4`: ~33 minutes) and 33 images/s at `width=64`, the
paper's widths (8 epochs: ~4 hours).
Paper-like settings for an accelerator:

  python experiments/train.py \
      --config configs/pretrain_resnet12_tiny_imagenet.py:width=64,image_size=64,epochs=90 \
      --workdir runs/pretrain_resnet12_full

Config argument: width (first block; the others are 2.5x, 5x, 10x),
image_size, epochs, batch_size, shots (of the evaluation episodes), head
('linear' or 'cosine' for Baseline++).
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, parse_arg,
                                 train_section)

META_TRAIN_IMAGES = 120 * 500


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, width=16, image_size=32, epochs=8, batch_size=64,
                   shots=5, head='linear')
  steps_per_epoch = META_TRAIN_IMAGES // args.batch_size
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section('tiny_imagenet', image_size=args.image_size)
  width = args.width
  config.backbone = dict(name='resnet12',
                         widths=(width, width * 5 // 2, width * 5, width * 10),
                         norm='batch_running')
  # The few-shot learner that evaluates the frozen features.
  config.algorithm = dict(name='protonet', distance='cosine')
  config.objective = dict(
      name='supervised', batch_size=args.batch_size, head=args.head,
      init_scale=10.0,
      augment=dict(crop_padding=args.image_size // 8, pad_mode='constant',
                   flip=True))
  config.optimizer = dict(name='sgd', learning_rate=0.05, weight_decay=5e-4,
                          schedule='cosine', warmup_steps=100)
  config.train = train_section(num_steps=args.epochs * steps_per_epoch,
                               log_every=50, eval_every=steps_per_epoch,
                               checkpoint_every_steps=500,
                               checkpoint_every_secs=300, max_checkpoints=2)
  config.eval = eval_section(shots=args.shots, val_episodes=100,
                             images_per_chunk=1000)
  return config
