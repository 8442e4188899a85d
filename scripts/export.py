"""Exports a trained SLN as one file that runs without the training stack.

  python scripts/export.py --config=configs/synthetic.py --checkpoint DIR \
      --output model.sln [--platforms=cpu,cuda]

DIR is a training workdir (its latest checkpoint, as --mode=predict reads
it) or an Orbax checkpoint of {'params', 'batch_stats'} (what
``--config.init_from`` takes, e.g. a converted release checkpoint). The
``.sln`` archive holds the inference program (``jax.export``, batch 1, the
config's canvas) for each platform, the variables and a JSON header
(``sln_jax/export.py``); ``sln-predict-exported`` runs it. Written
atomically; bad input ends with one line, exit code 2.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags
from ml_collections import config_flags

from sln_jax import cli, config_checks, errors
from sln_jax import export as export_lib
from sln_jax.checkpoints import orbax_io
from sln_jax.checkpoints.manager import checkpoint_steps, load_variables
from sln_jax.training.state import create_model, init_from_checkpoints

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'Training workdir or Orbax checkpoint directory.')
flags.DEFINE_string('output', None, 'The .sln file to write.')
flags.DEFINE_list('platforms', list(export_lib.PLATFORMS), 'Platforms to lower for.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.')


def main() -> int:
  for name in ('checkpoint', 'output', 'config'):
    if FLAGS[name].value is None:
      raise errors.UserError('is required', field=f'--{name}')
  config = _CONFIG.value
  config_checks.check_config(config)
  bad = [p for p in FLAGS.platforms if p not in ('cpu', 'cuda', 'rocm', 'tpu')]
  if bad or not FLAGS.platforms:
    raise errors.UserError(
        f'{bad or "none"}: one or more of cpu, cuda, rocm, tpu', field='--platforms'
    )
  source = FLAGS.checkpoint
  model, variables = create_model(config)
  if checkpoint_steps(source):
    variables, step = load_variables(config, source, variables)
    what = f'{source} (step {step})'
  elif orbax_io.is_orbax_dir(source):
    config.init_from, config.init_patterns = os.path.abspath(source), ''
    variables = init_from_checkpoints(config, variables, strict=True)
    what = source
  else:
    raise errors.UserError(
        'neither a training workdir with checkpoints nor an Orbax checkpoint',
        path=source,
        field='--checkpoint',
    )
  size = export_lib.write_export(FLAGS.output, model, variables, config, FLAGS.platforms)
  print(f'exported {what} -> {FLAGS.output} ({size / 2**20:.1f} MiB, {",".join(FLAGS.platforms)})')
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  app.run(
      lambda argv: cli.run_cli(main),
      flags_parser=functools.partial(cli.parse_flags, config_flag=_CONFIG),
  )


if __name__ == '__main__':
  run()
