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
  """Runs ``main``; user errors print one line to stderr and exit 2."""
  try:
    code = main()
  except UserError as err:
    print(f'error: {err}', file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)


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
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.tmp-', dir=parent)
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
  os.makedirs(path, exist_ok=True)
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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.tmp-',
                             dir=os.path.dirname(path))
  os.close(fd)
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
