"""Where a dataset's raw files come from, and a fast, clear error if nowhere.

A loader finds its archives in the manual dir (`$FEWSHOT_MANUAL_DIR`, or
`--config.data.manual_dir`) or downloads them. Offline, TFDS's download
manager retries for minutes before failing; here a manual dir that was given
but lacks the files fails at once, and without one the download host is
probed first (one socket connect, a few seconds, no retries). Either way the
error names the manual dir setting and the files expected there.
"""

from __future__ import annotations

import os
import pathlib
import socket
import threading
import urllib.parse
import urllib.request
from typing import Sequence

from fewshot.data.cache import MANUAL_DIR_ENV

MANUAL_DIR_SETTING = f'${MANUAL_DIR_ENV} (or --config.data.manual_dir)'
PROBE_TIMEOUT_S = 3.0


Files = Sequence[str | tuple[str, ...]]  # a tuple: one file, several names


def _label(entry: str | tuple[str, ...]) -> str:
  if isinstance(entry, str):
    return entry
  if len(entry) == 2 and entry[0] == f'{entry[1]}.gz':
    return f'{entry[1]}[.gz]'
  return ' or '.join(entry)


def missing_files(folder: str | os.PathLike, files: Files) -> list[str]:
  """The entries of `files` that `folder` lacks (a tuple: all its names)."""
  folder = pathlib.Path(folder).expanduser()
  return [_label(f) for f in files
          if not any((folder / n).exists()
                     for n in ((f,) if isinstance(f, str) else f))]


def not_found(what: str, problem: str, *, subdir: str, files: Files,
              manual_dir: str | os.PathLike | None = None,
              origin: str | None = None,
              setting: str = MANUAL_DIR_SETTING) -> FileNotFoundError:
  """`FileNotFoundError`: what is wrong, the files expected and where.

  Args:
    what: the dataset, e.g. 'Omniglot'.
    problem: why it cannot be found, e.g. 'the manual dir /x does not exist'.
    subdir: the folder of the manual dir that holds the files ('' for the
      manual dir itself).
    files: the expected file names (in `subdir`); a tuple of names is one
      file under any of them.
    manual_dir: the manual dir given, if any.
    origin: where the files can be obtained (a URL or a command).
    setting: how the user sets the manual dir.
  """
  base = (str(pathlib.Path(manual_dir).expanduser()) if manual_dir
          else '<manual_dir>')
  where = f'{base}/{subdir}/' if subdir else f'{base}/'
  holds = f'{subdir}/' if subdir else 'them'
  return FileNotFoundError(
      f'{what} not found: {problem}. Expected '
      f'{", ".join(_label(f) for f in files)} in {where}'
      + (f' (from {origin})' if origin else '')
      + f'; set {setting} to the folder that holds {holds}'
      + (' (e.g. ../shared/data).' if subdir else '.'))


def check_manual_files(what: str, manual_dir: str | os.PathLike | None, *,
                       subdir: str, files: Files,
                       extra_folders: Sequence[str | os.PathLike] = (),
                       origin: str | None = None,
                       setting: str = MANUAL_DIR_SETTING) -> pathlib.Path:
  """The folder that holds `files`, or `not_found` saying what is missing.

  Args:
    what, subdir, files, origin, setting: as in `not_found`.
    manual_dir: the manual dir given (None: none).
    extra_folders: looked in after `<manual_dir>/<subdir>` (for example a
      system package's folder).

  Returns:
    `<manual_dir>/<subdir>`, else the first of `extra_folders`, that holds
    every file.
  """
  problems = []
  if manual_dir is None:
    problems.append('no manual dir is set')
  else:
    root = pathlib.Path(manual_dir).expanduser()
    folder = root / subdir
    missing = missing_files(folder, files)
    if not missing:
      return folder
    if not root.is_dir():
      problems.append(f'the manual dir {manual_dir} does not exist')
    elif not folder.is_dir():
      problems.append(f'the manual dir {manual_dir} has no {subdir}/ folder')
    else:
      problems.append(f'{folder}/ lacks {", ".join(missing)}')
  for extra in extra_folders:
    extra = pathlib.Path(extra)
    missing = missing_files(extra, files)
    if not missing:
      return extra
    problems.append(f'{extra}/ does not exist' if not extra.is_dir()
                    else f'{extra}/ lacks {", ".join(missing)}')
  raise not_found(what, '; '.join(problems), subdir=subdir, files=files,
                  manual_dir=manual_dir, origin=origin, setting=setting)


def _probe_address(host: str, port: int) -> tuple[str, int]:
  """`(host, port)`, or the HTTPS proxy's when one applies to `host`."""
  proxy = urllib.request.getproxies().get('https')
  if proxy and not urllib.request.proxy_bypass(host):
    parsed = urllib.parse.urlsplit(proxy if '//' in proxy else f'//{proxy}')
    if parsed.hostname:
      return parsed.hostname, parsed.port or 80
  return host, port


def unreachable(host: str, port: int = 443,
                timeout: float = PROBE_TIMEOUT_S) -> str | None:
  """Why `host:port` cannot be reached (one connect, no retries), or None.

  The name lookup is bounded too: the connect runs in a daemon thread that
  is abandoned after `timeout` seconds.
  """
  address = _probe_address(host, port)
  outcome: list[str | None] = []

  def connect():
    try:
      socket.create_connection(address, timeout=timeout).close()
      outcome.append(None)
    except OSError as e:
      outcome.append(f'{type(e).__name__}: {e}')

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  target = f'{address[0]}:{address[1]}'
  if not outcome:
    return f'{target} did not answer within {timeout:g} s'
  return None if outcome[0] is None else f'{target}: {outcome[0]}'


def check_online(what: str, url: str, *, subdir: str, files: Files,
                 manual_dir: str | os.PathLike | None = None) -> None:
  """Raises `not_found` at once when `url`'s host cannot be reached."""
  parsed = urllib.parse.urlsplit(url)
  port = parsed.port or (80 if parsed.scheme == 'http' else 443)
  why = unreachable(parsed.hostname or url, port)
  if why is not None:
    offline = ('no manual dir is set' if manual_dir is None else
               f'the manual dir {manual_dir} does not hold them')
    raise not_found(
        what, f'{offline} and the download host cannot be reached ({why})',
        subdir=subdir, files=files, manual_dir=manual_dir, origin=url)


__all__ = ['MANUAL_DIR_SETTING', 'check_manual_files', 'check_online',
           'missing_files', 'not_found', 'unreachable']
