"""Relation networks, Omniglot background -> evaluation alphabets, 28x28.

  python experiments/train.py --config configs/relation_omniglot.py:ways=5,shots=1 \
      --workdir runs/relation_5w1s
  python experiments/evaluate.py --config configs/relation_omniglot.py:ways=5,shots=1 \
      --workdir runs/relation_5w1s --config.eval.num_episodes=1000

As Sung et al. 2018: four conv blocks of which the first two pool (7x7x64
feature maps), a relation module of two conv blocks and two dense layers,
the sigmoid score trained with a squared error against the one-hot label,
Adam at 1e-3, 19 queries per class at 5-way 1-shot (10 at 20-way).
The config argument is a comma-separated list of `key=value` overrides:
  ways, shots      the evaluation task; training uses the same;
  queries          training queries per class (default 19 at 5-way, else 10);
  loss             mse (the paper) or cross_entropy;
  steps, decay_every  (default 10,000 / 2,500; the paper trained 1,000,000
                   episodes, halving the rate every 100,000);
  shift            random translation of training images (default 2).
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, parse_arg,
                                 train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, ways=5, shots=1, queries=int, loss='mse',
                   steps=10000, decay_every=2500, shift=2)
  queries = args.queries or (19 if args.ways == 5 else 10)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section('omniglot', image_size=28, rotations=True)
  config.backbone = dict(name='conv4', filters=64, norm='batch_running',
                         pooled_blocks=2)
  config.algorithm = dict(name='relation_net', channels=64,
                          relation_filters=64, hidden=8, loss=args.loss)
  config.optimizer = dict(name='adam', learning_rate=1e-3, schedule='step',
                          decay_every=args.decay_every, decay_factor=0.5)
  config.objective = dict(
      name='episodic', ways=args.ways, shots=args.shots, queries=queries,
      meta_batch_size=1, augment=dict(crop_padding=args.shift,
                                      pad_mode='edge'))
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=1000, checkpoint_every_steps=1000,
                               checkpoint_every_secs=300, max_checkpoints=3)
  config.eval = eval_section(ways=args.ways, shots=args.shots)
  return config
