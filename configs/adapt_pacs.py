"""PACS with ImageNet EfficientNet-Lite0: single-source adaptation and
leave-one-domain-out generalisation. NOTE: this copy of PACS is 128x128
(downscaled from 227x227), so figures are not the paper's resolution.

Reads `$FEWSHOT_MANUAL_DIR/pacs/pacs_128.zip`; train/val are the committed
90/10 split of each domain, the target test split is the whole domain:

  python experiments/train.py --config configs/adapt_pacs.py:source=photo,target=sketch,method=mcc --workdir runs/p2s_mcc
  python experiments/train.py --config configs/adapt_pacs.py:source=photo,target=art_painting,method=dann --workdir runs/p2a_dann
  # leave-one-domain-out: ERM on the three other domains, tested on sketch
  python experiments/train.py --config configs/adapt_pacs.py:heldout=sketch,seed=1 --workdir runs/lodo_sketch_s1

The final JSON line's `test` holds `target_accuracy` and `source_accuracy`.
Arguments: source, target (art_painting, cartoon, photo, sketch), heldout
(a domain: the source becomes the other three and the method source_only),
method (as `configs/adapt_digits.py`), self_training, seed, steps,
batch_size (per domain), lr (the new layers'; the backbone gets 0.1x),
image_size (of the backbone's input; the images stay 128x128), features
(true: the backbone stays frozen, every domain is embedded once and only
the bottleneck, head and discriminator train; self-training is then plain
pseudo-labelling, with no image to augment):

  python experiments/train.py --config configs/adapt_pacs.py:source=photo,target=sketch,method=dann,features=true \
      --workdir runs/p2s_dann_features
"""

import ml_collections

from fewshot.config_args import (eval_section, features_section, parse_arg,
                                 train_section)

DOMAINS = ('art_painting', 'cartoon', 'photo', 'sketch')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, source='photo', target='sketch', heldout='',
                   method='source_only', self_training=False, seed=1,
                   steps=1000, batch_size=32, lr=0.01, image_size=128,
                   features=False)
  source, method = args.source, args.method
  target = args.target
  if args.heldout:
    if args.heldout not in DOMAINS:
      raise ValueError(f'heldout must be one of {DOMAINS}, got '
                       f'{args.heldout!r}.')
    target = args.heldout
    source = '+'.join(d for d in DOMAINS if d != args.heldout)
    method = 'source_only'
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  config.source = dict(name='pacs', domain=source)
  config.target = dict(name='pacs', domain=target)
  backbone = dict(name='efficientnet_lite0', weights='imagenet',
                  norm='batch_running', input_size=args.image_size)
  if args.features:
    # The backbone stays frozen: each domain is embedded once, and the
    # bottleneck, head (and discriminator) train on the features.
    features = features_section(backbone['name'], 'imagenet',
                                args.image_size)
    config.source.features = config.target.features = features
    backbone = dict(name='mlp', widths=())
  config.backbone = backbone
  config.algorithm = dict(name='protonet')  # few-shot scoring of the encoder
  objective = dict(name='adaptation', method=method,
                   batch_size=args.batch_size, trade_off=1.0,
                   bottleneck_dim=256)
  if not args.features:
    objective['augment'] = dict(crop_padding=16, pad_mode='reflect',
                                flip=True)
  if args.self_training:
    objective['pseudo_labels'] = dict(threshold=0.9, weight=1.0)
    if not args.features:
      objective['strong'] = dict(flip=True)
  config.objective = objective
  config.optimizer = dict(name='sgd', learning_rate=args.lr,
                          schedule='cosine', weight_decay=5e-4)
  if not args.features:
    config.optimizer.rate_multipliers = {'backbone': 0.1}
  config.train = train_section(num_steps=args.steps, log_every=50,
                               eval_every=max(args.steps // 4, 1),
                               checkpoint_every_steps=250,
                               checkpoint_every_secs=600, max_checkpoints=2)
  config.eval = eval_section(batch_size=256)
  return config
