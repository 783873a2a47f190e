"""Parsing of the string argument of `configs/*.py:get_config(arg)`."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`'ways=20,shots=5'` -> ConfigDict over `defaults`, typed like them.

  Raises:
    ValueError: a key that is not in `defaults`, or a malformed item.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'Config argument {item!r} is not of the form key=value.')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; known: '
                       f'{sorted(defaults)}.')
    kind = type(defaults[key])
    if kind is bool:
      values[key] = value.lower() in ('1', 'true', 'yes')
    else:
      values[key] = kind(value)
  return ml_collections.ConfigDict(values)
