"""Draws ground truth and (optionally) predictions of amodal annotations.

  python scripts/visualize.py --format cocoa --annotations GT.json --images DIR \\
      --out vis/ [--results DT.json --score-threshold 0.5] [--image-ids 1,7] [--max-images 20]

Writes one ``<image stem>.png`` per image into --out: the ground truth
beside the predictions of --results (COCO-style results JSON, as main.py's
predict/evaluate modes and scripts/evaluate.py use). Each instance in its
own colour: visible part filled, occluded part (amodal minus visible)
striped, box outline, its depth layer (0 = front; ground truth: depth rank)
at the box corner, drawn back to front (``sln_jax.evaluation.render.render_prediction``).

Every input is checked before the first picture is written (annotations,
results, that each image file exists with the annotated size); a problem ends
with one line naming the file and the field, exit code 2. Each PNG is
written atomically.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from tqdm import tqdm

from input_pipeline import readers
from sln_jax import cli, errors, files
from sln_jax.evaluation import render as render_lib
from sln_jax.evaluation import results_check

HEADER = 14  # px of caption above each panel
GAP = 8  # px of white between the panels


def _bbox(rle: dict) -> list[float]:
  return [float(v) for v in mask_utils.toBbox(rle)]


def ground_truth_items(annotation) -> list[dict]:
  """One image's instances in ``render_prediction``'s result form
  (segmentation = amodal RLE, visible_mask, bbox, depth_layer = depth rank)."""
  return [
      {
          'segmentation': inst.amodal_rle,
          'visible_mask': inst.visible_rle,
          'bbox': _bbox(inst.amodal_rle),
          'score': 1.0,
          'depth_layer': int(inst.depth_rank),
      }
      for inst in annotation.instances
  ]


def prediction_items(checked: Sequence[dict], score_threshold: float) -> list[dict]:
  """``evaluate.check_results`` items of one image, score >= threshold, in
  ``render_prediction``'s form (visible = amodal where the results carry none)."""
  out = []
  for r in checked:
    if r['score'] < score_threshold:
      continue
    item = {
        'segmentation': r['amodal'],
        'visible_mask': r['visible'] or r['amodal'],
        'bbox': _bbox(r['amodal']),
        'score': r['score'],
    }
    if 'depth_layer' in r:
      item['depth_layer'] = int(r['depth_layer'])
    out.append(item)
  return out


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
  h, w = panel.shape[:2]
  canvas = Image.new('RGB', (w, h + HEADER), (255, 255, 255))
  canvas.paste(Image.fromarray(panel), (0, HEADER))
  ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0), font=ImageFont.load_default())
  return np.asarray(canvas)


def render(
    image: np.ndarray,
    gt_items: Sequence[dict],
    pred_items: Optional[Sequence[dict]],
    score_threshold: float = 0.5,
) -> np.ndarray:
  """(H + HEADER, W or 2W + GAP, 3) uint8: captioned ground-truth panel, and
  the prediction panel to its right when ``pred_items`` is not None."""
  panels = [
      _caption(render_lib.render_prediction(image, gt_items), f'ground truth: {len(gt_items)}')
  ]
  if pred_items is not None:
    panels.append(
        _caption(
            render_lib.render_prediction(image, pred_items),
            f'predicted: {len(pred_items)} (score >= {score_threshold:g})',
        )
    )
  if len(panels) == 1:
    return panels[0]
  gap = np.full((panels[0].shape[0], GAP, 3), 255, np.uint8)
  return np.concatenate([panels[0], gap, panels[1]], axis=1)


def _parse_ids(text: str) -> list[int]:
  try:
    return [int(t) for t in text.split(',') if t.strip()]
  except ValueError:
    raise errors.UserError(
        f'not a comma-separated list of integers: {text!r}', field='--image-ids'
    ) from None


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--format', required=True, choices=('cocoa', 'd2sa', 'kins'))
  parser.add_argument('--annotations', required=True, help='ground-truth JSON')
  parser.add_argument('--images', required=True, help='images directory')
  parser.add_argument('--out', required=True, help='directory for the PNGs')
  parser.add_argument('--results', default=None, help='COCO-style results JSON (optional)')
  parser.add_argument(
      '--score-threshold',
      type=float,
      default=0.5,
      help='predictions below this score are not drawn',
  )
  parser.add_argument('--image-ids', default='', help='comma-separated ids (default: all)')
  parser.add_argument('--max-images', type=int, default=0, help='0: no limit')
  args = parser.parse_args(argv)

  gt = readers.load_annotations(args.format, args.annotations, args.images)  # checks the images
  chosen = gt
  if args.image_ids:
    by_id = {a.image_id: a for a in gt}
    ids = _parse_ids(args.image_ids)
    unknown = [i for i in ids if i not in by_id]
    if unknown:
      raise errors.UserError(
          f'image ids {unknown} are not in {args.annotations}', field='--image-ids'
      )
    chosen = [by_id[i] for i in ids]
  if args.max_images > 0:
    chosen = chosen[: args.max_images]

  predictions = None
  if args.results is not None:
    raw = files.read_json(args.results)
    predictions = {a.image_id: [] for a in gt}
    for r in results_check.check_results(raw, gt, path=args.results):
      predictions[r['image_id']].append(r)

  os.makedirs(args.out, exist_ok=True)
  for annotation in tqdm(chosen, desc='visualize', unit='image', disable=len(chosen) < 2):
    path = os.path.join(args.images, annotation.file_name)
    with Image.open(path) as im:
      image = np.asarray(im.convert('RGB'))
    preds = (
        None
        if predictions is None
        else prediction_items(predictions[annotation.image_id], args.score_threshold)
    )
    picture = render(image, ground_truth_items(annotation), preds, args.score_threshold)
    stem = os.path.splitext(os.path.basename(path))[0]
    with files.atomic_output_file(os.path.join(args.out, stem + '.png'), 'wb') as f:
      Image.fromarray(picture).save(f, format='PNG')
  print(f'wrote {len(chosen)} pictures to {args.out}')
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
