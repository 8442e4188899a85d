"""Throughput of the tf.data training pipeline (images/s, host only).

  python scripts/benchmark_input.py                       # both scenarios
  python scripts/benchmark_input.py --scenario 1024 --batches 40

Scenarios (each builds a small synthetic TFDS dataset, then times the train
split after warm-up; no accelerator involved):
  1024: 640x480 synthetic JPEG images -> 1024x1024 canvas, configs/default.py
        (max_instances 100, gt_mask_size 64, GLM image 513);
  128:  128x128 synthetic PNG images -> 128 canvas, gt_mask_size 32, GLM 65.
Encoded records are cached in memory (input.cache), so the numbers measure
decoding + preprocessing + batching, not disk reads.
Prints one JSON line per scenario: scenario, canvas, source (h, w), batch,
batches, images_per_s, ms_per_image, num_parallel_calls, cpu_count.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from configs import default
from input_pipeline import pipeline, synthetic, tfds_builders
from sln_jax import cli, files

# scenario -> (canvas S, source (h, w), GLM image size, gt_mask_size, format)
SCENARIOS = {'1024': (1024, (480, 640), 513, 64, 'jpg'), '128': (128, (128, 128), 65, 32, 'png')}


def _config(scenario: str, work: str, args) -> object:
  s, _, g, k, _ = SCENARIOS[scenario]
  c = default.get_config()
  c.dataset.name = 'cocoa'  # the generated scenes are in the COCOA layout
  c.dataset.data_dir = os.path.join(work, f'tfds_{scenario}')
  c.dataset.manual_dir = os.path.join(work, f'raw_{scenario}')
  c.input.image_size = s
  c.input.gt_mask_size = k
  c.model.glm.image_size = g
  c.input.num_parallel_calls = args.num_parallel_calls
  c.input.shuffle_buffer = args.images
  c.input.cache = True  # time preprocessing, not disk reads
  return c


def _generate(config, scenario: str, num_images: int) -> None:
  """Synthetic scenes of the scenario's size into manual_dir (COCOA layout)."""

  manual = config.dataset.manual_dir
  if os.path.isdir(manual):
    return
  _, source_hw, _, _, image_format = SCENARIOS[scenario]
  with files.atomic_output_dir(manual) as tmp:
    synthetic.generate_dataset(
        tmp, splits={'train': num_images}, image_size=source_hw, seed=0, image_format=image_format
    )


def run_scenario(scenario: str, work: str, args) -> dict:

  config = _config(scenario, work, args)
  _generate(config, scenario, args.images)
  builder = tfds_builders.build_dataset(config)
  it = pipeline.create_split(
      config, 'train', train=True, num_local_devices=1, per_device_batch=args.batch
  )
  for _ in range(args.warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  n = args.batches * args.batch
  example = builder.info.splits['train'].num_examples
  return {
      'scenario': scenario,
      'canvas': config.input.image_size,
      'source_hw': list(SCENARIOS[scenario][1]),
      'source_format': SCENARIOS[scenario][4],
      'dataset_images': example,
      'batch': args.batch,
      'batches': args.batches,
      'images_per_s': round(n / elapsed, 2),
      'ms_per_image': round(1000 * elapsed / n, 1),
      'num_parallel_calls': config.input.num_parallel_calls,
      'max_instances': config.input.max_instances,
      'gt_mask_size': config.input.gt_mask_size,
      'glm_image_size': config.model.glm.image_size,
      'cpu_count': os.cpu_count(),
      'image_batch_shape': list(batch['image'].shape),
  }


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scenario', choices=['all', *SCENARIOS], default='all')
  parser.add_argument(
      '--images', type=int, default=16, help='synthetic images generated per scenario'
  )
  parser.add_argument('--batch', type=int, default=2, help='per-device batch')
  parser.add_argument('--warmup', type=int, default=5, help='untimed batches')
  parser.add_argument('--batches', type=int, default=20, help='timed batches')
  parser.add_argument('--num_parallel_calls', type=int, default=2)
  parser.add_argument(
      '--workdir', default='', help='keep generated data here (default: a temp dir)'
  )
  args = parser.parse_args()
  scenarios = list(SCENARIOS) if args.scenario == 'all' else [args.scenario]
  with tempfile.TemporaryDirectory() as tmp:
    work = os.path.abspath(args.workdir) if args.workdir else tmp
    for scenario in scenarios:
      print(json.dumps(run_scenario(scenario, work, args)), flush=True)
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
