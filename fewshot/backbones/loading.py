"""`load(name, weights)`: a backbone module with random or pretrained variables.

Weights come from one of three places:

* `None`: a fresh random initialisation (needs the image shape);
* a path: a workdir written by `experiments/pretrain.py` or
  `experiments/train.py` (its `config.json` names the backbone, its latest
  orbax checkpoint under `checkpoints/` holds the variables);
* another string such as `'imagenet'`: converted weights from
  `fewshot.backbones.pretrained_weights.load_pretrained(name, source)`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewshot.backbones.base import Backbone, ModelState, Params, from_flax


class Loaded(NamedTuple):
  """A backbone module and its variables; unpacks as `module, variables`.

  `module.apply(variables, images [B,H,W,C]) -> features [B, D]` (there is
  never a classification head). `variables` is `{'params': ...}` plus the
  module's state collections (`'batch_stats'` for running BatchNorm).
  """
  module: nn.Module
  variables: dict[str, Any]

  @property
  def params(self) -> Params:
    return self.variables['params']

  @property
  def model_state(self) -> ModelState:
    """The non-trainable collections, as `Backbone.apply` takes them."""
    return {k: v for k, v in self.variables.items() if k != 'params'}

  @property
  def backbone(self) -> Backbone:
    """A `Backbone` whose `init` returns these variables (the key is unused).

    Algorithms built on it (`protonet(loaded.backbone)`) start from the
    loaded weights, which is how `create(name, weights=...)` fine-tunes.
    """
    return pretrained_backbone(self.module, self.params, self.model_state)


def pretrained_backbone(module: nn.Module, params: Params,
                        model_state: ModelState) -> Backbone:
  """`from_flax(module)` with an `init` that returns the given variables."""
  wrapped = from_flax(module)

  def init(key: jax.Array, images: jax.Array) -> tuple[Params, ModelState]:
    del key, images  # The variables are given; their shapes fit any image size.
    return params, model_state

  return wrapped._replace(init=init)


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (module attributes such as `widths`)."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _build_module(name: str, options: Mapping[str, Any]) -> nn.Module:
  from fewshot.backbones import create  # pylint: disable=g-import-not-at-top
  return create(name, **options).module


def _shapes(tree: Any, prefix: str = '') -> dict[str, tuple[int, ...]]:
  """`{'params/layer1/conv1/kernel': shape, ...}` of a nested dict of arrays."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_shapes(value, path + '/'))
    else:
      out[path] = tuple(np.shape(value))
  return out


def _describe(name: str, options: Mapping[str, Any]) -> str:
  listed = ', '.join(f'{k}={v!r}' for k, v in sorted(options.items()))
  return f'{name}({listed})'


def _resolve_workdir(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.basename(path) == 'checkpoints':
    path = os.path.dirname(path)
  for needed in ('config.json', 'checkpoints'):
    if not os.path.exists(os.path.join(path, needed)):
      raise FileNotFoundError(
          f'{path} is not a workdir of experiments/pretrain.py or '
          f'experiments/train.py: it has no {needed}.')
  return path


def _read_checkpoint(directory: str) -> tuple[int, Any, Any]:
  """`(step, params['backbone'], model_state)` of the latest checkpoint.

  Only these two subtrees are read (not the optimizer state).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {directory}.')
    tree = manager.item_metadata(step)['state'].tree
    if 'backbone' not in tree.get('params', {}):
      raise ValueError(f'The checkpoint in {directory} has no backbone '
                       "parameters (no state['params']['backbone']).")
    as_target = lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype)
    wanted = {'params': {'backbone': tree['params']['backbone']},
              'model_state': tree.get('model_state', {})}
    wanted = jax.tree.map(as_target, wanted)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            wanted, restore_args=jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
            partial_restore=True))).state
  finally:
    manager.close()
  return step, restored['params']['backbone'], restored['model_state']


def _load_workdir(name: str, path: str, options: Mapping[str, Any],
                  sample_images: jax.Array | None) -> Loaded:
  workdir = _resolve_workdir(path)
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = dict(_tuples(json.load(f)['backbone']))
  stored_name = stored.pop('name')
  stored.pop('weights', None)  # where that run started from; not architecture
  if stored_name != name:
    raise ValueError(
        f'{workdir} holds a {_describe(stored_name, stored)} backbone, not '
        f'the {_describe(name, options)} asked for.')
  merged = {**stored, **_tuples(dict(options))}
  module = _build_module(name, merged)
  step, params, model_state = _read_checkpoint(
      os.path.join(workdir, 'checkpoints'))
  if sample_images is None:
    # The variables of these backbones depend on the input channels only:
    # take them from the first kernel, so no sample image is needed.
    sample_images = jax.ShapeDtypeStruct((1, 32, 32, _input_channels(params)),
                                         jnp.float32)
  abstract = dict(jax.eval_shape(module.init, jax.random.key(0),
                                 sample_images))
  wanted = _shapes(abstract)
  have = _shapes({'params': params, **model_state})
  missing = sorted(set(wanted) - set(have))
  unexpected = sorted(k for k in set(have) - set(wanted)
                      if k.startswith('params/'))
  # Parameters first: their shapes name the architecture most directly.
  differ = sorted((k for k in set(wanted) & set(have) if wanted[k] != have[k]),
                  key=lambda k: (not k.startswith('params/'), k))
  if missing or unexpected or differ:
    detail = (f'missing {missing[:3]}' if missing else
              f'unexpected {unexpected[:3]}' if unexpected else
              f'{differ[0]} has shape {have[differ[0]]} in the checkpoint but '
              f'{wanted[differ[0]]} in the model')
    raise ValueError(
        f'The checkpoint (step {step}) in {workdir} was written for another '
        f'architecture: it holds {_describe(stored_name, stored)}, but '
        f'{_describe(name, merged)} was asked for ({detail}).')
  variables = {'params': params}
  variables.update({k: model_state[k] for k in abstract if k != 'params'})
  return Loaded(module, jax.tree.map(jnp.asarray, variables))


def _input_channels(params: Any) -> int:
  """Input channels of the first convolution (the first 4-D kernel)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    del path
    if np.ndim(leaf) == 4:
      return int(np.shape(leaf)[2])
  return 3


def _is_path(weights: str | os.PathLike) -> bool:
  text = os.fspath(weights)
  return (os.path.exists(text) or os.sep in text or text.startswith('.') or
          text.startswith('~'))


def load(name: str, weights: str | os.PathLike | None = None, *,
         image_shape: Sequence[int] | None = None,
         sample_images: jax.typing.ArrayLike | None = None, seed: int = 0,
         **options: Any) -> Loaded:
  """The named backbone (a key of `BACKBONES`) and its variables.

  Args:
    name: backbone name, e.g. 'resnet12'.
    weights: None (random init with `jax.random.key(seed)`), the path of a
      workdir of `experiments/pretrain.py` / `experiments/train.py` (its
      latest checkpoint), or a named source such as 'imagenet'.
    image_shape: `(H, W, C)` of the inputs; needed for a random init unless
      `sample_images` is given (a checkpoint needs neither for backbones
      whose variables depend only on the input channels).
    sample_images: `[B, H, W, C]` example inputs, instead of `image_shape`.
    seed: init seed when `weights` is None.
    **options: module attributes (`widths`, `norm`, ...). For a checkpoint,
      they default to the stored ones and must describe the same parameter
      shapes; the `norm` mode may change.

  Returns:
    `Loaded(module, variables)`: `module.apply(variables, images)` gives
    `features [B, D]`; `.backbone` is a ready `Backbone` that starts from
    these variables; `.params` and `.model_state` split the variables.

  Raises:
    ValueError: an unknown backbone or option, or a checkpoint of another
      architecture (the message names both).
    FileNotFoundError: `weights` looks like a path but is not a workdir.
  """
  if sample_images is None and image_shape is not None:
    sample_images = jnp.zeros((1, *image_shape), jnp.float32)
  if weights is None:
    if sample_images is None:
      raise ValueError('A random init needs image_shape=(H, W, C) or '
                       'sample_images=[B, H, W, C].')
    module = _build_module(name, _tuples(dict(options)))
    # Jitted: eager init compiles every random draw separately (slow on CPU).
    variables = jax.jit(module.init)(jax.random.key(seed),
                                     jnp.asarray(sample_images))
    return Loaded(module, dict(variables))
  if _is_path(weights):
    return _load_workdir(name, os.fspath(weights), options,
                         None if sample_images is None else
                         jnp.asarray(sample_images))
  try:
    from fewshot.backbones import pretrained_weights  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        f'weights={weights!r} is not a path, and named pretrained weights '
        f'need fewshot.backbones.pretrained_weights, which failed to import: '
        f'{e}') from e
  result = pretrained_weights.load_pretrained(name, weights, **options)
  module, variables = result
  return Loaded(module, dict(variables))
