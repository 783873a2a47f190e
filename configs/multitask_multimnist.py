"""Two-task MultiMNIST / Multi-Fashion-MNIST / Multi-(Fashion+MNIST) on one Conv-4.

The left and right item of each 36x36 canvas are two 10-way classification
heads on one shared encoder (`fewshot.data.multimnist`). Reads MNIST from
`$FEWSHOT_MANUAL_DIR/mnist` and Fashion-MNIST from its Debian package (or
`--config.data.fashion_dir`):

  python experiments/train.py --config configs/multitask_multimnist.py:dataset=mnist,method=pcgrad --workdir runs/mm_pcgrad
  # single-task baselines (the same config restricted to one task):
  python experiments/train.py --config configs/multitask_multimnist.py:tasks=left --workdir runs/mm_left
  python experiments/train.py --config configs/multitask_multimnist.py:tasks=right --workdir runs/mm_right
  # Delta-p of a multi-task run against them (its final JSON line):
  python experiments/train.py --config configs/multitask_multimnist.py:method=pcgrad,baselines=runs/mm_left+runs/mm_right --workdir runs/mm_pcgrad

Arguments: dataset (mnist, fashion, mixed), method (a weighting of
`fewshot.multitask.WEIGHTINGS`), gradients (the task gradients of
Gram-reading methods: parameters, features, features_summed;
`method=mgda,gradients=features` is MGDA-UB), tasks ('left+right',
'left', 'right'), seed, steps, batch_size, lr, filters (the Conv-4
width), baselines ('+'-separated single-task workdirs), train_images
(fewer training source images, for a quick run).
"""

import ml_collections

from fewshot.config_args import eval_section, parse_arg, train_section

TASKS = ('left', 'right')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, dataset='mnist', method='equal',
                   gradients='parameters', tasks='left+right',
                   seed=1, steps=2000, batch_size=256, lr=1e-3, filters=32,
                   baselines='', train_images=0)
  tasks = tuple(filter(None, args.tasks.split('+')))
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or not tasks:
    raise ValueError(f'tasks must be a +-separated subset of {TASKS}, got '
                     f'{args.tasks!r}.')
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  config.data = dict(name='multimnist', variant=args.dataset, seed=0,
                     max_train_images=args.train_images or None)
  config.backbone = dict(name='conv4', filters=args.filters,
                         norm='batch_running')
  config.algorithm = dict(name='protonet')  # few-shot scoring of the encoder
  config.objective = dict(
      name='multitask',
      streams=dict(images=dict(batch_size=args.batch_size)),
      tasks={task: dict(stream='images') for task in tasks},
      weighting=dict(name=args.method),
      gradients=args.gradients)
  config.optimizer = dict(name='adam', learning_rate=args.lr,
                          schedule='cosine', warmup_steps=0)
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=max(args.steps // 4, 1),
                               checkpoint_every_steps=1000,
                               checkpoint_every_secs=600, max_checkpoints=2)
  config.eval = eval_section(
      batch_size=1000,
      baselines=tuple(filter(None, args.baselines.split('+'))))
  return config
