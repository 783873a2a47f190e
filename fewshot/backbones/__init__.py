"""Flax backbones behind one functional interface (`Backbone`)."""

from __future__ import annotations

from typing import Any

from fewshot.backbones.base import Backbone, from_flax
from fewshot.backbones.conv4 import Conv4

# name -> flax module class; `create(name, **config.backbone)`.
BACKBONES = {
    'conv4': Conv4,
}


def create(name: str, **kwargs: Any) -> Backbone:
  """Builds the named backbone; kwargs are the module's attributes."""
  if name not in BACKBONES:
    raise ValueError(f'Unknown backbone {name!r}; known: {sorted(BACKBONES)}.')
  module_class = BACKBONES[name]
  fields = {f for f in module_class.__dataclass_fields__
            if f not in ('parent', 'name')}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} for backbone {name!r}; '
                     f'it accepts {sorted(fields)}.')
  return from_flax(module_class(**kwargs))


__all__ = ['BACKBONES', 'Backbone', 'Conv4', 'create', 'from_flax']
