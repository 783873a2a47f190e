"""ProtoNet, Conv-4, Tiny-ImageNet-200 (committed 120/40/40 class split), 64x64.

  python experiments/train.py --config configs/protonet_tiny_imagenet.py:shots=5 \
      --workdir runs/protonet_tiny_imagenet_5shot
  python experiments/evaluate.py --config configs/protonet_tiny_imagenet.py:ways=5,shots=5 \
      --workdir runs/protonet_tiny_imagenet_5shot

The classes are ImageNet classes: report results of ImageNet-pretrained
backbones on them as in-domain transfer. Config argument: ways, shots (the
evaluation task; training uses the same shots unless train_shots is given),
train_ways, queries, steps, image_size, seed; features=efficientnet_lite0
trains on its frozen ImageNet features instead (every split embedded once,
as configs/metric_tiny_imagenet.py; weights, input_size as there), with an
MLP of `hidden` (default 0: none) and `embedding_dim` (128) units as the
trained network. Measured on a 2-core CPU (WORKSPACE.md): `shots=5,steps=2500,image_size=32`
(32 minutes) gives 5-way 1-shot 43.90 +- 0.79 and 5-way 5-shot 61.64 +- 0.77
on 600 test episodes.
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, features_section,
                                 parse_arg, train_section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, ways=5, shots=5, train_ways=20, train_shots=int,
                   queries=15, steps=20000, image_size=64, features=str,
                   weights=str, input_size=int, embedding_dim=128, hidden=0,
                   seed=0)
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  if args.features:
    # Frozen features, embedded once; the trained network is an MLP on them.
    config.data = data_section('tiny_imagenet', image_size=args.image_size,
                               features=features_section(
                                   args.features, args.weights,
                                   args.input_size))
    widths = (args.hidden,) if args.hidden else ()
    config.backbone = dict(name='mlp', widths=(*widths, args.embedding_dim))
  else:
    config.data = data_section('tiny_imagenet', image_size=args.image_size)
    config.backbone = dict(name='conv4', filters=64, norm='batch_running')
  config.algorithm = dict(name='protonet', distance='sqeuclidean')
  config.optimizer = dict(name='adam', learning_rate=1e-3, schedule='cosine',
                          warmup_steps=200)
  config.objective = dict(name='episodic', ways=args.train_ways,
                          shots=args.train_shots or args.shots,
                          queries=args.queries, meta_batch_size=1)
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=1000, checkpoint_every_steps=1000,
                               checkpoint_every_secs=300, max_checkpoints=3)
  config.eval = eval_section(ways=args.ways, shots=args.shots,
                             val_episodes=200)
  return config
