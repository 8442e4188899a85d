"""`make demo`: synthetic data -> train -> evaluate -> predict, all under --workdir.

  python scripts/demo.py --workdir=runs/demo

Runs main.py's modes in order with configs/synthetic.py and prints the
metrics table at the end; the evaluation's HTML report is
``<workdir>/report/index.html`` and the predicted pictures are in
``<workdir>/predictions``. Every step shows its own progress bar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from sln_jax import cli
from sln_jax.evaluation import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> None:
  """Runs one main.py mode; its failure ends the demo with its exit code
  (main.py has already printed the reason)."""
  print('+', ' '.join(args), flush=True)
  code = subprocess.run(args, cwd=ROOT, check=False).returncode
  if code:
    sys.exit(code)


def main() -> int:
  parser = cli.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog='Any --config.x=y argument is passed on to main.py.',
  )
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--config', default='configs/synthetic.py')
  args, overrides = parser.parse_known_args()
  bad = [a for a in overrides if not a.startswith('--config.')]
  if bad:
    parser.error(
        f'unrecognized arguments: {" ".join(bad)} (only --config.x=y overrides pass through)'
    )
  args.overrides = overrides
  workdir = os.path.abspath(args.workdir)
  py = sys.executable
  t0 = time.time()
  common = [f'--config={args.config}', f'--workdir={workdir}'] + args.overrides
  _run([py, 'main.py', '--mode=train_and_evaluate'] + common)
  manual_dir = os.path.join(ROOT, 'data', 'synthetic')
  for arg in args.overrides:
    if arg.startswith('--config.dataset.manual_dir='):
      manual_dir = arg.split('=', 1)[1]
  val_images = os.path.join(manual_dir, 'val2014')
  _run(
      [py, 'main.py', '--mode=predict']
      + common
      + [
          f'--config.predict.input_dir={val_images}',
          f'--config.predict.output_dir={os.path.join(workdir, "predictions")}',
          '--config.predict.max_images=8',
      ]
  )

  with open(os.path.join(workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  print(metrics_lib.format_table(metrics))
  print(f'report: {os.path.join(workdir, "report", "index.html")}')
  print(f'demo finished in {(time.time() - t0) / 60:.1f} min; outputs in {workdir}')
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  sys.exit(main())


if __name__ == '__main__':
  run()
