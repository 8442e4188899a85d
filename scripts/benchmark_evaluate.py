"""Scoring time per image: the evaluator's work after the COCO results exist.

  python scripts/benchmark_evaluate.py
  python scripts/benchmark_evaluate.py --images 100 --image 375x1242 --detections 100

Times what ``--mode=evaluate`` and ``scripts/evaluate.py`` run on the host
once the results exist: ``results_check.check_results`` (``scripts/evaluate.py``
decodes every RLE string to check it covers its image; ``--mode=evaluate``
skips that for its own results), ``metrics_lib.evaluate`` (the 24 tables: 4
occlusion subsets x 3 thing/stuff parts, amodal and visible) and
``occlusion.depth_order_accuracy``. No model and no accelerator: the ground
truth is random rectangles (2-10 per image, occlusion rate and thing/stuff
random) and the results are every object, moved a few pixels (amodal and
visible mask), plus false positives up to ``--detections`` per image.
Prints one JSON line: images, detections, image, ms per image of each part,
and in all for each of the two callers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from input_pipeline import records
from sln_jax import cli, errors
from sln_jax.evaluation import metrics as metrics_lib
from sln_jax.evaluation import occlusion, results_check


def _rect(h: int, w: int, y1: int, x1: int, y2: int, x2: int) -> np.ndarray:
  m = np.zeros((h, w), bool)
  m[y1:y2, x1:x2] = True
  return m


def _random_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
  bh, bw = (int(v) for v in rng.integers(8, [max(9, h // 2), max(9, w // 2)]))
  y1, x1 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
  return y1, x1, y1 + bh, x1 + bw


def make_case(
    rng: np.random.Generator, images: int, h: int, w: int, detections: int
) -> tuple[list, list]:
  """(ground truth, COCO results) as described in the module doc."""
  gt, results = [], []
  for image_id in range(1, images + 1):
    instances = []
    for _ in range(int(rng.integers(2, 11))):
      box = _random_box(rng, h, w)
      amodal = _rect(h, w, *box)
      cut = _random_box(rng, h, w)
      visible = amodal & ~_rect(h, w, *cut)
      if not visible.any():
        visible = amodal
      instances.append(
          records.InstanceAnnotation(
              amodal_rle=records.encode_mask(amodal),
              visible_rle=records.encode_mask(visible),
              occluded_rle=records.encode_mask(amodal & ~visible),
              depth_rank=len(instances),
              occlude_rate=float(1 - visible.sum() / amodal.sum()),
              is_stuff=bool(rng.random() < 0.2),
          )
      )
      dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
      results.append(
          {
              'image_id': image_id,
              'category_id': 1,
              'score': float(rng.uniform(0.3, 1)),
              'segmentation': records.encode_mask(np.roll(amodal, (dy, dx), (0, 1))),
              'visible_mask': records.encode_mask(np.roll(visible, (dy, dx), (0, 1))),
              'depth_layer': len(instances) - 1,
          }
      )
    for _ in range(max(0, detections - len(instances))):
      m = records.encode_mask(_rect(h, w, *_random_box(rng, h, w)))
      results.append(
          {
              'image_id': image_id,
              'category_id': 1,
              'score': float(rng.uniform(0, 0.5)),
              'segmentation': m,
              'visible_mask': m,
              'depth_layer': 0,
          }
      )
    gt.append(records.ImageAnnotation(image_id, f'{image_id}.jpg', h, w, instances))
  return gt, results


def _parse(argv=None) -> argparse.Namespace:
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--images', type=int, default=200)
  p.add_argument('--image', default='480x640', help='image size HxW (COCOA-like)')
  p.add_argument('--detections', type=int, default=100, help='results per image')
  p.add_argument('--protocol', choices=metrics_lib.PROTOCOLS, default='coco')
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


def _main(argv=None) -> int:
  args = _parse(argv)
  h, w = cli.parse_size(args.image, '--image', minimum=16)
  if args.images < 1:
    raise errors.UserError(f'{args.images}: must be at least 1', field='--images')
  if args.detections < 0:
    raise errors.UserError(f'{args.detections}: must be at least 0', field='--detections')
  gt, results = make_case(np.random.default_rng(args.seed), args.images, h, w, args.detections)
  times = {}
  start = time.perf_counter()
  results_check.check_results(results, gt, check_counts=False)  # as --mode=evaluate does
  times['check_results_own'] = time.perf_counter() - start
  start = time.perf_counter()
  checked = results_check.check_results(results, gt)  # as scripts/evaluate.py does
  times['check_results'] = time.perf_counter() - start
  start = time.perf_counter()
  metrics_lib.evaluate(gt, checked, protocol=args.protocol)
  times['evaluate'] = time.perf_counter() - start
  start = time.perf_counter()
  occlusion.depth_order_accuracy(gt, checked)
  times['depth_order'] = time.perf_counter() - start
  row = {
      'images': args.images,
      'detections': len(results),
      'image': [h, w],
      'protocol': args.protocol,
  }
  row.update({f'{k}_ms_per_image': round(1e3 * v / args.images, 1) for k, v in times.items()})
  scoring = times['evaluate'] + times['depth_order']
  row['main_evaluate_ms_per_image'] = round(
      1e3 * (times['check_results_own'] + scoring) / args.images, 1
  )
  row['scripts_evaluate_ms_per_image'] = round(
      1e3 * (times['check_results'] + scoring) / args.images, 1
  )
  print(json.dumps(row), flush=True)
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(_main)


if __name__ == '__main__':
  run()
