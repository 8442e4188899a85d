"""sln_jax.compilation_cache: where main.py's persistent XLA cache lives, its
opt-outs, and that a second process loads what the first compiled
(subprocesses: jax settles its cache once per process)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from sln_jax import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
path = compilation_cache.enable()
value = float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum())
print(json.dumps({{'path': path, 'hits': len(hits), 'value': value,
                  'max_size': jax.config.jax_compilation_cache_max_size}}))
"""


def _probe(env_updates, drop=('JAX_COMPILATION_CACHE_DIR', 'JAX_COMPILATION_CACHE_MAX_SIZE')):
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(JAX_PLATFORMS='cpu', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **env_updates)
  proc = subprocess.run(
      [sys.executable, '-c', _PROBE.format(root=ROOT)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_default_directory_is_filled_then_read_by_the_next_process(tmp_path):
  xdg = tmp_path / 'xdg'
  first, _ = _probe({'XDG_CACHE_HOME': str(xdg)})
  path = xdg / 'sln_jax' / 'xla'
  assert first['path'] == str(path) and first['hits'] == 0
  assert first['max_size'] == 2 << 30  # bounded, so jax locks the directory
  entries = [n for n in os.listdir(path) if n.endswith('-cache')]
  assert entries, os.listdir(path)
  second, _ = _probe({'XDG_CACHE_HOME': str(xdg)})
  assert second['hits'] >= 1 and second['value'] == first['value']
  assert sorted(n for n in os.listdir(path) if n.endswith('-cache')) == sorted(entries)


def test_jax_settings_win(tmp_path):
  own = tmp_path / 'own'
  r, _ = _probe(
      {
          'JAX_COMPILATION_CACHE_DIR': str(own),
          'JAX_COMPILATION_CACHE_MAX_SIZE': '-1',
          'XDG_CACHE_HOME': str(tmp_path / 'xdg'),
      }
  )
  assert r['path'] == str(own) and r['max_size'] == -1
  assert [n for n in os.listdir(own) if n.endswith('-cache')]
  assert not (tmp_path / 'xdg').exists()
  r, _ = _probe({'JAX_ENABLE_COMPILATION_CACHE': 'false', 'XDG_CACHE_HOME': str(tmp_path / 'off')})
  assert r['path'] is None and not (tmp_path / 'off').exists()


def test_an_unusable_directory_turns_the_cache_off_with_a_warning(tmp_path):
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  r, err = _probe({'XDG_CACHE_HOME': str(blocker)})
  assert r['path'] is None
  assert abs(r['value'] - 64**3 * math.sin(1.0)) < 1e-3 * r['value']  # the run goes on
  assert 'compilation cache off: cannot make' in err and str(blocker) in err
