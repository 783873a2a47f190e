"""A data section's `features`: every split as a frozen backbone's features.

The builder's part of "frozen features as data" (`fewshot.builder.load_splits`
and the adaptation builder's domains call it): the backbone section is built
like any other, each split is embedded once in evaluation mode
(`fewshot.features.embed_dataset`) and the result is cached beside the
decoded data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewshot import data as data_lib
from fewshot import features as features_lib
from fewshot import workdir as workdir_lib
from fewshot.backbones.loading import is_path
from fewshot.builder import build_backbone
from fewshot.data.cache import keyed_cache_path, load_cached, save_cached


def embedded_splits(section: dict[str, Any],
                    splits: dict[str, data_lib.ClassDataset],
                    data_options: dict[str, Any]
                    ) -> dict[str, data_lib.ClassDataset]:
  """Each split as a frozen backbone's evaluation-mode features `[M, D]`.

  `section` is a backbone section (`name`, `weights`: 'imagenet' or a
  workdir, `input_size`, ...) plus `batch_size` (images per forward pass,
  default 256). Features are cached beside the decoded data
  (`$FEWSHOT_DATA_DIR/fewshot_cache/features`; nothing is cached without a
  data dir), keyed by the data options, the backbone section, the split,
  a hash of its images and labels and, for a workdir, its newest
  checkpoint (`checkpoint_fingerprint`).
  """
  section = dict(section)
  batch_size = section.pop('batch_size', 256)
  weights = section.get('weights')
  if not weights or 'name' not in section:
    raise ValueError(
        'data.features is the frozen backbone that embeds the images: it '
        "needs a name and pretrained weights ('imagenet' or a workdir), got "
        f'{section}.')
  # Taken before the weights are read, so a checkpoint written meanwhile
  # makes the key stale rather than the features.
  checkpoint = (workdir_lib.checkpoint_fingerprint(weights)
                if is_path(weights) else None)
  backbone = build_backbone(ml_collections.ConfigDict(section))
  if getattr(backbone.module, 'norm', None) == 'batch':  # as built or stored
    raise ValueError("data.features needs per-image features, but the "
                     "backbone's norm='batch' normalises each batch with its "
                     'own statistics.')
  sample = jnp.asarray(next(iter(splits.values())).images[:2])
  params, state = backbone.init(jax.random.key(0), sample)
  key_data = {k: v for k, v in data_options.items()
              if k not in ('data_dir', 'manual_dir') and v is not None}
  embedded = {}
  for name, split in splits.items():
    # The split's own content is in the key too: a folder whose files
    # changed, or a relative path read from another directory, is new data.
    content = hashlib.sha1(np.ascontiguousarray(split.images).tobytes())
    content.update(np.ascontiguousarray(split.labels).tobytes())
    key = json.loads(json.dumps(dict(format=1, data=key_data,
                                     backbone=section, checkpoint=checkpoint,
                                     split=name,
                                     content=content.hexdigest()),
                                sort_keys=True, default=str))
    path = keyed_cache_path(data_options.get('data_dir'), 'features', key,
                            f'{data_options["name"]}-{name}')
    cached = load_cached(path, key) if path else None
    if cached is None:
      logging.info('Embedding the %d %s images with %s (%s)...',
                   len(split.images), name, section['name'], weights)
      cached = features_lib.embed_dataset(
          backbone, params, state, split, batch_size=batch_size,
          what=f'embedding {name}')
      if path:
        save_cached(path, cached, key)
    embedded[name] = cached
  return embedded


__all__ = ['embedded_splits']
