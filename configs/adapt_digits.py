"""Unsupervised domain adaptation between digit domains on a LeNet (28x28 grey).

MNIST -> USPS and USPS -> MNIST are the standard pairs (TLlib's digits
table). Reads `$FEWSHOT_MANUAL_DIR/mnist` and `/usps` (Fashion-MNIST from
its Debian package):

  python experiments/train.py --config configs/adapt_digits.py:source=mnist,target=usps,method=dann,seed=1 --workdir runs/m2u_dann
  python experiments/train.py --config configs/adapt_digits.py:method=source_only --workdir runs/m2u_source
  python experiments/train.py --config configs/adapt_digits.py:method=oracle --workdir runs/m2u_oracle

The final JSON line's `test` holds `target_accuracy` and `source_accuracy`.
Arguments: source, target (mnist, usps, fashion_mnist), method (source_only,
oracle, dann, cdan, cdan_e, mcc, mmd, coral, adabn), self_training (true:
add pseudo-labels to the method), trade_off (0: the method's default),
seed, steps, batch_size (per domain), lr.
"""

import ml_collections

from fewshot.config_args import eval_section, parse_arg, train_section

# The transfer loss's weight per method (TLlib's digits scripts use 1.0;
# MMD and CORAL losses are small, so they get more).
TRADE_OFFS = {'mmd': 1.0, 'coral': 10.0}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, source='mnist', target='usps', method='source_only',
                   self_training=False, trade_off=0.0, seed=1, steps=2000,
                   batch_size=64, lr=0.01)
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  config.source = dict(name=args.source)
  config.target = dict(name=args.target)
  config.backbone = dict(name='lenet', norm='batch_running')
  config.algorithm = dict(name='protonet')  # few-shot scoring of the encoder
  objective = dict(name='adaptation', method=args.method,
                   batch_size=args.batch_size,
                   trade_off=args.trade_off or TRADE_OFFS.get(args.method, 1.0),
                   augment=dict(crop_padding=2))
  if args.self_training:
    objective['pseudo_labels'] = dict(threshold=0.95, weight=1.0)
  config.objective = objective
  config.optimizer = dict(name='sgd', learning_rate=args.lr,
                          schedule='cosine', weight_decay=5e-4)
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=max(args.steps // 4, 1),
                               checkpoint_every_steps=1000,
                               checkpoint_every_secs=600, max_checkpoints=2)
  config.eval = eval_section(batch_size=1000)
  return config
