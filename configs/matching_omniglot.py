"""Matching networks, Conv-4, Omniglot background -> evaluation alphabets, 28x28.

  python experiments/train.py --config configs/matching_omniglot.py:ways=5,shots=1 \
      --workdir runs/matching_5w1s
  python experiments/evaluate.py --config configs/matching_omniglot.py:ways=5,shots=1 \
      --workdir runs/matching_5w1s --config.eval.num_episodes=1000

The config argument is a comma-separated list of `key=value` overrides:
  ways, shots      the evaluation task; training uses the same shots;
  train_ways       training ways (default: the evaluation ways, as Vinyals
                   et al. 2016 trained each setting on its own);
  queries          training queries per class (default 5);
  steps, decay_every  Adam at 1e-3, halved every decay_every steps
                   (default 10,000 / 2,500);
  shift            random translation of training images, edge-padded
                   (default 2, as the ProtoNet config).
  fce              full-context embeddings (default false): a bidirectional
                   LSTM over the support set and an attention LSTM for the
                   queries, as in the paper's appendix.
Attention is over cosine similarities with a learned temperature
(fewshot.algorithms.matching).
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, parse_arg,
                                 train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, ways=5, shots=1, train_ways=int, queries=5,
                   steps=10000, decay_every=2500, shift=2, fce=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section('omniglot', image_size=28, rotations=True)
  config.backbone = dict(name='conv4', filters=64, norm='batch_running')
  config.algorithm = dict(name='matching_net', init_scale=10.0,
                          learn_scale=True, fce=args.fce)
  config.optimizer = dict(name='adam', learning_rate=1e-3, schedule='step',
                          decay_every=args.decay_every, decay_factor=0.5)
  config.objective = dict(
      name='episodic', ways=args.train_ways or args.ways, shots=args.shots,
      queries=args.queries, meta_batch_size=1,
      augment=dict(crop_padding=args.shift, pad_mode='edge'))
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=1000, checkpoint_every_steps=1000,
                               checkpoint_every_secs=300, max_checkpoints=3)
  config.eval = eval_section(ways=args.ways, shots=args.shots)
  return config
