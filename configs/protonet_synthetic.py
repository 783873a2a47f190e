"""ProtoNet, small Conv-4, generated data: a one-minute end-to-end check.

Needs no dataset; used by the tests and to try the pipeline:

  python experiments/train.py --config configs/protonet_synthetic.py --workdir runs/smoke
  python experiments/evaluate.py --config configs/protonet_synthetic.py --workdir runs/smoke
"""

import ml_collections

from fewshot.config_args import eval_section, parse_arg, train_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, ways=5, shots=1, steps=50)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name='synthetic', num_classes=(30, 10, 10),
                     images_per_class=20, image_size=28, noise=90.0)
  config.backbone = dict(name='conv4', filters=16, norm='batch_running')
  config.algorithm = dict(name='protonet', distance='sqeuclidean')
  config.objective = dict(name='episodic', ways=10, shots=args.shots,
                          queries=5, meta_batch_size=1)
  config.optimizer = dict(name='adam', learning_rate=1e-3, schedule='constant')
  config.train = train_section(num_steps=args.steps, log_every=10,
                               eval_every=25, checkpoint_every_steps=25,
                               checkpoint_every_secs=300, max_checkpoints=2)
  config.eval = eval_section(ways=args.ways, shots=args.shots, queries=5,
                             num_episodes=100, val_episodes=50)
  return config
