"""scripts/convert_checkpoint.py end to end on the tiny config."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from configs import tiny
from sln_jax.checkpoints import orbax_io, torch_port
from tests import torch_reference as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'convert_checkpoint.py')


def run(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, SCRIPT, '--config=' + os.path.join(ROOT, 'configs', 'tiny.py'), *args],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=300,
  )


@pytest.fixture(scope='module')
def reference():
  cfg = tiny.get_config()
  ref = tr.SLNReference(tr.RefSpec.from_config(cfg.model))
  tr.randomize_(ref, seed=11)
  return cfg, ref


def test_converts_and_activations_match_reference(reference, tmp_path):
  cfg, ref = reference
  torch.save(ref.state_dict(), tmp_path / 'w.pth')
  x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
  np.save(tmp_path / 'x.npy', (x * 50).numpy())
  out = tmp_path / 'ckpt'
  proc = run(
      '--pth',
      str(tmp_path / 'w.pth'),
      '--output',
      str(out),
      '--activations-input',
      str(tmp_path / 'x.npy'),
      '--activations-output',
      str(tmp_path / 'a.npz'),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]

  assert orbax_io.is_orbax_dir(str(out))
  restored = orbax_io.load_orbax(str(out))
  want_vars = torch_port.torch_to_flax(ref.state_dict(), 'sln', cfg)
  jax.tree.map(np.testing.assert_array_equal, restored, want_vars)

  want = ref.stages(x * 50)
  want['glm_logits'] = ref.glm_logits(x * 50, cfg.model.glm.image_size)
  got = np.load(tmp_path / 'a.npz')
  assert sorted(got.files) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == np.float32 and got[k].shape == tuple(v.shape), k
    err = np.abs(got[k] - v.numpy()).max() / np.abs(v.numpy()).max()
    assert err <= 1e-4, (k, err)
  assert got['glm_logits'].shape[1] == cfg.model.glm.num_classes


def test_bad_files_exit_2_without_output(reference, tmp_path):
  cfg, ref = reference
  torch.save(ref, tmp_path / 'module.pth')  # pickled code
  sd = dict(ref.state_dict())
  del sd['mask.deconv.bias']
  sd['mask.conv5.weight'] = torch.zeros(3, 16, 1, 1)
  torch.save(sd, tmp_path / 'broken.pth')
  for name, needle in (('module.pth', 'needs pickled code'), ('broken.pth', 'mask.deconv.bias')):
    out = tmp_path / ('out_' + name)
    proc = run('--pth', str(tmp_path / name), '--output', str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert needle in lines[0] and name in lines[0]
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.out_')]
  assert 'mask.conv5.weight (3, 16, 1, 1)' in lines[0]


def test_a_missing_flag_is_named(tmp_path):
  proc = run('--output', str(tmp_path / 'out'))
  assert proc.returncode == 2
  assert proc.stderr.strip() == 'error: --pth: is required', proc.stderr


def test_bad_model_config_exits_2_before_reading_the_file(tmp_path):
  """The config's model is checked first: a bad value is named even though
  the .pth does not exist (it would be read next)."""
  out = tmp_path / 'out'
  proc = run(
      '--pth', str(tmp_path / 'missing.pth'), '--output', str(out), '--config.model.roi.mask_size=7'
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: model.roi.mask_size: 7'), proc.stderr
  assert not out.exists()


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
  """--output naming a folder with other files (a typo, a home directory) is
  refused before the .pth is read; the folder is left as it was."""
  out = tmp_path / 'models'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  proc = run('--pth', str(tmp_path / 'missing.pth'), '--output', str(out))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'did not write' in lines[0] and str(out) in lines[0]
  assert os.listdir(out) == ['notes.txt']
  assert not orbax_io.is_orbax_dir(str(out))
