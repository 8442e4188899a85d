"""The README's occlusion picture: an image, its ground truth and a network's
prediction side by side, enlarged, for one image of a COCOA-layout dataset.

Both panels are drawn by ``sln_jax.evaluation.render.render_prediction``
(visible part filled, occluded part striped, depth layer at the box corner)
on the image scaled up by an integer factor with nearest-neighbour sampling,
so each source pixel stays a visible block. Ground truth is drawn as if it
were a result, with its depth rank as the layer; a prediction matched to a
ground-truth object (amodal IoU >= 0.5, by score) takes that object's
colour (the renderer colours by rank, so the ranks are made to agree).

  python tools/occlusion_picture.py --annotations A.json --images DIR \\
      --results results.json --image-id 17 --out docs/images/occlusion.png
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from input_pipeline import readers
from sln_jax.evaluation import render
from sln_jax.evaluation.results_check import as_rle


def _scaled(rle: dict, factor: int) -> dict:
  mask = mask_utils.decode(rle).astype(bool)
  big = np.kron(mask, np.ones((factor, factor), bool))
  out = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
  out['counts'] = out['counts'].decode('ascii')
  return out


def _scaled_result(r: dict, factor: int) -> dict:
  x, y, w, h = r['bbox']
  return dict(
      r,
      bbox=[x * factor, y * factor, w * factor, h * factor],
      segmentation=_scaled(r['segmentation'], factor),
      visible_mask=_scaled(r['visible_mask'], factor),
  )


def picture(ann, image: np.ndarray, results: list, factor: int) -> np.ndarray:
  """(H f, 3 W f + 2 gaps, 3) uint8: the image, ground truth, prediction."""
  truth = []
  for g, inst in enumerate(ann.instances):
    amodal = as_rle(inst.amodal_rle, ann.height, ann.width, 'ground truth', 'amodal_rle')
    box = mask_utils.toBbox(amodal).tolist()
    truth.append(
        {
            'score': 1.0 - 0.01 * g,
            'bbox': box,
            'segmentation': amodal,
            'visible_mask': as_rle(
                inst.visible_rle, ann.height, ann.width, 'ground truth', 'visible_rle'
            ),
            'depth_layer': int(inst.depth_rank),
        }
    )
  results = sorted(results, key=lambda r: -r['score'])
  ious = mask_utils.iou(
      [r['segmentation'] for r in results],
      [t['segmentation'] for t in truth],
      [0] * len(truth),
  )
  ranked, taken = [], set()
  for k, r in enumerate(results):
    row = np.asarray(ious)[k] if len(truth) else np.zeros(0)
    free = [g for g in np.argsort(-row) if g not in taken and row[g] >= 0.5]
    if free:
      taken.add(int(free[0]))
      ranked.append(dict(r, score=truth[int(free[0])]['score']))
    else:
      ranked.append(dict(r, score=0.5 - 0.01 * k))
  results = ranked
  big = np.kron(image, np.ones((factor, factor, 1), np.uint8))
  left = render.render_prediction(big, [_scaled_result(r, factor) for r in truth], stripe=factor)
  right = render.render_prediction(big, [_scaled_result(r, factor) for r in results], stripe=factor)
  gap = np.full((big.shape[0], 8, 3), 255, np.uint8)
  return np.concatenate([big, gap, left, gap, right], axis=1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--annotations', required=True)
  p.add_argument('--images', required=True)
  p.add_argument('--results', required=True)
  p.add_argument('--image-id', type=int, required=True)
  p.add_argument('--score', type=float, default=0.5)
  p.add_argument('--factor', type=int, default=5)
  p.add_argument('--out', required=True)
  a = p.parse_args()
  anns = readers.load_annotations('cocoa', a.annotations, a.images, keep_empty=True)
  ann = next(x for x in anns if x.image_id == a.image_id)
  with open(a.results) as f:
    results = [r for r in json.load(f) if r['image_id'] == a.image_id and r['score'] >= a.score]
  image = np.asarray(Image.open(os.path.join(a.images, ann.file_name)).convert('RGB'))
  Image.fromarray(picture(ann, image, results, a.factor)).save(a.out)


if __name__ == '__main__':
  main()
