"""Test-run set-up: hypothesis profiles and one XLA compilation cache.

Hypothesis: under CI (the CI environment variable set, as .ci/run's
machine sets it) the "ci" profile runs every property test on a fixed,
derandomized sequence of examples with no example database, so a
submission's CI result never depends on which examples happen to be drawn.
Elsewhere the "dev" profile explores new examples each run and remembers
failing ones in .hypothesis/. HYPOTHESIS_PROFILE picks one explicitly.
Regressions found while exploring are pinned with ``@hypothesis.example``.

XLA compilation cache:
Many tests compile the same programs: main.py subprocesses that train the
tiny config, the demo, the models the in-process tests build again. The
first compilation of each is written to a directory made for this run and
shared by the xdist workers and every subprocess they start (through the
environment, which they inherit), later ones load it. Entries are keyed by
the program, so no test sees another program's executable; the directory
goes at the end of the run, so every run starts cold as on CI.
"""

import os
import shutil
import tempfile

import hypothesis

hypothesis.settings.register_profile(
    'ci', derandomize=True, database=None, deadline=None, print_blob=True
)
hypothesis.settings.register_profile('dev', deadline=None, print_blob=True)
hypothesis.settings.load_profile(
    os.environ.get('HYPOTHESIS_PROFILE', 'ci' if os.environ.get('CI') else 'dev')
)

_OWNER = '_SLN_JAX_TEST_CACHE_OWNER'


def pytest_configure(config):
  del config
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return  # a worker of this run (inherited), or the user's own choice
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='sln_jax_test_xla_')
  # A size limit makes jax lock the directory: no process reads an entry
  # another one is still writing.
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))
  os.environ[_OWNER] = str(os.getpid())


def pytest_unconfigure(config):
  del config
  if os.environ.get(_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
