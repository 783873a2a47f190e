"""`DEFINE_config_file` of ml_collections, with override names checked first.

ml_collections' `--config.train.no_such_key=1` fails with a bare
`AttributeError: "'no_such_key'"` traceback. Here every `--config.<path>`
override is checked against the loaded config before ml_collections applies
it, and an unknown key is a flag error that names its section and lists the
keys that exist (absl prints it and exits with status 1, before any work):

  from fewshot import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, '...',
                                            lock_config=True)
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

from absl import flags
import ml_collections
from ml_collections.config_flags import config_flags as _ml_config_flags
from ml_collections.config_flags import config_path

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def unknown_override_error(config: Any, override: str,
                           flag_name: str = 'config') -> str | None:
  """Why `--<flag_name>.<override>` names no field of `config`, or None.

  Only ConfigDict sections are checked; a path that goes into a list, a
  tuple or a dataclass is left to ml_collections.
  """
  try:
    fields = config_path.split(override)
  except ValueError as e:
    return f'--{flag_name}.{override} is not a valid config path ({e}).'
  holder, where = config, []
  for field in fields:
    if not isinstance(holder, ml_collections.ConfigDict):
      return None
    if not isinstance(field, str) or field not in holder:
      nested = len(where) + 1 < len(fields)
      return _describe_missing(holder, where, str(field), nested, override,
                               flag_name)
    holder = holder[field]
    where.append(field)
    if len(where) < len(fields) and isinstance(holder, _SCALARS):
      return (f'Unknown config section --{flag_name}.{override}: '
              f'{".".join(where)} is {holder!r}, not a config section, so it '
              'has no keys to set.')
  return None


def _describe_missing(holder: ml_collections.ConfigDict, where: list[str],
                      field: str, nested: bool, override: str,
                      flag_name: str) -> str:
  """'Unknown config key ...: section S has no key K; its keys are ...'.

  `nested`: the override goes on below `field` (so `field` is a section).
  """
  keys = sorted(holder.keys())
  close = difflib.get_close_matches(field, keys, n=1)
  hint = f' Did you mean {close[0]!r}?' if close else ''
  kind = 'section' if nested else 'key'
  if where:
    section = '.'.join(where)
    return (f'Unknown config {kind} --{flag_name}.{override}: section '
            f'{section!r} has no {kind} {field!r}; its keys are: '
            f'{", ".join(keys)}.{hint}')
  sections = [k for k in keys
              if isinstance(holder[k], ml_collections.ConfigDict)]
  others = [k for k in keys if k not in sections]
  return (f'Unknown config {kind} --{flag_name}.{override}: the config has no '
          f'{kind} {field!r}; its sections are: {", ".join(sections)}'
          + (f' (and top-level keys: {", ".join(others)})' if others else '')
          + f'.{hint}')


def check_overrides(config: Any, overrides: Sequence[str],
                    flag_name: str = 'config') -> None:
  """Raises `flags.IllegalFlagValueError` for the first unknown override."""
  for override in overrides:
    error = unknown_override_error(config, override, flag_name)
    if error is not None:
      raise flags.IllegalFlagValueError(error)


# ml_collections has no public hook between loading the config and applying
# the overrides, hence the subclass (tests/config_flags_test.py pins it).
# pylint: disable-next=protected-access
class _CheckedConfigFlag(_ml_config_flags._ConfigFlag):
  """ml_collections' config flag; checks override names before using them."""

  def _initialize_missing_parent_fields(self, config, overrides):
    # The first step of `_ConfigFlag._parse` that walks the override paths.
    if not getattr(self, '_accept_new_attributes', False):
      check_overrides(config, overrides, self.name)
    super()._initialize_missing_parent_fields(config, overrides)


def DEFINE_config_file(  # pylint: disable=invalid-name
    name: str, default: str | None = None,
    help_string: str = 'path to config file.', *,
    flag_values: flags.FlagValues = flags.FLAGS, lock_config: bool = True,
    **kwargs: Any) -> flags.FlagHolder:
  """`ml_collections.config_flags.DEFINE_config_file` with checked overrides.

  Args:
    name: the flag (`config`), also the prefix of its overrides.
    default: the default config file.
    help_string: the flag's help.
    flag_values: where the flag is defined.
    lock_config: lock the loaded config (no new keys).
    **kwargs: to ml_collections' config flag (`sys_argv`, ...) and
      `absl.flags.Flag`.
  """
  flag = _CheckedConfigFlag(
      parser=_ml_config_flags.ConfigFileFlagParser(name=name,
                                                   lock_config=lock_config),
      serializer=flags.ArgumentSerializer(), name=name, default=default,
      help_string=help_string, flag_values=flag_values, **kwargs)
  return flags.DEFINE_flag(flag, flag_values)


__all__ = ['DEFINE_config_file', 'check_overrides', 'unknown_override_error']
