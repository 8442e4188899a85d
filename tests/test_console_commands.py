"""pyproject.toml's console commands: one per user tool in scripts/, each a
``run()`` of its script, and no script edits sys.path (the package is
installed: `pip install -e .`)."""

import ast
import os
import subprocess
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands() -> dict[str, str]:
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']['scripts']


def _scripts() -> list[str]:
  return sorted(
      n[:-3]
      for n in os.listdir(os.path.join(ROOT, 'scripts'))
      if n.endswith('.py') and n != '__init__.py'
  )


def test_every_script_is_a_command_running_its_run_function():
  commands = _commands()
  targets = {}
  for name, target in commands.items():
    module, function = target.split(':')
    assert module.startswith('sln_scripts.') and function == 'run', (name, target)
    targets[module.split('.', 1)[1]] = name
  assert sorted(targets) == _scripts()
  for script, name in targets.items():
    assert name == 'sln-' + script.replace('_', '-')
    with open(os.path.join(ROOT, 'scripts', script + '.py')) as f:
      tree = ast.parse(f.read())
    assert any(isinstance(n, ast.FunctionDef) and n.name == 'run' for n in tree.body), script


def test_no_script_edits_sys_path():
  for script in _scripts():
    with open(os.path.join(ROOT, 'scripts', script + '.py')) as f:
      assert 'sys.path' not in f.read(), script


def test_an_installed_command_runs():
  """sln-evaluate, installed beside this interpreter, prints its help from
  outside the repository."""
  exe = os.path.join(os.path.dirname(sys.executable), 'sln-evaluate')
  proc = subprocess.run(
      [exe, '--help'],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=os.path.expanduser('~'),
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith('usage: sln-evaluate') and '--results' in proc.stdout
