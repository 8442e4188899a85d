"""Converts a released PyTorch checkpoint to an Orbax checkpoint.

  python scripts/convert_checkpoint.py --pth COCOA.pth \
      --config=configs/cocoa.py --output DIR
      [--source auto|sln|deeplab|maskrcnn] [--allow-missing RE ...]
      [--allow-unexpected RE ...] [--skip RE ...]
      [--activations-input X.npy --activations-output A.npz]

DIR is an Orbax (StandardCheckpointer) checkpoint of {'params',
'batch_stats'} that ``--config.init_from=DIR`` loads. With activations, the
converted network runs on X (N, 3, H, W) float32, already mean-subtracted,
H and W multiples of 32, and A.npz gets float32 c1..c5, p2..p6 (NCHW),
rpn_class_logits (N, A, 2), rpn_bbox (N, A, 4) (level P2..P6, then row,
column, anchor) and glm_logits (N, classes, h, w) of X resized bilinearly to
model.glm.image_size (65 x 65 for 513), for the parts the checkpoint holds.
Outputs are written atomically; a bad file ends in one line, exit code 2.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from sln_jax import cli, config_checks, errors, files
from sln_jax.checkpoints import orbax_io, torch_port

FLAGS = flags.FLAGS
flags.DEFINE_string('pth', None, 'PyTorch checkpoint (.pth) to convert.')
flags.DEFINE_string('output', None, 'Orbax checkpoint directory to write.')
flags.DEFINE_enum(
    'source', 'auto', ('auto',) + torch_port.SOURCES, 'Checkpoint kind (auto: from its keys).'
)
flags.DEFINE_multi_string('allow-missing', [], 'Regex of expected tensors that may be absent.')
flags.DEFINE_multi_string('allow-unexpected', [], 'Regex of extra torch keys to ignore.')
flags.DEFINE_multi_string(
    'skip',
    None,
    'Regex of torch keys not to convert ' "(default: the source's, see MASKRCNN_SKIP).",
)
flags.DEFINE_string('activations-input', None, 'X.npy (N,3,H,W) float32.')
flags.DEFINE_string('activations-output', None, 'A.npz to write.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.')


def _read_input(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise errors.UserError('no such file', path=path)
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as err:
    raise errors.UserError(f'not a .npy array ({err})', path=path) from None
  if not isinstance(x, np.ndarray):
    raise errors.UserError('not a .npy array', path=path)
  if x.ndim != 4 or x.shape[1] != 3 or not np.issubdtype(x.dtype, np.floating):
    raise errors.UserError(f'expected float (N, 3, H, W), got {x.dtype} ' f'{x.shape}', path=path)
  if x.shape[2] % 32 or x.shape[3] % 32:
    raise errors.UserError(f'H and W must be multiples of 32, got ' f'{x.shape[2:]}', path=path)
  return x.astype(np.float32)


def main() -> int:
  for name in ('pth', 'output', 'config'):
    if FLAGS[name].value is None:
      raise errors.UserError('is required', field=f'--{name}')
  act_in, act_out = FLAGS['activations-input'].value, FLAGS['activations-output'].value
  if (act_in is None) != (act_out is None):
    raise errors.UserError(
        'give both --activations-input and --activations-output', field='activations'
    )
  try:
    config = _CONFIG.value
    config.model  # noqa: B018  (a config file that failed to load raises here)
  except (OSError, AttributeError, SyntaxError, ImportError) as err:
    raise errors.UserError(
        f'cannot load the config file ({type(err).__name__})',
        path=FLAGS['config'].config_filename,
        field='config',
    ) from None
  config_checks.check_model(config.model)
  files.check_output_dir(FLAGS.output, replaceable=orbax_io.is_orbax_dir)
  x = _read_input(act_in) if act_in is not None else None
  state = torch_port.load_torch_state_dict(FLAGS.pth)
  source = FLAGS.source
  if source == 'auto':
    source = torch_port.detect_source(state, config.model)
  variables = torch_port.torch_to_flax(
      state,
      source,
      config,
      allow_missing=FLAGS['allow-missing'].value,
      allow_unexpected=FLAGS['allow-unexpected'].value,
      skip=FLAGS.skip,
      path=FLAGS.pth,
  )
  del state
  acts = None if x is None else torch_port.release_activations(variables, x, config)
  with files.atomic_output_dir(FLAGS.output, replaceable=orbax_io.is_orbax_dir) as tmp:
    orbax_io.save_orbax(variables, tmp)
  if acts is not None:
    with files.atomic_output_file(act_out, 'wb') as f:
      np.savez(f, **acts)
  n = sum(a.size for t in variables.values() for a in _leaves(t))
  print(
      f'converted {FLAGS.pth} ({source}, {n:,} numbers) -> {FLAGS.output}'
      + (f'; activations -> {act_out}' if acts is not None else '')
  )
  return 0


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


def run() -> None:
  """The console command (pyproject.toml)."""
  app.run(
      lambda argv: cli.run_cli(main),
      flags_parser=functools.partial(cli.parse_flags, config_flag=_CONFIG),
  )


if __name__ == '__main__':
  run()
