"""Small internal helpers."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping


def check_options(fn: Callable[..., Any], options: Mapping[str, Any],
                  what: str) -> None:
  """Raises ValueError naming any option that `fn` does not accept."""
  parameters = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
    return
  unknown = sorted(set(options) - set(parameters))
  if unknown:
    known = sorted(n for n, p in parameters.items()
                   if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    raise ValueError(f'Unknown option(s) {unknown} for {what}; '
                     f'it accepts {known}.')
