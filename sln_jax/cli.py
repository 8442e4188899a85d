"""Command-line plumbing shared by main.py and scripts/.

``run_cli`` turns user errors into one line on stderr and exit code 2;
``parse_flags`` does the same for absl flags and ml_collections config files
(a missing file, an unknown --config.* field); ``parse_size`` reads HxW
arguments; ``quiet_library_logs`` drops the libraries' own notices that
would drown the progress bars. No heavy imports.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

from absl import flags, logging

from sln_jax.errors import UserError

# Library warnings about the libraries themselves, printed on every run:
# TFDS's own TensorFeature.decode_example reads the deprecated ``dtype``,
# every builder config is "custom", and the dataset directory it is about to
# prepare has no dataset_info.json yet; Orbax announces the options a
# read-only CheckpointManager (evaluate / predict) sets, and misses a
# step-level metadata file inside the item directory it restores (or, for a
# damaged one, its item metadata: the one-line error that follows says so).
_LIBRARY_NOISE = {
    'tensorflow_datasets': re.compile(
        r'`FeatureConnector\.dtype` is deprecated'
        r'|Using custom data configuration'
        r'|Variant folder .* has no dataset_info\.json$'
    ),
    'orbax': re.compile(
        r'CheckpointManagerOptions\.read_only=True|Given directory is read only'
        r'|Metadata file does not exist|Failed to get item metadata'
    ),
}


def _not_library_noise(record) -> bool:
  return not any(
      package in record.pathname and noise.match(record.getMessage())
      for package, noise in _LIBRARY_NOISE.items()
  )


def quiet_library_logs() -> None:
  """Unless --verbosity was given: absl logs at WARNING (library INFO logs
  from Orbax and TFDS drown the progress bars) without the notices in
  ``_LIBRARY_NOISE``. --verbosity=0 shows everything."""
  if flags.FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_logger().addFilter(_not_library_noise)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the error style of main.py and the absl tools: a bad
  argument prints one line, ``error: MESSAGE (see --help)``, on stderr and
  exits with code 2 (argparse's own usage block is for --help)."""

  def error(self, message: str):
    self.exit(2, f'error: {message} (see --help)\n')


def parse_size(text: str, field: str, minimum: int = 1) -> tuple[int, int]:
  """'HxW' (e.g. '480x640') -> (H, W), each at least ``minimum``; anything
  else is a UserError naming ``field``."""
  try:
    h, w = (int(v) for v in text.lower().split('x'))
    if h < minimum or w < minimum:
      raise ValueError
  except ValueError:
    sides = 'positive sides' if minimum == 1 else f'sides of at least {minimum}'
    raise UserError(f'{text!r}: expected HxW with {sides}, e.g. 480x640', field=field) from None
  return h, w


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
    return (
        f'--{_override_flag(argv, key)}: unknown config field {key!r}'
        + (f' (did you mean {suggestion!r}?)' if suggestion else '')
        + ' (see configs/default.py)'
    )
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
  try:
    rest = flags.FLAGS(argv)
    if config_flag is not None and config_flag.value is not None:
      _ = config_flag.value.to_dict  # a failed config file raises on first access
    return rest
  except flags.Error as err:
    message = ' '.join(str(err).split())
  except BrokenPipeError:  # --help piped into head
    raise
  except (
      OSError,
      SyntaxError,
      ImportError,
      ValueError,
      TypeError,
      AttributeError,
      KeyError,
      NameError,
  ) as err:
    message = _config_error(argv, err)
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
