"""Metric learning, small Conv-4, generated data: a one-minute end-to-end check.

Needs no dataset; used by the tests:

  python experiments/train.py --config configs/metric_synthetic.py:loss=arcface --workdir runs/metric_smoke
  python experiments/evaluate.py --config configs/metric_synthetic.py:loss=arcface \
      --workdir runs/metric_smoke --protocol retrieval

Arguments as configs/metric_omniglot.py (loss, miner, classes, per_class,
embedding_dim, projection, steps).
"""

import ml_collections

from fewshot.config_args import (eval_section, metric_objective, parse_arg,
                                 train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, loss='triplet', miner=str, classes=8, per_class=4,
                   embedding_dim=16, projection='linear', steps=30)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name='synthetic', num_classes=(30, 10, 10),
                     images_per_class=20, image_size=28, noise=90.0)
  config.backbone = dict(name='conv4', filters=16, norm='batch_running')
  config.algorithm = dict(name='protonet', distance='cosine')  # evaluation
  config.objective = metric_objective(
      args.loss, args.miner, classes_per_batch=args.classes,
      images_per_class=args.per_class, projection=args.projection,
      embedding_dim=None if args.projection == 'none' else args.embedding_dim,
      augment=dict(crop_padding=2, pad_mode='edge'))
  config.optimizer = dict(name='adam', learning_rate=1e-3, schedule='constant')
  config.train = train_section(num_steps=args.steps, log_every=10,
                               eval_every=15, checkpoint_every_steps=15,
                               checkpoint_every_secs=300, max_checkpoints=2)
  config.eval = eval_section(queries=5, num_episodes=100, val_episodes=50,
                             retrieval_distance='cosine')
  return config
