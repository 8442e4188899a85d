"""scripts/demo.py (`make demo`): argument handling and failure propagation.
The demo itself (about 7 minutes) is run by hand; its numbers are in the README."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(*args, workdir):
  return subprocess.run(
      [sys.executable, 'scripts/demo.py', f'--workdir={workdir}', *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )


def test_rejects_arguments_other_than_config_overrides(tmp_path):
  proc = _demo('--steps=3', workdir=tmp_path / 'w')
  assert proc.returncode == 2
  assert 'unrecognized arguments: --steps=3' in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_a_bad_override_ends_with_main_py_error_and_exit_code(tmp_path):
  proc = _demo('--config.model.dtype=bf16', workdir=tmp_path / 'w')
  assert proc.returncode == 2
  assert 'model.dtype' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()
