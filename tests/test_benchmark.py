"""scripts/benchmark.py: one tiny timed step of each mode on the CPU."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import benchmark  # noqa: E402
from configs import tiny  # noqa: E402


def test_synthetic_batch_matches_pipeline_layout():
  config = tiny.get_config()
  b = benchmark.synthetic_batch(config, 2, 64, np.random.default_rng(0))
  m, k, l = config.input.max_instances, config.input.gt_mask_size, config.model.num_layers
  assert b['image'].shape == (2, 64, 64, 3) and b['image'].dtype == np.uint8
  assert b['gt_layers'].shape == (2, m, k, k, l)
  assert b['gt_boxes'].shape == (2, m, 4)
  boxes = b['gt_boxes'][b['gt_valid']]
  assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  assert np.all(boxes <= 64)


def test_infer_step_reports_speed_and_flops():
  config = tiny.get_config()
  r = benchmark.benchmark_sln(config, 'infer', batch=1, size=64, steps=1)
  assert r['step_s'] > 0 and r['compile_s'] > 0
  assert r['flops'] > 1e6          # XLA's cost analysis saw the convolutions
  assert r['params'] > 1e5


def test_cli_prints_one_json_line(tmp_path):
  out = tmp_path / 'bench.jsonl'
  proc = subprocess.run(
      [sys.executable, 'scripts/benchmark.py', '--config=configs/tiny.py', '--mode=train',
       '--steps=1', f'--output={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  assert len(line) == 1
  r = json.loads(line[0])
  for key in ('device', 'dtype', 'batch', 'image_size', 'compile_s', 'step_ms',
              'images_per_s', 'flops_per_image'):
    assert key in r
  assert r['mode'] == 'train' and r['batch'] == 1 and r['image_size'] == 64
  assert r['images_per_s'] > 0 and r['flops_per_image'] > 0
  assert json.loads(out.read_text().strip()) == r
