"""Metric learning, Conv-4, Omniglot background -> evaluation alphabets, 28x28.

Train, then evaluate episodically and by retrieval over all 13,180
evaluation images:

  python experiments/train.py --config configs/metric_omniglot.py:loss=arcface \
      --workdir runs/metric_arcface
  python experiments/evaluate.py --config configs/metric_omniglot.py:loss=arcface \
      --workdir runs/metric_arcface --config.eval.num_episodes=1000
  python experiments/evaluate.py --config configs/metric_omniglot.py:loss=arcface \
      --workdir runs/metric_arcface --protocol retrieval

The config argument is a comma-separated list of `key=value` overrides:
  loss             a loss of fewshot.metric.LOSSES (default triplet), with the
                   recipe of fewshot.config_args.METRIC_RECIPES;
  miner            a miner of fewshot.metric.MINERS, or none (default: the
                   recipe's; triplet mines semi-hard triplets);
  classes, per_class  P classes x K images per batch (default 32 x 4);
  embedding_dim    the linear projection's size (default 128);
  projection       none, linear or mlp (default linear);
  steps, decay_every, lr   the optimizer (default 10,000 / 2,500 / 1e-3);
  loss_rate        learning-rate multiplier of the loss's proxies or class
                   weights (default 1);
  shift            random translation of every training image by up to this
                   many pixels, edge-padded (default 2, as ProtoNet's config);
  ways, shots      the evaluation episodes (default 5-way 1-shot).
Training classes are the 964 background characters x 4 rotations, as for
ProtoNet; episodes are classified by the nearest centroid in cosine.
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, metric_objective,
                                 parse_arg, train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, loss='triplet', miner=str, classes=32, per_class=4,
                   embedding_dim=128, projection='linear', steps=10000,
                   decay_every=2500, lr=1e-3, loss_rate=1.0, shift=2, ways=5,
                   shots=1)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section('omniglot', image_size=28, rotations=True)
  config.backbone = dict(name='conv4', filters=64, norm='batch_running')
  config.algorithm = dict(name='protonet', distance='cosine')  # evaluation
  config.objective = metric_objective(
      args.loss, args.miner, classes_per_batch=args.classes,
      images_per_class=args.per_class, projection=args.projection,
      embedding_dim=None if args.projection == 'none' else args.embedding_dim,
      augment=dict(crop_padding=args.shift, pad_mode='edge'))
  config.optimizer = dict(name='adam', learning_rate=args.lr, schedule='step',
                          decay_every=args.decay_every, decay_factor=0.5)
  if args.loss_rate != 1.0:  # proxies / class weights train this much faster
    config.optimizer.rate_multipliers = dict(loss=args.loss_rate)
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=1000, checkpoint_every_steps=1000,
                               checkpoint_every_secs=300, max_checkpoints=3)
  config.eval = eval_section(ways=args.ways, shots=args.shots,
                             retrieval_distance='cosine')
  return config
