"""The pictures a person reads: one renderer for predict, evaluate, the
training images in TensorBoard and scripts/visualize.py.

A picture is the image enlarged to ``draw.MIN_LONG_SIDE`` pixels or more,
each object drawn back to front (visible part filled, hidden part hatched in
a lighter tone of the same colour, amodal outline, a label tag with its depth
layer and score), a caption per panel and a legend. ``comparison_picture``
puts ground truth and prediction side by side: a prediction matched to a
ground-truth object (``occlusion.match_masks``: by score, amodal IoU >= 0.5)
shares its colour; false positives and missed objects are dashed and tagged.

Results are COCO results (``segmentation`` = amodal mask, ``visible_mask``,
``score``, optional ``depth_layer``, masks as RLE or polygons in original
image pixels) or ``results_check.check_results`` items (``amodal``,
``visible``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sln_jax.evaluation.occlusion import match_masks
from sln_jax.evaluation.results_check import as_rle
from sln_jax.visualization import draw

PREDICTION_LABELS = 'label: depth layer (0 = front) \u00b7 score'
TRUTH_LABELS = 'label: depth rank (0 = front)'
COMPARISON_LABELS = 'label: depth (0 = front) \u00b7 score; same colour = matched pair'


def _masks(r: dict, height: int, width: int) -> tuple[dict, dict]:
  """(amodal RLE, visible RLE) of one result, checked or raw; the amodal
  mask stands in for a missing visible one."""
  where = f'image {r.get("image_id", "?")}'
  amodal = r['amodal'] if 'amodal' in r else r.get('amodal_mask', r.get('segmentation'))
  amodal = as_rle(amodal, height, width, 'results', f'{where}.segmentation')
  visible = r['visible'] if 'visible' in r else r.get('visible_mask')
  visible = amodal if visible is None else as_rle(visible, height, width, 'results', where)
  return amodal, visible


def _decode(rle: dict, factor: int) -> np.ndarray:
  return draw.enlarge(mask_utils.decode(rle).astype(bool), factor)


def _box(rle: dict, factor: int) -> list[float]:
  return [factor * float(v) for v in mask_utils.toBbox(rle)]


def kept_results(results: Sequence[dict], score_threshold: float) -> list[dict]:
  """The results with ``score >= score_threshold``, highest score first."""
  return sorted((r for r in results if r['score'] >= score_threshold), key=lambda r: -r['score'])


def _prediction_shape(r: dict, masks: tuple[dict, dict], factor: int, rgb, dashed=False):
  amodal, visible = masks
  layer = r.get('depth_layer')
  text = (f'{int(layer)} \u00b7 ' if layer is not None else '') + f'{r["score"]:.2f}'
  return draw.Shape(
      amodal=_decode(amodal, factor),
      visible=_decode(visible, factor) & _decode(amodal, factor),
      rgb=rgb,
      box=_box(amodal, factor),
      # Back to front by layer; among equal layers the higher score on top.
      depth=float(layer if layer is not None else 0) + 1e-3 * (1.0 - float(r['score'])),
      text=('FP ' if dashed else '') + text,
      dashed=dashed,
  )


def _canvas(image: np.ndarray) -> tuple[np.ndarray, int]:
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  factor = draw.scale_factor(*image.shape[:2])
  return draw.enlarge(image, factor), factor


def prediction_picture(
    image: np.ndarray,
    results: Sequence[dict],
    score_threshold: float = 0.0,
    title: Optional[str] = None,
) -> np.ndarray:
  """(H', W', 3) uint8: ``results`` with ``score >= score_threshold`` over
  ``image`` (H, W, 3) uint8, captioned, with the legend underneath; H', W'
  >= the enlarged image."""
  canvas, factor = _canvas(image)
  h, w = image.shape[:2]
  kept = kept_results(results, score_threshold)
  shapes = [
      _prediction_shape(r, _masks(r, h, w), factor, draw.colour(n)) for n, r in enumerate(kept)
  ]
  panel = draw.draw_shapes(canvas, shapes, hatch_period=max(3, 2 * factor))
  if title is None:
    title = f'prediction: {len(kept)} objects (score \u2265 {score_threshold:.2f})'
  top = draw.caption(panel, title)
  return np.asarray(
      draw.stack(top, draw.legend(top.width, PREDICTION_LABELS, items=draw.LEGEND_ITEMS[:3]))
  )


def _truth_masks(annotation: Any) -> list[tuple[dict, dict]]:
  h, w, where = int(annotation.height), int(annotation.width), f'image {annotation.image_id}'
  return [
      (
          as_rle(inst.amodal_rle, h, w, 'ground truth', f'{where}.amodal'),
          as_rle(inst.visible_rle, h, w, 'ground truth', f'{where}.visible'),
      )
      for inst in annotation.instances
  ]


def _truth_shapes(
    annotation: Any, masks: Sequence[tuple[dict, dict]], factor: int, matched=None
) -> list[draw.Shape]:
  """Ground-truth object g in colour g, labelled with its depth rank;
  with ``matched`` (a set of indices) the others are dashed, "missed"."""
  shapes = []
  for g, (inst, (amodal, visible)) in enumerate(zip(annotation.instances, masks)):
    missed = matched is not None and g not in matched
    shapes.append(
        draw.Shape(
            amodal=_decode(amodal, factor),
            visible=_decode(visible, factor) & _decode(amodal, factor),
            rgb=draw.colour(g),
            box=_box(amodal, factor),
            depth=float(inst.depth_rank),
            text=('missed ' if missed else '') + str(int(inst.depth_rank)),
            dashed=missed,
        )
    )
  return shapes


def ground_truth_picture(image: np.ndarray, annotation: Any) -> np.ndarray:
  """(H', W', 3) uint8: one image's ground truth (``records.ImageAnnotation``)
  over ``image`` (H, W, 3) uint8, labelled with depth ranks, captioned, with
  the legend underneath."""
  canvas, factor = _canvas(_checked_image(image, annotation))
  truth = _truth_shapes(annotation, _truth_masks(annotation), factor)
  panel = draw.draw_shapes(canvas, truth, max(3, 2 * factor))
  top = draw.caption(panel, f'ground truth: {len(truth)} objects')
  return np.asarray(
      draw.stack(top, draw.legend(top.width, TRUTH_LABELS, items=draw.LEGEND_ITEMS[:3]))
  )


def _checked_image(image: np.ndarray, annotation: Any) -> np.ndarray:
  h, w = int(annotation.height), int(annotation.width)
  if np.shape(image)[:2] != (h, w):
    raise ValueError(
        f'image is {np.shape(image)[:2]}, annotation {annotation.image_id} is {(h, w)}'
    )
  return image


def comparison_shapes(
    annotation: Any,
    results: Sequence[dict],
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    factor: int = 1,
) -> tuple[list[draw.Shape], list[draw.Shape], dict]:
  """What ``comparison_picture`` draws, at ``factor`` times the image size.

  Returns (ground-truth shapes in annotation order, prediction shapes of the
  results with ``score >= score_threshold``, highest score first, counts
  {'matched', 'false_positives', 'missed'}). Ground-truth object g has
  colour g; a matched prediction takes its object's colour, the others
  continue the palette, dashed and tagged "FP"; unmatched ground truth is
  dashed and tagged "missed".
  """
  h, w = int(annotation.height), int(annotation.width)
  kept = kept_results(results, score_threshold)
  pred_masks = [_masks(r, h, w) for r in kept]
  gt_masks = _truth_masks(annotation)
  _, det_of_gt = match_masks([m[0] for m in pred_masks], [m[0] for m in gt_masks], iou_threshold)
  gt_of_det = {row: g for g, row in det_of_gt.items()}
  truth = _truth_shapes(annotation, gt_masks, factor, matched=set(det_of_gt))
  preds, spare = [], len(gt_masks)
  for row, r in enumerate(kept):
    if row in gt_of_det:
      rgb = draw.colour(gt_of_det[row])
    else:
      rgb, spare = draw.colour(spare), spare + 1
    preds.append(_prediction_shape(r, pred_masks[row], factor, rgb, dashed=row not in gt_of_det))
  counts = {
      'matched': len(det_of_gt),
      'false_positives': len(kept) - len(det_of_gt),
      'missed': len(gt_masks) - len(det_of_gt),
  }
  return truth, preds, counts


def comparison_picture(
    image: np.ndarray,
    annotation: Any,
    results: Sequence[dict],
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> np.ndarray:
  """(H', W', 3) uint8: ground truth (left) and prediction (right) of one
  image, captioned, with the legend underneath (``comparison_shapes``).

  Args:
    image: (H, W, 3) uint8, the annotation's height and width.
    annotation: ``records.ImageAnnotation`` (instances with amodal_rle,
      visible_rle, depth_rank).
    results: that image's results; those with ``score >= score_threshold``
      are drawn and matched.
  """
  canvas, factor = _canvas(_checked_image(image, annotation))
  truth, preds, counts = comparison_shapes(
      annotation, results, score_threshold, iou_threshold, factor
  )
  period = max(3, 2 * factor)
  left = draw.caption(
      draw.draw_shapes(canvas, truth, period),
      f'ground truth: {len(truth)} objects, {counts["missed"]} missed',
  )
  right = draw.caption(
      draw.draw_shapes(canvas, preds, period),
      f'prediction (score \u2265 {score_threshold:.2f}): {counts["matched"]} matched, '
      f'{counts["false_positives"]} FP',
  )
  top = draw.side_by_side([left, right])
  return np.asarray(draw.stack(top, draw.legend(top.width, COMPARISON_LABELS)))


def save_png(picture: np.ndarray, f) -> None:
  """Writes ``picture`` (H, W, 3) uint8 as PNG to the open binary file ``f``."""
  Image.fromarray(picture).save(f, format='PNG')
