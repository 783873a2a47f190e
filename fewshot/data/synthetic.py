"""A small generated class-structured image dataset for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from fewshot.data.dataset import ClassDataset


def synthetic_splits(*, num_classes: tuple[int, int, int] = (20, 10, 10),
                     images_per_class: int = 20, image_size: int = 28,
                     channels: int = 1, noise: float = 60.0,
                     seed: int = 0) -> dict[str, ClassDataset]:
  """Train/val/test splits of random class templates plus pixel noise.

  Each class is a random smooth template; its images are the template plus
  Gaussian noise of standard deviation `noise` (in 0..255 units), so a model
  can learn to tell classes apart. Splits have disjoint classes.
  """
  rng = np.random.default_rng(seed)
  splits = {}
  for split, count in zip(('train', 'val', 'test'), num_classes):
    coarse = rng.uniform(0, 255, (count, 7, 7, channels))
    reps = -(-image_size // 7)
    templates = np.kron(coarse, np.ones((1, reps, reps, 1)))
    templates = templates[:, :image_size, :image_size]
    images = templates[:, None] + rng.normal(
        0, noise, (count, images_per_class, image_size, image_size, channels))
    splits[split] = ClassDataset(
        images=np.clip(images, 0, 255).astype(np.uint8).reshape(
            count * images_per_class, image_size, image_size, channels),
        labels=np.repeat(np.arange(count), images_per_class),
        class_names=tuple(f'{split}{i:03d}' for i in range(count)))
  return splits
