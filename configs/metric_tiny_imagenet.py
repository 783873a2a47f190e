"""Metric learning on Tiny-ImageNet-200 (committed 120/40/40 class split).

  python experiments/train.py --config configs/metric_tiny_imagenet.py:loss=multi_similarity \
      --workdir runs/metric_tiny_ms
  python experiments/evaluate.py --config configs/metric_tiny_imagenet.py:loss=multi_similarity,shots=5 \
      --workdir runs/metric_tiny_ms --config.eval.num_episodes=1000
  python experiments/evaluate.py --config configs/metric_tiny_imagenet.py:loss=multi_similarity \
      --workdir runs/metric_tiny_ms --protocol retrieval
  python experiments/train.py \
      --config configs/metric_tiny_imagenet.py:loss=supcon,backbone=efficientnet_lite0,weights=imagenet \
      --workdir runs/metric_tiny_effnet_supcon
  python experiments/train.py \
      --config configs/metric_tiny_imagenet.py:loss=supcon,features=efficientnet_lite0 \
      --workdir runs/metric_tiny_features_supcon

The config argument is a comma-separated list of `key=value` overrides:
  loss, miner      as configs/metric_omniglot.py (recipes in
                   fewshot.config_args.METRIC_RECIPES);
  backbone         resnet12 (from scratch, default), conv4 or efficientnet_lite0;
  weights          where the backbone starts: a pretrain workdir, or imagenet
                   (efficientnet_lite0);
  input_size       what the backbone is fed (resized on the device; default
                   128 for efficientnet_lite0, else image_size);
  image_size       images are resized to this (default 32, as the ResNet-12
                   pretraining config; with features, 64: the originals);
  features         train on a frozen backbone's features instead of images:
                   efficientnet_lite0 (ImageNet weights at input_size 128),
                   or any backbone name with weights=<workdir>. Every split
                   is embedded once (cached under $FEWSHOT_DATA_DIR); the
                   trained network is the projection alone, no augmentation;
  classes, per_class, embedding_dim, projection, steps, lr, loss_rate, seed
                   as configs/metric_omniglot.py (defaults 32 x 4, 128,
                   linear, 10,000 steps, 1e-3, 1, 0);
  ways, shots      the evaluation episodes (default 5-way 1-shot).
Training images are randomly cropped (4 pixels of padding) and flipped.
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, features_section,
                                 metric_objective, parse_arg, train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, loss='multi_similarity', miner=str,
                   backbone='resnet12', weights=str, image_size=int,
                   input_size=int, features=str,
                   classes=32, per_class=4, embedding_dim=128,
                   projection='linear', steps=10000, lr=1e-3, loss_rate=1.0,
                   seed=0, ways=5, shots=1)
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  if args.features:
    # Frozen features, embedded once; the trained network is the projection.
    config.data = data_section('tiny_imagenet',
                               image_size=args.image_size or 64,
                               features=features_section(
                                   args.features, args.weights,
                                   args.input_size))
    config.backbone = dict(name='mlp', widths=())
    augment = None
  else:
    config.data = data_section('tiny_imagenet',
                               image_size=args.image_size or 32)
    config.backbone = dict(name=args.backbone, norm='batch_running')
    if args.weights:
      config.backbone.weights = args.weights
    input_size = args.input_size or (
        128 if args.backbone == 'efficientnet_lite0' else None)
    if input_size:
      config.backbone.input_size = input_size
    augment = dict(crop_padding=4, pad_mode='constant', flip=True)
  config.algorithm = dict(name='protonet', distance='cosine')  # evaluation
  config.objective = metric_objective(
      args.loss, args.miner, classes_per_batch=args.classes,
      images_per_class=args.per_class, projection=args.projection,
      embedding_dim=None if args.projection == 'none' else args.embedding_dim,
      augment=augment)
  config.optimizer = dict(name='adam', learning_rate=args.lr,
                          schedule='cosine', warmup_steps=200)
  if args.loss_rate != 1.0:
    config.optimizer.rate_multipliers = dict(loss=args.loss_rate)
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=1000, checkpoint_every_steps=1000,
                               checkpoint_every_secs=300, max_checkpoints=3)
  config.eval = eval_section(ways=args.ways, shots=args.shots,
                             val_episodes=200, retrieval_distance='cosine')
  return config
