"""fewshot: few-shot, meta-learning and transfer learning in JAX.

`import fewshot` stays light: TFDS and orbax load only when the data loaders
or the harness are first used.
"""

from fewshot.algorithms import ALGORITHMS, Algorithm, protonet
from fewshot.backbones import Backbone
from fewshot.data import (ClassDataset, EpisodeSpec, sample_episode,
                          sample_meta_batch, to_device)
from fewshot.episodes import Episode
from fewshot.losses import (episode_loss, meta_batch_loss,
                            meta_batch_value_and_grad)
from fewshot.objectives import Objective
from fewshot.stats import mean_confidence_interval

__version__ = '0.1.0'


def __getattr__(name: str):
  if name == 'train_and_evaluate':
    from fewshot.harness import train_and_evaluate  # pylint: disable=g-import-not-at-top
    return train_and_evaluate
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'ALGORITHMS', 'Algorithm', 'Backbone', 'ClassDataset', 'Episode',
    'EpisodeSpec', 'episode_loss', 'mean_confidence_interval',
    'meta_batch_loss', 'meta_batch_value_and_grad', 'Objective', 'protonet',
    'sample_episode', 'sample_meta_batch',
    'to_device', 'train_and_evaluate',
]
