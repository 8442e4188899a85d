"""Command-line helpers shared by main.py and scripts/: one-line user errors
(exit code 2, no traceback) and atomic outputs (nothing half-written).

No heavy imports here: input_pipeline scripts use it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator


class UserError(Exception):
  """An error the user can fix. ``str(err)`` names the file and the field."""

  def __init__(self, message: str, path: str = '', field: str = ''):
    parts = [p for p in (path, field) if p]
    super().__init__(': '.join(parts + [message]))
    self.path, self.field, self.message = path, field, message


def listing(title: str, items: list[str], limit: int = 40) -> str:
  """'N title: a, b, ... (+k more)': at most ``limit`` items named."""
  shown = items[:limit]
  more = f' (+{len(items) - len(shown)} more)' if items[len(shown):] else ''
  return f'{len(items)} {title}: {", ".join(shown)}{more}'


def parse_size(text: str, field: str, minimum: int = 1) -> tuple[int, int]:
  """'HxW' (e.g. '480x640') -> (H, W), each at least ``minimum``; anything
  else is a UserError naming ``field``."""
  try:
    h, w = (int(v) for v in text.lower().split('x'))
    if h < minimum or w < minimum:
      raise ValueError
  except ValueError:
    sides = 'positive sides' if minimum == 1 else f'sides of at least {minimum}'
    raise UserError(f'{text!r}: expected HxW with {sides}, e.g. 480x640',
                    field=field) from None
  return h, w


def read_json(path: str):
  """The JSON value in ``path``; a missing or unreadable file is a UserError."""
  if not os.path.isfile(path):
    raise UserError('no such file', path=path)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise UserError(f'not readable JSON ({err})', path=path) from None


def run_cli(main: Callable[[], int | None]) -> None:
  """Runs ``main``; user errors, and file-system errors naming a path (an
  output under a regular file, a read-only directory), print one line to
  stderr and exit 2."""
  try:
    code = main()
  except UserError as err:
    print(f'error: {err}', file=sys.stderr)
    sys.exit(2)
  except OSError as err:
    if not err.filename:
      raise
    print(f'error: {err.filename}: {err.strerror or err}', file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)


def _config_path(argv: list[str]) -> str:
  """The value of --config (``path`` or ``path:arg``), '' if not given."""
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _override_flag(argv: list[str], key: str) -> str:
  """The --config.* override whose path holds ``key`` (for the message)."""
  for arg in argv:
    name = arg.split('=', 1)[0].lstrip('-')
    if name.startswith('config.') and key in name.split('.')[1:]:
      return name
  return key


def _config_error(argv: list[str], err: BaseException) -> str:
  """The one-line message for an exception raised while loading --config."""
  path = _config_path(argv)
  inner = err.args[0] if err.args else err
  text = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner)
  if isinstance(err, (AttributeError, KeyError)):
    if "has no attribute 'get_config'" in text:
      return f'{path}: --config: defines no get_config()'
    # ml_collections: "'name'" or "'name'\nDid you mean \"x\" instead of \"name\"?"
    first, _, hint = text.partition('\n')
    key = first.strip('"\' ')
    suggestion = hint.split('"')[1] if hint.count('"') >= 2 else ''
    return (f'--{_override_flag(argv, key)}: unknown config field {key!r}'
            + (f' (did you mean {suggestion!r}?)' if suggestion else '')
            + ' (see configs/default.py)')
  if path and not os.path.isfile(path.split(':')[0]):
    return f'{path}: --config: no such file'
  lines = str(err).split('\n')
  return f'--config: {" ".join(" ".join(lines[:4]).split())}'


def parse_flags(argv: list[str], config_flag=None) -> list[str]:
  """absl flag parsing (``app.run(..., flags_parser=...)``) with one-line
  errors and exit code 2: unknown flags, bad values, a missing or broken
  --config file, an override of an unknown config field. ``config_flag``: the
  holder returned by ``config_flags.DEFINE_config_file``, loaded here so its
  errors are reported too."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    rest = flags.FLAGS(argv)
    if config_flag is not None and config_flag.value is not None:
      _ = config_flag.value.to_dict  # a failed config file raises on first access
    return rest
  except flags.Error as err:
    message = ' '.join(str(err).split())
  except BrokenPipeError:  # --help piped into head
    raise
  except (OSError, SyntaxError, ImportError, ValueError, TypeError, AttributeError,
          KeyError, NameError) as err:
    message = _config_error(argv, err)
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def nearest_existing(path: str) -> str:
  """``path`` made absolute, or its nearest ancestor that exists."""
  probe = os.path.abspath(path)
  while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  return probe


def check_dir_makeable(path: str, field: str = '') -> None:
  """The refusal of ``make_dirs`` without making anything, for callers to
  run before slow work: a UserError naming the first part of ``path`` that
  exists but is not a directory, or the directory it would be made in when
  that is not writable."""
  probe = nearest_existing(path)
  if not os.path.isdir(probe):
    raise UserError(f'is not a directory, so {path} cannot be made', path=probe, field=field)
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError('is not writable' + (f', so {path} cannot be made'
                                         if probe != os.path.abspath(path) else ''),
                    path=probe, field=field)


def make_dirs(path: str) -> None:
  """``os.makedirs(path, exist_ok=True)``, with a UserError naming the first
  part of ``path`` that exists but is not a directory."""
  check_dir_makeable(path)
  os.makedirs(path, exist_ok=True)


def _umask() -> int:
  """The process umask, read without changing it where Linux allows (setting
  it, even briefly, races with files other threads create)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def check_output_dir(path: str, overwrite: bool = True,
                     replaceable: Callable[[str], bool] | None = None) -> None:
  """The refusal of ``atomic_output_dir``, for callers to run before slow
  work: a UserError unless ``path`` is absent, empty, or (``overwrite``)
  ``replaceable(path)``."""
  path = os.path.abspath(path)
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path) or os.path.islink(path):
    raise UserError('exists and is not a directory', path=path)
  if not os.listdir(path):
    return
  if not overwrite:
    raise UserError('exists; refusing to overwrite', path=path)
  if replaceable is None or not replaceable(path):
    raise UserError('exists and holds files this tool did not write; '
                    'refusing to replace it (choose a new directory or remove '
                    'this one)', path=path)


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = True,
                      replaceable: Callable[[str], bool] | None = None
                      ) -> Iterator[str]:
  """Yields a temporary directory beside ``path``; renames it to ``path`` on
  success, removes it on any error (so no partial output is left).

  An existing ``path`` is replaced only when it is empty, or when
  ``overwrite`` is set and ``replaceable(path)`` says it holds an earlier
  output of the same tool; anything else is a UserError raised before the
  caller's work starts (``--out ~`` never deletes a home directory).
  """
  path = os.path.abspath(path)
  check_output_dir(path, overwrite, replaceable)
  parent = os.path.dirname(path)
  make_dirs(parent)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.tmp-', dir=parent)
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    old = tmp + '.old'
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, path)


@contextlib.contextmanager
def atomic_files_into(path: str) -> Iterator[str]:
  """Yields a temporary directory inside ``path`` (created if needed); on
  success moves each file written there into ``path`` with ``os.replace``
  (same names are replaced, every other entry of ``path`` is kept), on any
  error removes it and leaves ``path`` as it was."""
  path = os.path.abspath(path)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError('exists and is not a directory', path=path)
  created = not os.path.exists(path)
  make_dirs(path)
  tmp = tempfile.mkdtemp(prefix='.tmp-', dir=path)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if created:
      shutil.rmtree(path, ignore_errors=True)
    raise
  for name in sorted(os.listdir(tmp)):
    target = os.path.join(path, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(tmp, ignore_errors=True)
      raise UserError('is a directory; cannot replace it with a file',
                      path=target)
  for name in sorted(os.listdir(tmp)):
    os.replace(os.path.join(tmp, name), os.path.join(path, name))
  os.rmdir(tmp)


@contextlib.contextmanager
def atomic_output_file(path: str, mode: str = 'w') -> Iterator:
  """Opens a temporary file beside ``path``; renames on success. A ``path``
  that is a directory is a UserError before anything is written."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise UserError('is a directory, expected a file path', path=path)
  make_dirs(os.path.dirname(path))
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.tmp-',
                             dir=os.path.dirname(path))
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
