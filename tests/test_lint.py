"""The code passes the linter and the formatter configured in pyproject.toml
(ruff: pycodestyle, pyflakes, import order, bugbear; pyink: 2-space Google
style). `make lint` runs the linter; `pyink .` formats."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _run(*cmd):
  return subprocess.run(
      [os.path.join(BIN, cmd[0]), *cmd[1:]],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )


def test_ruff_finds_nothing():
  proc = _run('ruff', 'check', '--no-cache', '.')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_pyink_leaves_every_file_unchanged():
  proc = _run('pyink', '--check', '.')
  assert proc.returncode == 0, proc.stderr[-3000:]
