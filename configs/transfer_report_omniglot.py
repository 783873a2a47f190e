"""Cross-domain transfer: ImageNet EfficientNet-Lite0 on Omniglot, vs from scratch.

The negative-transfer report (`fewshot.reports.negative_transfer_report`):
on the 659 evaluation characters of Omniglot (28x28 grayscale strokes, far
from ImageNet's photographs), at 1, 2, 5 and 10 labelled images per class,

  * pretrained: EfficientNet-Lite0 with ImageNet weights (images resized to
    `input_size` and repeated to RGB on the device), frozen, and a logistic
    linear probe on its L2-normalised features (embedded once);
  * scratch: a Conv-4 trained from random weights on each episode's support
    images alone (`fine_tune` of every layer, Adam),

on the same seeded 5-way 10-query episodes, with the paired gap and its 95%
CI per size; plus the MMD between the backbone's features of Tiny-ImageNet
images (standing in for ImageNet) and of Omniglot images, next to the MMD of
two halves of Tiny-ImageNet.

  FEWSHOT_MANUAL_DIR=../shared/data python experiments/transfer_report.py \
      --config configs/transfer_report_omniglot.py

Config argument: episodes, input_size, scratch_steps. Measured result in
WORKSPACE.md.
"""

import ml_collections

from fewshot.config_args import data_section, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, episodes=200, input_size=84, scratch_steps=50,
                   mmd_images=500)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.target = data_section('omniglot', split='test', image_size=28)
  config.source = data_section('tiny_imagenet', split='test', image_size=64,
                               mmd_images=args.mmd_images)
  config.pretrained = dict(
      label='EfficientNet-Lite0 (ImageNet) + linear probe',
      backbone=dict(name='efficientnet_lite0', weights='imagenet',
                    input_size=args.input_size, input_channels=3),
      algorithm=dict(name='linear_probe', solver='logistic', steps=100,
                     learning_rate=0.1, l2=1e-3, normalize=True),
      precompute_features=True, feature_batch_size=250)
  config.scratch = dict(
      label='Conv-4 trained from scratch on the support set',
      backbone=dict(name='conv4', filters=64, norm='none'),
      algorithm=dict(name='fine_tune', steps=args.scratch_steps,
                     optimizer='adam', learning_rate=1e-3,
                     head_learning_rate=1e-2, head_init='prototypes'),
      precompute_features=False)
  config.sizes = (1, 2, 5, 10)
  config.eval = dict(ways=5, queries=10, num_episodes=args.episodes,
                     images_per_chunk=1024, seed=2017)
  return config
