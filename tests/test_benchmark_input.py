"""scripts/benchmark_input.py: the tf.data throughput benchmark runs end to
end on a few generated images and reports what it timed."""

import argparse
import os
import subprocess
import sys

from sln_scripts import benchmark_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_scenario_times_real_batches(tmp_path):
  args = argparse.Namespace(images=4, batch=2, warmup=1, batches=3, num_parallel_calls=1)
  row = benchmark_input.run_scenario('128', str(tmp_path), args)
  assert row['scenario'] == '128' and row['canvas'] == 128
  assert row['dataset_images'] == 4
  # Leading axis: local devices (1 here), then the per-device batch.
  assert row['image_batch_shape'] == [1, 2, 128, 128, 3]
  assert row['images_per_s'] > 0
  assert abs(row['ms_per_image'] - 1000 / row['images_per_s']) <= 0.1 + 1e-3 * row['ms_per_image']
  assert row['gt_mask_size'] == 32 and row['glm_image_size'] == 65
  # The generated COCOA scenes stay in the workdir for the next run.
  assert os.path.isfile(
      os.path.join(tmp_path, 'raw_128', 'annotations', 'COCO_amodal_train2014.json')
  )


def test_cli_rejects_unknown_scenario():
  proc = subprocess.run(
      [sys.executable, 'scripts/benchmark_input.py', '--scenario', '256'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert proc.returncode == 2
  assert "invalid choice: '256'" in proc.stderr
  assert proc.stdout == ''
