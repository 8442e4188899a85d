"""The exported inference program (sln_jax/export.py, sln_jax/exported.py,
scripts/export.py, scripts/predict_exported.py): the same outputs as the
model in process, a run in a process where the training stack cannot be
imported, and one-line errors for bad files."""

import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from sln_jax import export as export_lib
from sln_jax import exported, preprocess
from sln_jax.checkpoints import orbax_io
from sln_jax.evaluation.results import detections_to_results
from sln_jax.training.state import create_model
from sln_jax.training.step import make_infer_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Makes importing the training stack fail in the child process.
BLOCK = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('flax', 'optax', 'orbax', 'tensorflow') or name.startswith(
        'sln_jax.models'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def _config():
  c = tiny.get_config()
  c.model.num_layers = 2
  c.model.layer_activation = 'softmax'
  c.model.detection.nms_threshold = 0.5
  c.predict.score_threshold = 0.0  # random weights: keep every detection
  return c


@pytest.fixture(scope='module')
def artifact(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('export')
  c = _config()
  model, variables = create_model(c)
  # Perturb the detector so the random network returns some detections.
  variables = jax.tree.map(
      lambda x: x + 0.05 * np.random.default_rng(0).normal(size=x.shape).astype(x.dtype),
      variables,
  )
  path = str(tmp / 'model.sln')
  export_lib.write_export(path, model, variables, c)
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  image[8:30, 10:40] = (220, 40, 40)
  os.makedirs(tmp / 'images')
  Image.fromarray(image).save(tmp / 'images' / 'COCO_val2014_000000000007.png')
  return {
      'path': path,
      'model': model,
      'variables': variables,
      'config': c,
      'image': image,
      'tmp': tmp,
  }


def _in_process(a):
  c = a['config']
  canvas, shape, scale, glm = preprocess.preprocess_image(
      a['image'], c.input.image_size, c.input.resize_mode, c.model.glm.image_size
  )
  out = jax.jit(make_infer_fn(a['model']))(
      a['variables'], {'image': canvas[None], 'glm_image': glm[None], 'image_shape': shape[None]}
  )
  return {k: np.asarray(v)[0] for k, v in out.items()}, (canvas, glm, shape, scale)


def test_exported_program_equals_the_model_in_process(artifact):
  model = exported.load(artifact['path'])
  h = model.header
  assert h['format'] == 'sln-exported' and h['canvas'] == 64 and h['glm_size'] == 33
  assert h['platforms'] == ['cpu', 'cuda'] and h['layer_activation'] == 'softmax'
  want, (canvas, glm, shape, scale) = _in_process(artifact)
  got = model.infer(canvas, glm, shape)
  assert set(got) == set(want)
  assert want['valid'].any()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  results = model.predict(artifact['image'], image_id=7)
  c = artifact['config']
  expected = detections_to_results(
      7,
      want,
      scale,
      artifact['image'].shape[:2],
      score_threshold=c.predict.score_threshold,
      mask_threshold=c.eval.mask_threshold,
      mask_paste=c.eval.mask_paste,
  )
  assert results and json.dumps(results) == json.dumps(expected)
  with pytest.raises(exported.UserError, match='canvas'):
    model.infer(canvas[:32], glm, shape)


def test_predict_exported_runs_where_the_training_stack_cannot_be_imported(artifact):
  out = artifact['tmp'] / 'out'
  code = BLOCK + (
      'import sys\n'
      'from sln_scripts import predict_exported\n'
      'sys.argv = ["sln-predict-exported", sys.argv[1], sys.argv[2], "--out", sys.argv[3]]\n'
      'try:\n'
      '  import flax\n'
      'except ImportError:\n'
      '  print("flax blocked")\n'
      'predict_exported.run()\n'
  )
  proc = subprocess.run(
      [sys.executable, '-c', code, artifact['path'], str(artifact['tmp'] / 'images'), str(out)],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'flax blocked' in proc.stdout
  with open(out / 'COCO_val2014_000000000007.json') as f:
    got = json.load(f)
  want = exported.load(artifact['path']).predict(artifact['image'], image_id=7)
  assert got == json.loads(json.dumps(want))
  assert (out / 'COCO_val2014_000000000007.png').is_file()


def _run_predict(*args):
  return subprocess.run(
      [sys.executable, 'scripts/predict_exported.py', *args],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=ROOT,
      check=False,
  )


def _rewrite(src, dst, header=None, drop=None):
  with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, 'w') as w:
    for name in z.namelist():
      if name == drop:
        continue
      data = z.read(name)
      if name == 'header.json' and header is not None:
        data = json.dumps(dict(json.loads(data), **header)).encode()
      w.writestr(name, data)


def test_bad_files_are_one_line_errors(artifact, tmp_path):
  not_zip = tmp_path / 'a.sln'
  not_zip.write_text('hello')
  no_program = tmp_path / 'b.sln'
  _rewrite(artifact['path'], no_program, drop='program.bin')
  wrong_canvas = tmp_path / 'c.sln'
  _rewrite(artifact['path'], wrong_canvas, header={'canvas': 128})
  wrong_format = tmp_path / 'd.sln'
  _rewrite(artifact['path'], wrong_format, header={'format': 'other'})
  cases = [
      (not_zip, 'not a zip archive'),
      (no_program, 'no program.bin'),
      (wrong_canvas, 'header says a 128x128 canvas'),
      (wrong_format, 'not an exported SLN'),
      (tmp_path / 'missing.sln', 'no such file'),
  ]
  for path, message in cases:
    proc = _run_predict(str(path), str(artifact['tmp'] / 'images'), '--out', str(tmp_path / 'o'))
    assert proc.returncode == 2, (path, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], lines
  assert not (tmp_path / 'o').exists()


def test_export_command_from_an_orbax_checkpoint(artifact, tmp_path):
  ckpt = str(tmp_path / 'ckpt')
  orbax_io.save_orbax(jax.device_get(artifact['variables']), ckpt)
  out = tmp_path / 'm.sln'
  cfg = os.path.join(ROOT, 'configs', 'tiny.py')
  overrides = [
      '--config.model.num_layers=2',
      '--config.model.layer_activation=softmax',
      '--config.model.detection.nms_threshold=0.5',
      '--config.predict.score_threshold=0.0',
  ]
  proc = subprocess.run(
      [
          sys.executable,
          'scripts/export.py',
          f'--config={cfg}',
          *overrides,
          f'--checkpoint={ckpt}',
          f'--output={out}',
          '--platforms=cpu',
      ],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = exported.load(str(out))
  assert model.header['platforms'] == ['cpu']
  want = exported.load(artifact['path']).predict(artifact['image'])
  assert json.dumps(model.predict(artifact['image'])) == json.dumps(want)
  proc = subprocess.run(
      [
          sys.executable,
          'scripts/export.py',
          f'--config={cfg}',
          f'--checkpoint={tmp_path}',
          f'--output={tmp_path / "x.sln"}',
      ],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
      check=False,
  )
  assert proc.returncode == 2 and 'neither a training workdir' in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / 'x.sln').exists()
