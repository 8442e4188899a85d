"""tools/release_parity.py and tools/check_release_parity.py.

The release checkout itself is not available to CI: ``compare`` runs here on
the PyTorch reference of the release (tests/torch_reference.py), which has
the same interface; the CLI is checked on its error paths.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import torch_reference as tr
from tests.test_torch_port import tiny_config
from tools import release_parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = [
    'c1',
    'c2',
    'c3',
    'c4',
    'c5',
    'p2',
    'p3',
    'p4',
    'p5',
    'p6',
    'rpn_class_logits',
    'rpn_bbox',
    'glm_logits',
    'box_logits',
    'box_deltas',
    'mask_layer_logits',
]


@pytest.fixture(scope='module')
def reference():
  cfg = tiny_config()
  ref = tr.SLNReference(tr.RefSpec.from_config(cfg.model))
  tr.randomize_(ref, seed=3)
  x = (50 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).numpy()
  return cfg, ref, x


def test_compare_matches_every_tensor_of_the_reference(reference):
  cfg, ref, x = reference
  errors = release_parity.compare(ref, ref.state_dict(), cfg, x)
  assert sorted(errors) == sorted(COMPARED)
  assert max(errors.values()) <= 1e-4, errors


def test_compare_points_at_the_part_that_differs(reference):
  cfg, ref, x = reference
  state = {k: v.clone() for k, v in ref.state_dict().items()}
  state['mask.conv5.bias'] += 1.0  # the converted mask head differs
  state['rpn.conv_bbox.weight'] *= 2  # and so do the RPN deltas
  errors = release_parity.compare(ref, state, cfg, x)
  assert errors['mask_layer_logits'] > 1e-2
  assert errors['rpn_bbox'] > 0.5
  assert max(v for k, v in errors.items() if k not in ('mask_layer_logits', 'rpn_bbox')) <= 1e-4


def test_random_release_state_is_seeded_and_complete(reference):
  _, ref, _ = reference
  a = release_parity.random_release_state(ref, seed=1)
  b = release_parity.random_release_state(ref, seed=1)
  assert a.keys() == ref.state_dict().keys()
  assert all(torch.equal(a[k], b[k]) for k in a)
  var = a['fpn.C1.1.running_var']
  assert bool((var >= 0.75).all() and (var <= 1.25).all())


def _cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'check_release_parity.py'), *args],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=120,
  )


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
  fake = tmp_path / 'SLN-Amodal'
  cases = [
      ((), '--release_dir: is required'),
      (('--release_dir', str(tmp_path / 'none')), 'no modal/modals.py'),
      (('--release_dir', str(tmp_path), '--image_size', '100'), 'multiple of 64'),
      (('--release_dir', str(tmp_path), '--config=configs/tiny.py'), 'full-size'),
      (('--release_dir', str(fake)), 'not as expected'),
      (('--release_dir', str(fake), '--results', 'r.json'), 'give both'),
      (
          ('--release_dir', str(fake), '--annotations', 'a.json', '--results', 'r.json'),
          'no evaluate/amodalevalCOCOA.py',
      ),
  ]
  (fake / 'modal').mkdir(parents=True)
  for name in ('modals', 'deeplabv2', 'resnet_deeplab', 'msc_deeplab'):
    (fake / 'modal' / f'{name}.py').write_text('')
  (fake / 'modal' / '__init__.py').write_text('')
  for args, message in cases:
    proc = _cli(*args)
    assert proc.returncode == 2, (args, proc.stderr[-1500:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and message in last, (args, last)


def test_numpy_shims_for_the_release_evaluator_are_undone():
  linspace = np.linspace
  with release_parity._numpy_2018():  # pylint: disable=protected-access
    assert np.float is float
    assert len(np.linspace(0.5, 0.95, np.round((0.95 - 0.5) / 0.05) + 1)) == 10
  assert np.linspace is linspace and not hasattr(np, 'float')
