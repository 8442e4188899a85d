"""Host post-processing time per image (no accelerator involved).

  python scripts/benchmark_postprocess.py
  python scripts/benchmark_postprocess.py --config=configs/kins.py --image=375x1242 --images=50

Times ``results_lib.detections_to_results``: what evaluate() and predict() run
on the host for every image after ``SLN.infer`` (paste each detection's
amodal, visible and layer maps into the original image, threshold, RLE
encode, pairwise depth order). Inputs are random detections shaped like
``SLN.infer``'s outputs under the config (``model.detection.max_detections``,
``model.roi.mask_size``, ``model.num_layers``, ``input.image_size`` canvas),
with box sides log-uniform between 16 and 512 canvas pixels and probability
maps that are one noisy elliptic blob each (a mask, not noise), for an
original image of ``--image HxW`` (COCOA's typical 480x640 by default).
``--workers N`` runs the calls in N worker processes as ``eval.host_workers``
does (``sln_jax.host_workers``). Prints one JSON line: images, detections,
image, mask_size, layers, workers, ms_per_image, main_process_cpu_ms_per_image
(what the calling process spends), results_per_image.
"""

from __future__ import annotations

import functools
import json
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from sln_jax import cli, errors, host_workers
from sln_jax.evaluation import results as results_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Model/config file.')
flags.DEFINE_string('image', '480x640', 'Original image size HxW.')
flags.DEFINE_integer('images', 20, 'Images timed (after one warm-up image).', lower_bound=1)
flags.DEFINE_integer(
    'detections', -1, 'Detections per image; -1 = config.model.detection.max_detections.'
)
flags.DEFINE_integer('seed', 0, 'Seed of the random detections.')
flags.DEFINE_integer(
    'workers', 0, 'Worker processes (eval.host_workers; 0: in this process).', lower_bound=0
)
FLAGS = flags.FLAGS


def _blobs(rng: np.random.Generator, num: int, size: int, channels: int = 0) -> np.ndarray:
  """(num, size, size[, channels]) float32 probabilities of one elliptic blob
  each (centre, radii and sharpness random) with a little noise: shaped like
  a mask head's output, so the pasted masks have a mask's few runs per
  column (pure noise would have one run every other pixel)."""
  shape = (num,) + ((channels,) if channels else ())
  grid = (np.arange(size, dtype=np.float32) + 0.5) / size
  cy, cx = (rng.uniform(0.3, 0.7, shape + (1, 1)).astype(np.float32) for _ in range(2))
  ry, rx = (rng.uniform(0.2, 0.5, shape + (1, 1)).astype(np.float32) for _ in range(2))
  d = ((grid[:, None] - cy) / ry) ** 2 + ((grid[None, :] - cx) / rx) ** 2
  logits = np.clip(rng.uniform(3, 8, shape + (1, 1)).astype(np.float32) * (1 - d), -30, 30)
  probs = 1 / (1 + np.exp(-logits)) + rng.normal(0, 0.05, d.shape).astype(np.float32)
  probs = np.clip(probs, 0, 1)
  return np.moveaxis(probs, 1, -1) if channels else probs


def random_detections(
    rng: np.random.Generator, num: int, canvas: int, mask_size: int, layers: int
) -> dict:
  """``SLN.infer``-shaped detections of one image (batch axis removed)."""
  side = np.exp(rng.uniform(np.log(16), np.log(512), (num, 2)))
  top_left = rng.uniform(0, canvas, (num, 2)) - side / 2
  boxes = np.concatenate([top_left, top_left + side], axis=1)
  return {
      'boxes': np.clip(boxes, 0, canvas).astype(np.float32),
      'scores': rng.uniform(0.05, 1.0, num).astype(np.float32),
      'classes': rng.integers(1, 3, num).astype(np.int32),
      'valid': np.ones(num, bool),
      'amodal_probs': _blobs(rng, num, mask_size),
      'visible_probs': _blobs(rng, num, mask_size),
      'layer_probs': _blobs(rng, num, mask_size, layers),
  }


def _main(argv) -> int:
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  h, w = cli.parse_size(FLAGS.image, '--image')
  canvas = int(config.input.image_size)
  num = int(FLAGS.detections if FLAGS.detections >= 0 else config.model.detection.max_detections)
  mask_size, layers = int(config.model.roi.mask_size), int(config.model.num_layers)
  scale = canvas / max(h, w)  # the inference preprocessing's resize
  rng = np.random.default_rng(FLAGS.seed)
  images = [random_detections(rng, num, canvas, mask_size, layers) for _ in range(FLAGS.images + 1)]
  # The evaluator's call (sln_jax.evaluation.loops.evaluate).
  kwargs = dict(mask_threshold=config.eval.mask_threshold, mask_paste=config.eval.mask_paste)
  with host_workers.OrderedWorkers(FLAGS.workers) as workers:
    for _ in range(max(1, FLAGS.workers)):  # warm-up (and start) every worker
      workers.submit(
          results_lib.detections_to_results, 0, images[0], (scale, scale), (h, w), **kwargs
      )
    workers.results()
    start, cpu = time.perf_counter(), time.process_time()
    for k, dets in enumerate(images[1:]):
      workers.submit(results_lib.detections_to_results, k, dets, (scale, scale), (h, w), **kwargs)
    count = sum(len(r) for r in workers.results())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  print(
      json.dumps(
          {
              'images': FLAGS.images,
              'detections': num,
              'image': [h, w],
              'mask_size': mask_size,
              'layers': layers,
              'mask_paste': config.eval.mask_paste,
              'workers': FLAGS.workers,
              'ms_per_image': round(1e3 * elapsed / FLAGS.images, 2),
              'main_process_cpu_ms_per_image': round(1e3 * cpu / FLAGS.images, 2),
              'results_per_image': round(count / FLAGS.images, 1),
          }
      ),
      flush=True,
  )
  return 0


def main(argv) -> None:
  cli.run_cli(lambda: _main(argv))


def run() -> None:
  """The console command (pyproject.toml)."""
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_flag=_CONFIG))


if __name__ == '__main__':
  run()
