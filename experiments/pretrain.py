"""Alias of experiments/train.py, kept for old commands: pretraining is an objective.

  python experiments/pretrain.py --config configs/pretrain_resnet12_tiny_imagenet.py \
      --workdir runs/pretrain_resnet12

is `python experiments/train.py` with the same flags: the config's
`objective = dict(name='supervised', ...)` makes it pretraining.
"""

from absl import app
from absl import flags

import train  # experiments/train.py, beside this file

if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(train.main)
