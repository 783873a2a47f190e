"""Supervised pretraining of a tiny ResNet-12 on generated data: a smoke test.

Needs no dataset; used by the tests:

  python experiments/train.py --config configs/pretrain_synthetic.py --workdir runs/pretrain_smoke

A backbone config section `dict(name='resnet12', weights='runs/pretrain_smoke')`
(its other options default to the stored ones) starts another config from
it; `fewshot.workdir.load_backbone('runs/pretrain_smoke')` returns it.
"""

import ml_collections

from fewshot.config_args import eval_section, parse_arg, train_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, steps=20, head='linear')
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name='synthetic', num_classes=(10, 5, 5),
                     images_per_class=8, image_size=16, channels=3,
                     noise=60.0)
  config.backbone = dict(name='resnet12', widths=(4, 8, 8, 16),
                         norm='batch_running')
  config.algorithm = dict(name='protonet', distance='cosine')  # evaluation
  config.objective = dict(
      name='supervised', batch_size=16, head=args.head, init_scale=10.0,
      augment=dict(crop_padding=2, pad_mode='constant', flip=True))
  config.optimizer = dict(name='sgd', learning_rate=0.05, weight_decay=5e-4,
                          schedule='cosine', warmup_steps=0)
  config.train = train_section(num_steps=args.steps, log_every=5, eval_every=10,
                               checkpoint_every_steps=10,
                               checkpoint_every_secs=300, max_checkpoints=2)
  config.eval = eval_section(queries=3, val_episodes=10, num_episodes=20,
                             images_per_chunk=512)
  return config
