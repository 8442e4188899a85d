"""Plain Orbax variable directories: save, load, and reports of failed reads.

Layout: a directory written by ``ocp.StandardCheckpointer`` holding the pytree
``{'params': ..., 'batch_stats': ...}`` (nested dicts of arrays, Flax module
paths); ``load_orbax`` restores it without a target. A directory that is not
one, or one with damaged files, is a UserError naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from typing import Iterator, Mapping

import orbax.checkpoint as ocp

from sln_jax.errors import UserError


def save_orbax(variables: Mapping, directory: str) -> None:
  """Writes {'params', 'batch_stats'} to ``directory`` (StandardCheckpointer;
  replaces an existing directory)."""

  tree = {k: variables.get(k, {}) for k in ('params', 'batch_stats')}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), tree, force=True)
  ckptr.wait_until_finished()
  ckptr.close()


def is_orbax_dir(directory: str) -> bool:
  """True when ``directory`` holds an Orbax checkpoint (its metadata file):
  what ``convert_checkpoint.py --output`` may replace."""
  return any(
      os.path.isfile(os.path.join(directory, name))
      for name in ('_CHECKPOINT_METADATA', '_METADATA')
  )


def _orbax_read_noise(unraisable) -> bool:
  """True for what a failed Orbax read leaves behind: each array read still
  pending ends as an unraisable exception (its coroutine's own error, or
  ``RuntimeError('Event loop is closed')`` from TensorStore callbacks posting
  to Orbax's closed loop), printed as one traceback each, thousands of lines
  after the one-line error."""
  if (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'
  ):
    return True
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and 'orbax' in code.co_filename


def _unretrieved_read_noise(record: logging.LogRecord) -> bool:
  """False for asyncio's '<Task|Future> exception was never retrieved': the
  same failed array reads, logged by asyncio instead of raised (the futures
  are TensorStore's or Orbax's; their tracebacks need not name either)."""
  return 'exception was never retrieved' not in record.getMessage()


@contextlib.contextmanager
def quiet_failed_reads() -> Iterator[None]:
  """Around an Orbax restore: drops the reports of a failed read's pending
  array reads (``_orbax_read_noise`` through ``sys.unraisablehook``, and
  asyncio's log of them) while it runs, and for the rest of the process if
  it fails (those reads end later). Any other report is kept."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _orbax_read_noise(unraisable):
      previous(unraisable)

  def log_filter(record):  # one object per call: removeFilter takes out this one
    return _unretrieved_read_noise(record)

  sys.unraisablehook = hook
  asyncio_log = logging.getLogger('asyncio')
  asyncio_log.addFilter(log_filter)
  yield
  sys.unraisablehook = previous
  asyncio_log.removeFilter(log_filter)


# TensorStore's status codes for a file it cannot read as the checkpoint
# says it should (truncated, corrupted, missing); not RESOURCE_EXHAUSTED
# (memory), UNAVAILABLE or DEADLINE_EXCEEDED (transient).
_READ_FAILURE = re.compile(
    r'(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|' r'FAILED_PRECONDITION): '
)


def is_read_failure(err: BaseException) -> bool:
  """True when ``err`` comes from checkpoint files that cannot be read as
  written (TensorStore's read errors, malformed JSON metadata, a missing
  file): what ``unreadable_checkpoint`` reports. Out of memory, transient
  file-system or coordination errors are not."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, (json.JSONDecodeError, FileNotFoundError)):
      return True
    if isinstance(err, ValueError) and _READ_FAILURE.match(str(err)):
      return True
    err = err.__cause__ or err.__context__
  return False


def unreadable_checkpoint(directory: str, err: BaseException, hint: str) -> UserError:
  """The UserError for an Orbax checkpoint in ``directory`` whose arrays
  cannot be read (a damaged, truncated or partly copied file): Orbax's first
  line of the reason (its own message wraps the TensorStore spec) and
  ``hint``."""
  cause = err
  while cause.__cause__ is not None:
    cause = cause.__cause__
  reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
  if len(reason) > 300:
    reason = reason[:300] + '...'
  return UserError(f'cannot be read ({type(cause).__name__}: {reason}); {hint}', path=directory)


def load_orbax(directory: str) -> dict:
  """Reads a checkpoint written by ``save_orbax`` -> nested dict of arrays."""

  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise UserError('no such checkpoint directory', path=directory)
  if not os.path.isfile(os.path.join(directory, '_METADATA')) and os.path.isfile(
      os.path.join(directory, 'default', '_METADATA')
  ):
    directory = os.path.join(directory, 'default')  # a training step: <workdir>/checkpoints/<step>
  ckptr = ocp.StandardCheckpointer()
  try:
    with quiet_failed_reads():
      tree = ckptr.restore(directory)
  except Exception as err:  # pylint: disable=broad-except
    if not is_orbax_dir(directory):
      raise UserError(
          f'not an Orbax checkpoint (no _CHECKPOINT_METADATA or _METADATA; '
          f'{type(err).__name__})',
          path=directory,
      ) from None
    if not is_read_failure(err):
      raise
    raise unreadable_checkpoint(
        directory, err, 'the checkpoint is damaged or incomplete; convert or copy it again'
    ) from None
  finally:
    ckptr.close()
  return {k: tree.get(k, {}) for k in ('params', 'batch_stats')}
