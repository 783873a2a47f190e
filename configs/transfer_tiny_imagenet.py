"""A pretrained backbone evaluated on Tiny-ImageNet's 40 meta-test classes.

Nothing is meta-trained: `experiments/evaluate.py` without `--workdir` builds
the backbone from `backbone.weights` and runs the few-shot algorithm on each
test episode (600 seeded episodes, the same as every other Tiny-ImageNet
evaluation with these ways/shots/queries). Frozen-feature algorithms
(linear probe, SimpleShot, ProtoNet) embed the split once
(`eval.precompute_features`); `fine_tune` trains the backbone per episode.

EfficientNet-Lite0 with ImageNet weights (in-domain transfer: ImageNet
contains these 200 classes and their training images), 64x64 images resized
to `input_size` on the device:

  python experiments/evaluate.py \
      --config configs/transfer_tiny_imagenet.py:backbone=efficientnet_lite0,shots=5

ResNet-12 pretrained on the 120 meta-train classes
(`configs/pretrain_resnet12_tiny_imagenet.py`):

  python experiments/evaluate.py \
      --config configs/transfer_tiny_imagenet.py:backbone=resnet12,weights=runs/pretrain_resnet12_tiny_imagenet,image_size=32,shots=5

Per-episode fine-tuning with gradual unfreezing (head alone, then the last
stages, then everything):

  python experiments/evaluate.py \
      --config configs/transfer_tiny_imagenet.py:backbone=efficientnet_lite0,algorithm=fine_tune,shots=5,episodes=100

Config argument: backbone, weights ('imagenet' by default for
EfficientNet-Lite0, else a pretrain workdir), algorithm (linear_probe,
simpleshot, protonet, fine_tune), ways, shots, episodes, image_size (of the
stored dataset), input_size (fed to the backbone; default 128 for
EfficientNet-Lite0, else image_size).
Measured results are in WORKSPACE.md.
"""

import ml_collections

from fewshot.config_args import data_section, eval_section, parse_arg

# Layer groups of gradual unfreezing and layer-wise rates, input to output.
# Paths are relative to the backbone's parameters; a pattern matches a whole
# path component prefix (`fewshot.transfer.path_mask`).
_LAYERS = {
    # Stem, the seven MBConv stages (16 blocks), the 1x1 head conv.
    'efficientnet_lite0': ['stem_(conv|bn)', 'blocks_0', 'blocks_(1|2)',
                           'blocks_(3|4)', 'blocks_(5|6|7)', 'blocks_(8|9|10)',
                           'blocks_(11|12|13|14)', 'blocks_15|head_(conv|bn)'],
    'resnet12': ['layer1', 'layer2', 'layer3', 'layer4'],
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, backbone='efficientnet_lite0', weights=str,
                   algorithm='linear_probe', ways=5, shots=5, episodes=600,
                   image_size=64, input_size=int, steps=30)
  weights = args.weights
  if weights is None:
    if args.backbone != 'efficientnet_lite0':
      raise ValueError(f'backbone={args.backbone} needs weights=<pretrain '
                       'workdir>.')
    weights = 'imagenet'
  input_size = args.input_size
  if input_size is None and args.backbone == 'efficientnet_lite0':
    input_size = 128
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section('tiny_imagenet', image_size=args.image_size)
  config.backbone = dict(name=args.backbone, weights=weights)
  if input_size and input_size != args.image_size:
    config.backbone.input_size = input_size
  if args.algorithm == 'linear_probe':
    # Logistic regression on L2-normalised features (Tian et al. 2020).
    config.algorithm = dict(name='linear_probe', solver='logistic', steps=100,
                            learning_rate=0.1, l2=1e-3, normalize=True)
  elif args.algorithm == 'simpleshot':
    config.algorithm = dict(name='simpleshot', centering='support')
  elif args.algorithm == 'protonet':
    config.algorithm = dict(name='protonet', distance='sqeuclidean')
  elif args.algorithm == 'fine_tune':
    layers = _LAYERS.get(args.backbone)
    if layers is None:
      raise ValueError(f'No layer groups for backbone={args.backbone}.')
    third = max(1, args.steps // 3)
    config.algorithm = dict(
        name='fine_tune', steps=args.steps, optimizer='adam',
        learning_rate=1e-4, head_learning_rate=1e-2, layers=layers,
        layer_decay=0.5,
        # Head first, then the top two layer groups, then everything.
        unfreeze=[(0, ['head']),
                  (third, ['head'] + [f'backbone/({p})' for p in layers[-2:]]),
                  (2 * third, ['.*'])])
  else:
    raise ValueError(f'Unknown algorithm {args.algorithm!r}.')
  config.eval = eval_section(
      ways=args.ways, shots=args.shots, num_episodes=args.episodes,
      images_per_chunk=1024,
      precompute_features=args.algorithm != 'fine_tune',
      feature_batch_size=250)
  return config
