"""JAX's persistent compilation cache for main.py's runs.

XLA compiles the training step and the inference step at every launch
(docs/benchmarks.md gives the compile times). With the cache, a launch that
compiles a program an earlier one compiled (a resumed run, the ``evaluate``
or ``predict`` mode after training) loads the executable from disk instead.
Entries are keyed by the program, the compile options, the devices and the
jax/jaxlib versions, so a stale entry is never used for a different program.
In a multi-process job jax writes from process 0 only; the others read those
entries where the directory is shared and the keys agree (jax strips the
per-process device assignment from GPU keys; on CPU every process has its
own keys, so processes other than 0 miss). docs/compilation_cache.md has the
details.

The directory is jax's own setting when given (``JAX_COMPILATION_CACHE_DIR``),
else ``$XDG_CACHE_HOME/sln_jax/xla`` (``~/.cache/sln_jax/xla``);
``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off. Unless
``JAX_COMPILATION_CACHE_MAX_SIZE`` says otherwise, it holds at most
``DEFAULT_MAX_BYTES`` (least recently used entries go first), which also makes
jax lock the directory, so processes sharing it read no half-written entry.
"""

from __future__ import annotations

import os

from absl import logging
import jax

DEFAULT_MAX_BYTES = 2 << 30


def default_dir() -> str:
  """``$XDG_CACHE_HOME/sln_jax/xla``, XDG_CACHE_HOME defaulting to ~/.cache."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'sln_jax', 'xla')


def enable() -> str | None:
  """Points jax's persistent compilation cache at its directory (see the
  module doc) and returns it; None when the user turned the cache off or the
  directory cannot be made (a warning says so; the run compiles as usual).
  Call before the first compilation."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  path = jax.config.jax_compilation_cache_dir or default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as err:
    logging.warning(
        'compilation cache off: cannot make %s (%s); set '
        'JAX_COMPILATION_CACHE_DIR to a writable directory',
        path,
        err,
    )
    return None
  if not os.access(path, os.W_OK | os.X_OK):
    logging.warning(
        'compilation cache off: %s is not writable; set '
        'JAX_COMPILATION_CACHE_DIR to a writable directory',
        path,
    )
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:  # jax's default: no limit, no lock
    jax.config.update('jax_compilation_cache_max_size', DEFAULT_MAX_BYTES)
  return path
