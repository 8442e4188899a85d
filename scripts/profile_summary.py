"""Where the time of a profiled step goes, as text (no TensorBoard needed).

  python scripts/benchmark.py --config=configs/default.py --mode=train --profile_dir=/tmp/p
  python scripts/profile_summary.py /tmp/p --top 25

Reads the newest ``*.trace.json.gz`` under the directory (written by
``jax.profiler.trace``) and the compiled step's HLO text that benchmark.py
puts beside it (``step.hlo.txt``). Sums the duration of every XLA op
execution (events carrying ``hlo_op``; on a GPU only the device streams'
kernels), per op and per model module, and names each op's source from the
HLO metadata (``op_name``; a fusion without its own metadata takes the most
common one of its fused computation). Backward ops (``transpose(jvp(...))``
in the name) are labelled ``bwd``. Times are per step: divided by
``--steps`` (benchmark.py traces ``PROFILE_STEPS`` steps).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

from sln_jax import cli, errors
from sln_scripts.benchmark import PROFILE_STEPS

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*$')
_META = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')


def parse_hlo(text: str) -> dict[str, str]:
  """HLO instruction name -> op_name metadata. A fusion without its own
  metadata takes the most common op_name of the computation it calls, or,
  when XLA left none there, that computation's root as 'opcode shape'."""
  own, calls = {}, {}
  comp_ops = collections.defaultdict(collections.Counter)
  roots = {}
  comp = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and '=' not in line.split('{')[0]:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name = m.group(1)
    meta = _META.search(line)
    if meta:
      own[name] = meta.group(1)
      if comp is not None:
        comp_ops[comp][meta.group(1)] += 1
    if comp is not None and line.lstrip().startswith('ROOT'):
      rhs = line.split('=', 1)[1].strip()
      shape, _, rest = rhs.partition(' ')
      roots[comp] = f'[{rest.split("(", 1)[0]} {shape.split("{")[0]}]'
    call = _CALLS.search(line)
    if call:
      calls[name] = call.group(1)
  out = dict(own)
  for name, callee in calls.items():
    if name not in out:
      if comp_ops.get(callee):
        out[name] = comp_ops[callee].most_common(1)[0][0]
      elif callee in roots:
        out[name] = roots[callee]
  return out


def source(op_name: str) -> tuple[str, str]:
  """('fwd'|'bwd', module path) of an op_name such as
  'jit(f)/transpose(jvp(SLN.train_forward))/SLN._mask_head/mask_head/deconv/dot_general'
  -> ('bwd', 'SLN._mask_head/mask_head/deconv')."""
  if op_name.startswith('['):
    return '?', op_name
  phase = 'bwd' if 'transpose(' in op_name else 'fwd'
  parts = [
      p
      for p in op_name.split('/')
      if p and not re.match(r'^(jit|pmap|jvp|transpose|vmap|checkpoint)\(', p)
  ]
  module = '/'.join(parts[:-1]) if len(parts) > 1 else (parts[0] if parts else '?')
  return phase, module or '?'


def load_events(trace_dir: str) -> list[dict]:
  files = sorted(
      glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
      key=os.path.getmtime,
  )
  if not files:
    raise errors.UserError('no *.trace.json.gz (run benchmark.py --profile_dir)', path=trace_dir)
  try:
    with gzip.open(files[-1]) as f:
      trace = json.load(f)
  except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise errors.UserError(f'not a readable gzipped JSON trace ({err})', path=files[-1]) from None
  try:
    events = trace.get('traceEvents', [])
    pids = {
        e['pid']: e.get('args', {}).get('name', '')
        for e in events
        if e.get('ph') == 'M' and e.get('name') == 'process_name'
    }
    ops = [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
    device = [e for e in ops if pids.get(e['pid'], '').startswith('/device:')]
  except (AttributeError, TypeError, KeyError) as err:
    raise errors.UserError(
        f'not a jax.profiler trace (traceEvents: {type(err).__name__}: ' f'{err})', path=files[-1]
    ) from None
  return device or ops


def summarize(events: list[dict], names: dict[str, str], steps: int, top: int) -> str:
  by_op, count, by_module = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    op = e['args']['hlo_op']
    by_op[op] += e.get('dur', 0.0)
    count[op] += 1
  total = sum(by_op.values())
  if not total:
    return 'no XLA op executions in the trace'
  for op, us in by_op.items():
    by_module[source(names.get(op, op))] += us
  ms = lambda us: us / 1e3 / steps
  lines = [
      f'XLA op time: {ms(total):.2f} ms per step ({steps} steps, {len(events)} executions;'
      ' summed over threads/streams)',
      '',
      'by module:',
      f'{"%":>6} {"ms/step":>9}  phase  module',
  ]
  for (phase, module), us in by_module.most_common(top):
    lines.append(f'{100 * us / total:6.1f} {ms(us):9.3f}  {phase:5}  {module}')
  lines += ['', 'by op:', f'{"%":>6} {"ms/step":>9} {"calls":>6}  op  <- source']
  for op, us in by_op.most_common(top):
    lines.append(
        f'{100 * us / total:6.1f} {ms(us):9.3f} {count[op] // steps:6d}  {op}'
        f'  <- {names.get(op, "?")}'
    )
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('trace_dir')
  parser.add_argument('--hlo', default='', help='HLO text (default: TRACE_DIR/step.hlo.txt)')
  parser.add_argument(
      '--steps', type=int, default=0, help='steps in the trace (default: benchmark.PROFILE_STEPS)'
  )
  parser.add_argument('--top', type=int, default=20)
  args = parser.parse_args(argv)
  steps = args.steps
  if steps <= 0:
    steps = PROFILE_STEPS
  hlo = args.hlo or os.path.join(args.trace_dir, 'step.hlo.txt')
  names = {}
  if os.path.exists(hlo):
    with open(hlo) as f:
      names = parse_hlo(f.read())
  print(summarize(load_events(args.trace_dir), names, steps, args.top))
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
