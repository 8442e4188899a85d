"""Markdown table of scripts/benchmark.py's JSON lines (docs/benchmarks.md).

  python scripts/benchmark_table.py gpu_benchmarks.jsonl [more.jsonl ...]

One row per line, in file order: device, config (GLM on or off), mode,
dtype, batch, image, compile s, ms/step, images/s, GFLOP per image, MFU,
memory (the allocator's peak where reported, else XLA's buffer
assignment), the peer's images/s and peak, and the ratio of images/s. A
run that failed or was skipped keeps its row, with the reason in place of
the numbers. Needs only the standard library and sln_jax.cli (runs on
the device machine).
"""

from __future__ import annotations

import json
import os

from sln_jax import cli, errors

COLUMNS = (
    'device',
    'model',
    'mode',
    'dtype',
    'batch',
    'image',
    'compile s',
    'ms/step',
    'images/s',
    'GFLOP/image',
    'MFU',
    'memory GiB',
    'peer images/s',
    'peer memory GiB',
    'ratio',
)


def _num(value, digits: int = 1) -> str:
  return '' if value is None else f'{value:,.{digits}f}'


def _gflop(g: float) -> str:
  return _num(g, 0 if g >= 100 else 2)


def _gib(mib) -> str:
  if not mib:
    return ''
  g = mib / 1024
  return f'{g:.1f}' if g >= 10 else f'{g:.2g}'


def row(r: dict) -> str:
  """One markdown row of a benchmark.py JSON line."""
  device = r.get('device', '')
  device = device.split(':', 1)[1] if ':' in device else device
  model = '' if 'glm' not in r else ('SLN (GLM)' if r['glm'] else 'SLN (no GLM)')
  mode = r.get('mode', '') + (f' ({r["stage"]})' if r.get('stage') not in (None, 'all') else '')
  dtype = {'bfloat16': 'bf16', 'float32': 'fp32'}.get(r.get('dtype'), r.get('dtype', ''))
  head = [device, model, mode, dtype, str(r.get('batch', '')), str(r.get('image_size', ''))]
  if 'error' in r:
    return '| ' + ' | '.join(head + [r['error'].replace('|', '/')] + [''] * 8) + ' |'
  mfu = r.get('mfu')
  memory = _gib(r.get('peak_memory_mib')) or _gib(r.get('xla_memory_mib'))
  peer = (
      _num(r.get('peer_images_per_s'), 2)
      if 'peer_images_per_s' in r
      else ('error' if 'peer_error' in r else '')
  )
  cells = head + [
      _num(r.get('compile_s')),
      _num(r.get('step_ms')),
      _num(r.get('images_per_s'), 2),
      _gflop(r.get('flops_per_image', 0) / 1e9),
      '' if mfu is None else f'{100 * mfu:.1f}%',
      memory,
      peer,
      _gib(r.get('peer_peak_memory_mib')),
      '' if r.get('ratio') is None else f'{r["ratio"]:.2f}',
  ]
  return '| ' + ' | '.join(cells) + ' |'


def table(rows: list[dict]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  return '\n'.join(lines + [row(r) for r in rows])


def read_rows(path: str) -> list[dict]:
  """The JSON objects of ``path``, one a line (blank lines skipped); a line
  that is not one is a UserError naming the file and the line."""
  if not os.path.isfile(path):
    raise errors.UserError('no such file', path=path)
  rows = []
  with open(path, errors='replace') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        if not isinstance(r, dict):
          raise ValueError
      except ValueError:
        raise errors.UserError(
            "not a JSON object, one of benchmark.py's lines", path=path, field=f'line {n}'
        ) from None
      rows.append(r)
  return rows


def main() -> None:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('jsonl', nargs='+', help='benchmark.py --output files')
  args = parser.parse_args()
  print(table([r for path in args.jsonl for r in read_rows(path)]))


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
