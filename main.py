"""SLN in JAX: train, evaluate and predict from one ml_collections config.

  python main.py --config=configs/synthetic.py --workdir=runs/demo
  python main.py --config=configs/cocoa.py --workdir=runs/cocoa --mode=evaluate
  python main.py --config=configs/cocoa.py --workdir=runs/cocoa --mode=predict \
      --config.predict.input_dir=photos --config.predict.output_dir=out

Any config field can be overridden with --config.<path>=<value>. Errors the
user can fix print one line and exit with code 2. Several hosts: see
docs/multihost.md (sln_jax.distributed).
"""

import functools
import os
import sys

# TensorFlow's C++ warnings (grappler cost-model noise about CropAndResize on
# every tf.data graph) drown the progress bars; TF_CPP_MIN_LOG_LEVEL=0 shows
# them. Set before the imports below load TensorFlow.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags
from clu import metric_writers
import jax
from ml_collections import config_flags

from input_pipeline import sources
from sln_jax import cli, compilation_cache, config_checks, distributed, modes, writers
from sln_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file (configs/*.py); override fields with --config.a.b=v.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs, metrics.')
_MODE = flags.DEFINE_enum('mode', 'train_and_evaluate', list(modes.MODES), 'What to run.')


def _main() -> int:
  cli.quiet_library_logs()
  if distributed.is_multi_host():
    distributed.initialize()
  compilation_cache.enable()
  config, mode = _CONFIG.value, _MODE.value
  if config is None:
    raise UserError('is required (e.g. --config=configs/synthetic.py)', field='--config')
  if not _WORKDIR.value:
    raise UserError('is required', field='--workdir')
  config_checks.check_config(config)
  if mode in ('train', 'train_and_evaluate'):
    modes.check_stages(config)
  workdir = os.path.abspath(_WORKDIR.value)
  if mode != 'predict':  # predict only reads the workdir (it may be read-only)
    distributed.check_workdir(workdir)  # before hours of work
  data = sources.build(config, mode)  # input errors end the run before workdir exists
  writer = writers.LazyWriter(
      lambda: metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  )
  try:
    modes.run(config, workdir, mode, writer, data)
  finally:
    writer.close()
  return 0


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  cli.run_cli(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_flag=_CONFIG))
