"""Checks the weight port against the original release's own PyTorch code.

  python scripts/check_release_parity.py --release_dir SLN-Amodal \
      [--pth COCOA.pth] [--config=configs/cocoa.py] [--image photo.jpg]
      [--image_size 256] [--seed 0] [--tolerance 1e-4]

RELEASE_DIR is a checkout of github.com/apchenstu/SLN-Amodal. Its network is
built from its own modules, filled from ``--pth`` (default: seeded random
weights in the release's layout), converted, and both networks run on the
same input: the image (squashed to image_size, minus the mean pixel) or
seeded noise. Prints each compared tensor's relative error
(``sln_jax.release_parity``). Exit 0 when every tensor is within
``--tolerance``, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from sln_jax import cliutil  # noqa: E402
from sln_jax import release_parity  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('release_dir', None, 'Checkout of apchenstu/SLN-Amodal.')
flags.DEFINE_string('pth', None, 'Release checkpoint (default: random weights).')
flags.DEFINE_string('image', None, 'Image to run on (default: seeded noise).')
flags.DEFINE_integer('image_size', 256, 'Square input side (multiple of 64).')
flags.DEFINE_integer('seed', 0, 'Seed of the random weights, input and ROI features.')
flags.DEFINE_float('tolerance', 1e-4, 'Largest relative error accepted.')
config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'cocoa.py'),
                                'Model config (full-size SLN).')


def _input(config, size: int, seed: int) -> np.ndarray:
  """(1, 3, size, size) mean-subtracted float32: the image squashed to size
  (the release's resize) or seeded noise of image scale."""
  mean = np.asarray(config.model.mean_pixel, np.float32)
  if FLAGS.image:
    from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(FLAGS.image):
      raise cliutil.UserError('no such file', path=FLAGS.image, field='--image')
    try:
      img = Image.open(FLAGS.image).convert('RGB').resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as err:
      raise cliutil.UserError(f'not an image ({err})', path=FLAGS.image,
                              field='--image') from None
    rgb = np.asarray(img, np.float32)
  else:
    rgb = np.random.default_rng(seed).uniform(0, 255, (size, size, 3)).astype(np.float32)
  return (rgb - mean).transpose(2, 0, 1)[None].copy()


def main() -> int:
  if not FLAGS.release_dir:
    raise cliutil.UserError('is required (a checkout of apchenstu/SLN-Amodal)',
                            field='--release_dir')
  size = FLAGS.image_size
  if size <= 0 or size % 64:
    raise cliutil.UserError(f'must be a positive multiple of 64 (the release\'s '
                            f'rule), got {size}', field='--image_size')
  config = FLAGS.config
  net = release_parity.ReleaseNetwork(FLAGS.release_dir, config.model)
  if FLAGS.pth:
    from sln_jax import checkpoint_port  # pylint: disable=g-import-not-at-top
    state = checkpoint_port.load_torch_state_dict(FLAGS.pth)
  else:
    state = release_parity.random_release_state(net, FLAGS.seed)
  net.load_state_dict(state, FLAGS.pth or '')
  x = _input(config, size, FLAGS.seed)
  errors = release_parity.compare(
      net, net.state_dict(), config, x, FLAGS.seed,
      progress=lambda s: print(f'.. {s}', file=sys.stderr, flush=True))
  print(f'{"tensor":<18} {"relative error":>14}')
  for name, err in errors.items():
    flag = '' if err <= FLAGS.tolerance else '  OVER TOLERANCE'
    print(f'{name:<18} {err:>14.2e}{flag}')
  bad = [n for n, e in errors.items() if e > FLAGS.tolerance]
  weights = FLAGS.pth or f'random weights (seed {FLAGS.seed})'
  print(f'{len(errors) - len(bad)} of {len(errors)} tensors within {FLAGS.tolerance:g} '
        f'({weights}, {size}x{size})')
  return 1 if bad else 0


def _cli() -> int:
  try:
    FLAGS(sys.argv)
  except (flags.Error, OSError, ValueError, KeyError, AttributeError) as err:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise cliutil.UserError(f'bad command line ({msg})', field='flags') from None
  return main()


if __name__ == '__main__':
  cliutil.run_cli(_cli)
