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


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = True) -> Iterator[str]:
  """Yields a temporary directory beside ``path``; renames it to ``path`` on
  success, removes it on any error (so no partial output is left)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.tmp-', dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    if not overwrite:
      shutil.rmtree(tmp, ignore_errors=True)
      raise UserError('exists; refusing to overwrite', path=path)
    old = tmp + '.old'
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, path)


@contextlib.contextmanager
def atomic_output_file(path: str, mode: str = 'w') -> Iterator:
  """Opens a temporary file beside ``path``; renames on success."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.tmp-',
                             dir=os.path.dirname(path))
  os.close(fd)
  try:
    with open(tmp, mode) as f:
      yield f
  except BaseException:
    os.unlink(tmp)
    raise
  os.replace(tmp, path)
