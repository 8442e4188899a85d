"""Outputs that are never half-written, and the checks run before slow work.

Every writer goes through a temporary name beside its target and renames it
on success (``atomic_output_file``, ``atomic_output_dir``,
``atomic_files_into``); ``check_dir_makeable`` and ``check_output_dir`` refuse
a bad path before the work starts. No heavy imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

from sln_jax.errors import UserError


def read_json(path: str):
  """The JSON value in ``path``; a missing or unreadable file is a UserError."""
  if not os.path.isfile(path):
    raise UserError('no such file', path=path)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise UserError(f'not readable JSON ({err})', path=path) from None


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
    raise UserError(
        'is not writable'
        + (f', so {path} cannot be made' if probe != os.path.abspath(path) else ''),
        path=probe,
        field=field,
    )


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


def check_output_dir(
    path: str, overwrite: bool = True, replaceable: Callable[[str], bool] | None = None
) -> None:
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
    raise UserError(
        'exists and holds files this tool did not write; '
        'refusing to replace it (choose a new directory or remove '
        'this one)',
        path=path,
    )


@contextlib.contextmanager
def atomic_output_dir(
    path: str, overwrite: bool = True, replaceable: Callable[[str], bool] | None = None
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
      raise UserError('is a directory; cannot replace it with a file', path=target)
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
  fd, tmp = tempfile.mkstemp(
      prefix='.' + os.path.basename(path) + '.tmp-', dir=os.path.dirname(path)
  )
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
