"""Checks the weight port against the original release's own PyTorch code.

  python tools/check_release_parity.py --release_dir SLN-Amodal \
      [--pth COCOA.pth] [--config=configs/cocoa.py] [--image photo.jpg]
      [--image_size 256] [--seed 0] [--tolerance 1e-4]
  python tools/check_release_parity.py --release_dir SLN-Amodal \
      --annotations COCO_amodal_val2014.json --results DT.json

RELEASE_DIR is a checkout of github.com/apchenstu/SLN-Amodal.

Network (default): the release's network is built from its own modules,
filled from ``--pth`` (default: seeded random weights in the release's
layout), converted, and both networks run on the same input: the image
(squashed to image_size, minus the mean pixel) or seeded noise. Prints each
compared tensor's relative error.

Evaluator (``--annotations`` and ``--results``, a COCOA file and COCO
results as ``main.py`` writes them): the release's amodal evaluator and
``sln_jax.evaluation.metrics`` with ``--config.eval.protocol=amodalapi`` score the same
results; prints the largest absolute difference over the 72 numbers of each
branch (amodal; visible when the results carry ``visible_mask``).

(``tools/release_parity.py``.) Exit 0 when everything is within
``--tolerance``, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app, flags
from ml_collections import config_flags
import numpy as np
from PIL import Image, UnidentifiedImageError
import release_parity  # tools/release_parity.py, beside this script

from input_pipeline import readers
from sln_jax import cli, config_checks, files
from sln_jax import errors as errors_lib
from sln_jax.checkpoints import torch_port
from sln_jax.evaluation import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string('release_dir', None, 'Checkout of apchenstu/SLN-Amodal.')
flags.DEFINE_string('pth', None, 'Release checkpoint (default: random weights).')
flags.DEFINE_string('image', None, 'Image to run on (default: seeded noise).')
flags.DEFINE_integer('image_size', 256, 'Square input side (multiple of 64).')
flags.DEFINE_integer('seed', 0, 'Seed of the random weights, input and ROI features.')
flags.DEFINE_string('annotations', None, 'COCOA annotation file (evaluator check).')
flags.DEFINE_string('results', None, 'COCO results JSON (evaluator check).')
flags.DEFINE_float(
    'tolerance',
    1e-4,
    'Largest relative error of a tensor, or absolute difference of a metric, accepted.',
)
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(ROOT, 'configs', 'cocoa.py'), 'Model config (full-size SLN).'
)


def _input(config, size: int, seed: int) -> np.ndarray:
  """(1, 3, size, size) mean-subtracted float32: the image squashed to size
  (the release's resize) or seeded noise of image scale."""
  mean = np.asarray(config.model.mean_pixel, np.float32)
  if FLAGS.image:

    if not os.path.isfile(FLAGS.image):
      raise errors_lib.UserError('no such file', path=FLAGS.image, field='--image')
    try:
      img = Image.open(FLAGS.image).convert('RGB').resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as err:
      raise errors_lib.UserError(
          f'not an image ({err})', path=FLAGS.image, field='--image'
      ) from None
    rgb = np.asarray(img, np.float32)
  else:
    rgb = np.random.default_rng(seed).uniform(0, 255, (size, size, 3)).astype(np.float32)
  return (rgb - mean).transpose(2, 0, 1)[None].copy()


def check_evaluator() -> int:
  """--annotations/--results: the release's evaluator vs sln_jax.evaluation.metrics."""

  amodal_eval = release_parity.load_release_evaluator(FLAGS.release_dir)
  gt = readers.load_annotations('cocoa', FLAGS.annotations)  # bad file: a UserError
  results = files.read_json(FLAGS.results)
  ours = metrics_lib.evaluate(gt, results, protocol='amodalapi', results_path=FLAGS.results)
  annotations = files.read_json(FLAGS.annotations)
  worst = 0.0
  for branch, table in ours.items():
    theirs = release_parity.release_evaluation(
        amodal_eval, annotations, results, visible=branch == 'visible'
    )
    diff = max(
        abs(table[s][p][m] - theirs[s][p][m]) for s in table for p in table[s] for m in table[s][p]
    )
    worst = max(worst, diff)
    n = sum(len(row) for parts in table.values() for row in parts.values())
    row = lambda t: ' '.join(f'{k} {v:.4f}' for k, v in t['all']['both'].items())
    print(f'{branch}: max |sln_jax - release| over {n} numbers = {diff:.2e}')
    print(f'  release  all/both: {row(theirs)}')
    print(f'  sln_jax  all/both: {row(ours[branch])}')
  return 1 if worst > FLAGS.tolerance else 0


def main() -> int:
  if not FLAGS.release_dir:
    raise errors_lib.UserError(
        'is required (a checkout of apchenstu/SLN-Amodal)', field='--release_dir'
    )
  if (FLAGS.annotations is None) != (FLAGS.results is None):
    raise errors_lib.UserError(
        'give both --annotations and --results (evaluator check)', field='--annotations'
    )
  if FLAGS.annotations:
    return check_evaluator()
  size = FLAGS.image_size
  if size <= 0 or size % 64:
    raise errors_lib.UserError(
        f"must be a positive multiple of 64 (the release's " f'rule), got {size}',
        field='--image_size',
    )
  config = _CONFIG.value
  config_checks.check_model(config.model)
  net = release_parity.ReleaseNetwork(FLAGS.release_dir, config.model)
  if FLAGS.pth:

    state = torch_port.load_torch_state_dict(FLAGS.pth)
  else:
    state = release_parity.random_release_state(net, FLAGS.seed)
  net.load_state_dict(state, FLAGS.pth or '')
  x = _input(config, size, FLAGS.seed)
  errors = release_parity.compare(
      net,
      net.state_dict(),
      config,
      x,
      FLAGS.seed,
      progress=lambda s: print(f'.. {s}', file=sys.stderr, flush=True),
  )
  print(f'{"tensor":<18} {"relative error":>14}')
  for name, err in errors.items():
    flag = '' if err <= FLAGS.tolerance else '  OVER TOLERANCE'
    print(f'{name:<18} {err:>14.2e}{flag}')
  bad = [n for n, e in errors.items() if e > FLAGS.tolerance]
  weights = FLAGS.pth or f'random weights (seed {FLAGS.seed})'
  print(
      f'{len(errors) - len(bad)} of {len(errors)} tensors within {FLAGS.tolerance:g} '
      f'({weights}, {size}x{size})'
  )
  return 1 if bad else 0


if __name__ == '__main__':
  app.run(
      lambda argv: cli.run_cli(main),
      flags_parser=functools.partial(cli.parse_flags, config_flag=_CONFIG),
  )
