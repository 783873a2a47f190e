"""Omniglot character + alphabet + rotation heads on one Conv-4, scored few-shot.

All 964 background characters (30 alphabets) are split by image (16 / 2 / 2
of each character's 20 drawings for train / val / test); the heads classify
the character (964-way), its alphabet (30-way) and, on a second stream of
the same images turned by a random multiple of 90 degrees, the rotation
(4-way). The shared encoder is scored by ProtoNet on 5-way and 20-way
1-shot episodes of the 20 evaluation alphabets:

  python experiments/train.py --config configs/multitask_omniglot.py --workdir runs/mt_omniglot
  # the character-only encoder, trained for the same number of steps:
  python experiments/train.py --config configs/multitask_omniglot.py:tasks=character --workdir runs/mt_omniglot_character

Arguments: tasks ('+'-separated subset of character, alphabet, rotation),
method (a weighting of `fewshot.multitask.WEIGHTINGS`), gradients (the
task gradients of Gram-reading methods: parameters, features,
features_summed; `method=mgda,gradients=features` is MGDA-UB), steps,
batch_size (per stream), lr, seed, episodes (few-shot test episodes per
way count).
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, parse_arg,
                                 train_section)

TASKS = ('character', 'alphabet', 'rotation')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, tasks='+'.join(TASKS), method='equal',
                   gradients='parameters', steps=3000,
                   batch_size=128, lr=1e-3, seed=0, episodes=1000)
  tasks = tuple(filter(None, args.tasks.split('+')))
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or not tasks:
    raise ValueError(f'tasks must be a +-separated subset of {TASKS}, got '
                     f'{args.tasks!r}.')
  omniglot = data_section('omniglot', image_size=28, rotations=False)
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  config.data = dict(name='class_images', dataset=omniglot,
                     splits=('train', 'val'), fractions=(0.8, 0.1, 0.1))
  config.backbone = dict(name='conv4', filters=64, norm='batch_running')
  config.algorithm = dict(name='protonet', distance='sqeuclidean')
  streams = {}
  if {'character', 'alphabet'} & set(tasks):
    streams['images'] = dict(batch_size=args.batch_size)
  if 'rotation' in tasks:
    streams['turned'] = dict(batch_size=args.batch_size, rotate=True)
  heads = dict(character=dict(stream='images', labels='class'),
               alphabet=dict(stream='images', labels='group'),
               rotation=dict(stream='turned', labels='rotation'))
  config.objective = dict(name='multitask', streams=streams,
                          tasks={t: heads[t] for t in tasks},
                          weighting=dict(name=args.method),
                          gradients=args.gradients)
  config.optimizer = dict(name='adam', learning_rate=args.lr,
                          schedule='cosine', warmup_steps=0)
  config.train = train_section(num_steps=args.steps, log_every=100,
                               eval_every=max(args.steps // 3, 1),
                               checkpoint_every_steps=1000,
                               checkpoint_every_secs=600, max_checkpoints=2)
  config.eval = eval_section(
      batch_size=1000, fewshot_data=omniglot, fewshot_ways=(5, 20),
      fewshot_shots=1, fewshot_queries=15, fewshot_episodes=args.episodes)
  return config
