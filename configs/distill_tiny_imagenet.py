"""Knowledge distillation on the 120 Tiny-ImageNet meta-train classes (RFS).

The teacher is a supervised pretraining workdir (its backbone and head,
e.g. `configs/pretrain_resnet12_tiny_imagenet.py`); the student, trained
with Hinton et al.'s loss against it on the same images, is scored by a
linear probe on 5-way 1- and 5-shot episodes of the meta-test classes:

  # generation 0: the teacher
  python experiments/train.py --config configs/pretrain_resnet12_tiny_imagenet.py --workdir runs/ti_teacher
  # born-again ResNet-12 (generation 1), then generation 2 from it
  python experiments/train.py --config configs/distill_tiny_imagenet.py:teacher=runs/ti_teacher --workdir runs/ti_born1
  python experiments/train.py --config configs/distill_tiny_imagenet.py:teacher=runs/ti_born1 --workdir runs/ti_born2
  # a Conv-4 student of the ResNet-12 teacher, with a FitNets hint
  python experiments/train.py --config configs/distill_tiny_imagenet.py:teacher=runs/ti_teacher,student=conv4,hint=true --workdir runs/ti_conv4_kd
  # the Conv-4 trained alone (alpha=0: labels only; the teacher is not used)
  python experiments/train.py --config configs/distill_tiny_imagenet.py:teacher=runs/ti_teacher,student=conv4,alpha=0 --workdir runs/ti_conv4_alone

Arguments: teacher (workdir, required), student (resnet12: the teacher's
architecture, or conv4), width (the ResNet-12 student's first width),
temperature, alpha (RFS: 0.5), hint (FitNets between the last blocks),
image_size (the teacher's), epochs, batch_size, shots.
"""

import ml_collections

from fewshot.config_args import (data_section, eval_section, parse_arg,
                                 train_section)

META_TRAIN_IMAGES = 120 * 500


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, teacher='', student='resnet12', width=16,
                   temperature=4.0, alpha=0.5, hint=False, image_size=32,
                   epochs=8, batch_size=64, shots=5)
  steps_per_epoch = META_TRAIN_IMAGES // args.batch_size
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section('tiny_imagenet', image_size=args.image_size)
  width = args.width
  if args.student == 'resnet12':
    config.backbone = dict(name='resnet12', widths=(width, width * 5 // 2,
                                                    width * 5, width * 10),
                           norm='batch_running')
    student_hint = 'layer4'
  elif args.student == 'conv4':
    config.backbone = dict(name='conv4', filters=64, norm='batch_running')
    student_hint = 'conv3'
  else:
    raise ValueError(f"student must be 'resnet12' or 'conv4', got "
                     f'{args.student!r}.')
  config.algorithm = dict(name='linear_probe')  # RFS's evaluation
  config.objective = dict(
      name='distillation', teacher=args.teacher or 'runs/ti_teacher',
      batch_size=args.batch_size, temperature=args.temperature,
      alpha=args.alpha,
      augment=dict(crop_padding=args.image_size // 8, pad_mode='constant',
                   flip=True))
  if args.hint:
    config.objective.hint = dict(student=student_hint, teacher='layer4',
                                 weight=1.0)
  config.optimizer = dict(name='sgd', learning_rate=0.05, weight_decay=5e-4,
                          schedule='cosine', warmup_steps=100)
  config.train = train_section(num_steps=args.epochs * steps_per_epoch,
                               log_every=50, eval_every=steps_per_epoch,
                               checkpoint_every_steps=500,
                               checkpoint_every_secs=300, max_checkpoints=2)
  config.eval = eval_section(shots=args.shots, val_episodes=100,
                             images_per_chunk=1000)
  return config
