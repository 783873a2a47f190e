"""ProtoNet, Conv-4, Omniglot background -> evaluation alphabets, 28x28.

Train (resumes by itself when re-run on the same workdir), then evaluate:

  python experiments/train.py --config configs/protonet_omniglot.py:ways=5,shots=1 \
      --workdir runs/protonet_omniglot
  python experiments/evaluate.py --config configs/protonet_omniglot.py:ways=5,shots=1 \
      --workdir runs/protonet_omniglot --config.eval.num_episodes=1000

The config argument is a comma-separated list of `key=value` overrides:
  ways, shots      the evaluation task (training uses the same shots);
  train_ways       training ways (default 60, as in Snell et al. 2017);
  steps            training steps (default 10,000);
  decay_every      steps between learning-rate halvings (default 2,500);
  shift            random translation of every training image by up to this
                   many pixels, edge-padded (default 2; 0: no augmentation).
Measured (WORKSPACE.md has the commands and wall times): trained with the
defaults (60-way 1-shot episodes, shift=2) for 10,000 steps (about 46 minutes
alone on a 2-core CPU), on 1,000 test episodes: 5-way 1-shot 98.56 +- 0.19,
20-way 1-shot 95.61 +- 0.16, 5-way 5-shot 99.60 +- 0.07, 20-way 5-shot
98.76 +- 0.06. Without augmentation (shift=0): 98.25 / 94.70 / 99.51 / 98.59.
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, parse_arg,
                                 train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, ways=5, shots=1, train_ways=60, steps=10000,
                   decay_every=2500, shift=2)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data_section('omniglot', image_size=28, rotations=True)
  config.backbone = dict(name='conv4', filters=64, norm='batch_running')
  config.algorithm = dict(name='protonet', distance='sqeuclidean')
  config.optimizer = dict(name='adam', learning_rate=1e-3, schedule='step',
                          decay_every=args.decay_every, decay_factor=0.5)
  config.objective = dict(
      name='episodic',
      ways=args.train_ways,
      shots=args.shots,
      queries=5,
      meta_batch_size=1,
      augment=dict(crop_padding=args.shift, pad_mode='edge'),
  )
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=1000, checkpoint_every_steps=1000,
                               checkpoint_every_secs=300, max_checkpoints=3)
  config.eval = eval_section(ways=args.ways, shots=args.shots)
  return config
