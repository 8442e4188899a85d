"""The package's import graph: no cycles, and the two framework boundaries.

sln_jax never imports TensorFlow (the GPU machines have none; tf.data belongs
to input_pipeline) and input_pipeline never imports Flax. Imports sit at the
top of each module; the few inside functions are optional dependencies
(torch for the weight port) listed in ``_OPTIONAL``.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('sln_jax', 'input_pipeline')
# module -> the modules it may import inside a function (optional dependencies).
_OPTIONAL = {
    'sln_jax.checkpoints.torch_port': {'torch'},
}


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of PACKAGES."""
  out = {}
  for package in PACKAGES:
    for directory, _, names in os.walk(os.path.join(ROOT, package)):
      for name in names:
        if name.endswith('.py'):
          path = os.path.join(directory, name)
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          out[dotted.removesuffix('.__init__')] = path
  return out


def _is_type_checking(node: ast.AST) -> bool:
  return isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test)


def _imports(tree: ast.Module, modules: dict, top_level: bool) -> set[str]:
  """Modules imported at module level (``top_level``) or inside functions.
  ``from a import b`` counts as a.b when a.b is a module of PACKAGES."""
  found = set()
  nodes = []
  for node in tree.body:
    if _is_type_checking(node):
      continue
    nodes += [node] if top_level else []
    if not top_level:
      nodes += [
          n
          for n in ast.walk(node)
          if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
      ]
  for node in nodes:
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f'{node.module}.{a.name}'
        found.add(sub if sub in modules else node.module)
  return found


def test_no_import_cycles():
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    graph[name] = {m for m in _imports(tree, modules, True) if m in modules and m != name}
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        cycle = stack[stack.index(nxt) :] + [nxt]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node)


def test_imports_sit_at_the_top():
  modules = _modules()
  inside = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    found = {
        m.split('.')[0] if not m.startswith(PACKAGES) else m for m in _imports(tree, modules, False)
    }
    extra = found - _OPTIONAL.get(name, set())
    if extra:
      inside[name] = sorted(extra)
  assert not inside, f'imports inside functions: {inside}'


@pytest.mark.parametrize(
    'package,forbidden', [('sln_jax', 'tensorflow'), ('input_pipeline', 'flax')]
)
def test_framework_boundaries(package, forbidden):
  names = sorted(m for m in _modules() if m.split('.')[0] == package)
  code = (
      'import importlib, sys\n'
      f'for name in {names!r}:\n'
      '  importlib.import_module(name)\n'
      f'bad = sorted(m for m in sys.modules if m.split(".")[0].startswith({forbidden!r}))\n'
      'print(",".join(bad))\n'
  )
  proc = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1:] in (
      [],
      [''],
  ), f'importing {package} loads {proc.stdout.strip()}'
