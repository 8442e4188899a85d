"""Occlusion metrics of matched detections: depth order and mask quality.

Matching (shared by every metric here): per image, detections with ``score >=
score_threshold`` are matched greedily, highest score first, to the unmatched
ground-truth object with the highest amodal mask IoU, if that IoU is ``>=
iou_threshold``. Depth order scores every pair of matched detections whose
ground-truth amodal masks intersect and whose ``depth_rank`` differ, either
from the results' ``depth_layer`` (the chained layers) or from pairwise
pixel votes of their visible and amodal masks (:func:`pairwise_votes`).
Mask quality is the mean IoU of matched pairs' amodal, visible and occluded
(amodal minus visible) masks; the occluded part is scored where the ground
truth hides at least ``min_occluded_px`` pixels, as box-prompted amodal
methods report "occluded mIoU". The same per-object rule
(:func:`object_quality`, :func:`quality_means`) scores box-prompted
predictions (:func:`prompted_quality`, ``evaluation/box_prompted.py``), each
against the object whose box it was given, without matching.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from sln_jax.errors import UserError
from sln_jax.evaluation import results as results_lib
from sln_jax.evaluation.results_check import as_rle, check_results


def _matches(
    gt: Sequence, dets: Sequence[dict], score_threshold: float, iou_threshold: float
) -> Iterator[tuple[Any, dict, list, dict]]:
  """Per image with ground truth and kept detections: (annotation, local:
  result index -> position among the image's results, ground-truth amodal
  RLEs, det_of_gt: ground-truth index -> matched result index)."""
  by_image: dict[int, list] = {}
  for k, d in enumerate(dets):
    by_image.setdefault(d['image_id'], []).append((k, d))
  for ann in gt:
    image_id = int(ann.image_id)
    image_dets = by_image.get(image_id, [])
    if not ann.instances or not image_dets:
      continue
    # Position of each detection among this image's detections (results order).
    local = {k: i for i, (k, _) in enumerate(image_dets)}
    kept = [(k, d) for k, d in image_dets if d['score'] >= score_threshold]
    kept.sort(key=lambda kd: -kd[1]['score'])
    if not kept:
      continue
    g_rles = [
        as_rle(i.amodal_rle, ann.height, ann.width, 'ground truth', f'image {image_id}.amodal_rle')
        for i in ann.instances
    ]
    _, matched = match_masks([d['amodal'] for _, d in kept], g_rles, iou_threshold)
    det_of_gt = {g: kept[row][0] for g, row in matched.items()}
    yield ann, local, g_rles, det_of_gt


def match_masks(
    det_rles: Sequence[dict], gt_rles: Sequence[dict], iou_threshold: float
) -> tuple[np.ndarray, dict[int, int]]:
  """One image's detections (RLEs, highest score first) matched to its
  ground-truth objects by amodal mask IoU.

  Returns (ious (D, G), ``greedy_match(ious, iou_threshold)``); either side
  may be empty.
  """
  ious = np.zeros((len(det_rles), len(gt_rles)))
  if len(det_rles) and len(gt_rles):
    ious = np.asarray(mask_utils.iou(list(det_rles), list(gt_rles), [0] * len(gt_rles))).reshape(
        len(det_rles), len(gt_rles)
    )
  return ious, greedy_match(ious, iou_threshold)


def greedy_match(ious: np.ndarray, iou_threshold: float) -> dict[int, int]:
  """The matching rule of this module for one image.

  Args:
    ious: (D, G) amodal mask IoU of D detections, highest score first, with
      G ground-truth objects.

  Returns ``{ground-truth index: detection row}``: each detection in turn
  takes the unmatched ground-truth object of highest IoU, if that IoU is
  ``>= iou_threshold`` (ties: the higher index).
  """
  det_of_gt: dict[int, int] = {}
  for row in range(ious.shape[0]):
    cand = [
        (ious[row, g], g)
        for g in range(ious.shape[1])
        if g not in det_of_gt and ious[row, g] >= iou_threshold
    ]
    if cand:
      det_of_gt[max(cand)[1]] = row
  return det_of_gt


def depth_order_accuracy(
    gt: Sequence,
    results: Sequence[dict],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    pairwise: Optional[Mapping[int, np.ndarray]] = None,
    results_path: str = 'results',
) -> dict:
  """Share of correctly ordered pairs of matched, overlapping objects.

  Per image: detections with ``score >= score_threshold`` are matched greedily
  (highest score first) to the unmatched GT with the highest amodal IoU, if
  that IoU is ``>= iou_threshold``. Every pair of matched detections whose GT
  objects' amodal masks intersect and whose GT ``depth_rank`` differ (lower =
  in front) is scored. The predicted order of detections a, b is, when
  ``pairwise`` is given, ``pairwise[image_id][a, b]`` (+1: a in front of b,
  -1 behind, 0 undecided; a, b index that image's detections in results order),
  otherwise from ``depth_layer`` (lower = in front). Undecided (equal layers,
  0) counts as wrong.

  Returns ``{'accuracy': float (-1 if no pair), 'correct': int, 'wrong':
  int, 'undecided': int, 'pairs': int}`` (correct + wrong + undecided =
  pairs) and ``'things'``: {'accuracy', 'correct', 'pairs'} over the pairs
  of two things (neither ``is_stuff``), which a background region does not
  make easy.
  """
  dets = check_results(results, gt, results_path)
  tally = {1: 0, -1: 0, 0: 0}  # right, wrong, undecided
  things = [0, 0]  # right, pairs
  for ann, local, g_rles, det_of_gt in _matches(gt, dets, score_threshold, iou_threshold):
    image_id = int(ann.image_id)
    overlap = (
        np.asarray(mask_utils.iou(g_rles, g_rles, [0] * len(g_rles))).reshape(len(g_rles), -1) > 0
    )
    matched = sorted(det_of_gt)
    for x, gi in enumerate(matched):
      for gj in matched[x + 1 :]:
        ri, rj = ann.instances[gi].depth_rank, ann.instances[gj].depth_rank
        if not overlap[gi, gj] or ri == rj:
          continue
        a, b = det_of_gt[gi], det_of_gt[gj]
        pred = _predicted_order(dets, a, b, local, image_id, pairwise, results_path)
        outcome = pred * (1 if ri < rj else -1)
        tally[outcome] += 1
        if not (ann.instances[gi].is_stuff or ann.instances[gj].is_stuff):
          things[0] += outcome == 1
          things[1] += 1
  pairs = sum(tally.values())
  return {
      'accuracy': tally[1] / pairs if pairs else -1.0,
      'correct': tally[1],
      'wrong': tally[-1],
      'undecided': tally[0],
      'pairs': pairs,
      'things': {
          'accuracy': things[0] / things[1] if things[1] else -1.0,
          'correct': int(things[0]),
          'pairs': things[1],
      },
  }


def format_depth_order(depth: Mapping[str, Any]) -> str:
  """One line for a :func:`depth_order_accuracy` result."""
  if not depth['pairs']:
    return 'depth order: no matched pair of overlapping objects to score'
  line = (
      f"depth order: {depth['correct']}/{depth['pairs']} pairs of matched, "
      f"overlapping objects ordered right, {depth['wrong']} wrong, "
      f"{depth['undecided']} undecided (accuracy {depth['accuracy']:.3f})"
  )
  things = depth.get('things')
  if things and things['pairs'] and things['pairs'] < depth['pairs']:
    line += (
        f"; pairs of two things {things['correct']}/{things['pairs']} ({things['accuracy']:.3f})"
    )
  return line


def _predicted_order(dets, a, b, local, image_id, pairwise, path) -> int:
  if pairwise is not None:
    if image_id not in pairwise:
      raise UserError(f'no pairwise order for image {image_id}', field='pairwise')
    return int(np.sign(pairwise[image_id][local[a], local[b]]))
  for k in (a, b):
    if 'depth_layer' not in dets[k]:
      raise UserError('missing (needed for depth order)', path=path, field=f'[{k}].depth_layer')
  la, lb = dets[a]['depth_layer'], dets[b]['depth_layer']
  return int(np.sign(lb - la))


def _decode(rle: dict) -> np.ndarray:
  return mask_utils.decode(rle).astype(bool)


def pairwise_votes(results: Sequence[dict]) -> dict[int, np.ndarray]:
  """{image_id: (N, N) int64 votes} of each image's results (in results
  order) from their masks: a pixel where both are present and one is
  visible while the other is hidden (amodal, not visible) votes for the
  visible one in front (``results.pairwise_votes_crops`` over each
  result's box). Takes checked results (``check_results``: 'amodal' and
  'visible' RLEs); a result without a visible mask is hidden nowhere."""
  by_image: dict[int, list] = {}
  for d in results:
    by_image.setdefault(d['image_id'], []).append(d)
  out = {}
  for image_id, dets in by_image.items():
    maps, boxes = [], []
    for d in dets:
      x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(d['amodal']))
      box = (y, x, y + max(h, 1), x + max(w, 1))
      window = np.s_[box[0] : box[2], box[1] : box[3]]
      amodal = _decode(d['amodal'])[window]
      visible = amodal if d.get('visible') is None else _decode(d['visible'])[window] & amodal
      maps.append(np.where(visible, 0, np.where(amodal, 1, -1)).astype(np.int8))
      boxes.append(box)
    out[image_id] = results_lib.pairwise_votes_crops(maps, boxes)
  return out


MIN_OCCLUDED_PX = 20  # default min_occluded_px: smaller hidden parts are not scored


def truth_masks(ann, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ground truth of instance ``g`` of ``ann`` (records.ImageAnnotation) as
  (height, width) bool masks: (amodal, visible, hidden), hidden = amodal
  and the annotated occluded part."""
  inst = ann.instances[g]
  where = f'image {int(ann.image_id)}'
  rle = lambda seg, name: as_rle(seg, ann.height, ann.width, 'ground truth', f'{where}.{name}')
  amodal = _decode(rle(inst.amodal_rle, 'amodal_rle'))
  visible = _decode(rle(inst.visible_rle, 'visible_rle'))
  hidden = amodal & _decode(rle(inst.occluded_rle, 'occluded_rle'))
  return amodal, visible, hidden


def object_quality(
    pred_amodal: np.ndarray,
    pred_visible: Optional[np.ndarray],
    truth: tuple[np.ndarray, np.ndarray, np.ndarray],
    min_occluded_px: int = MIN_OCCLUDED_PX,
) -> dict:
  """One predicted object against its ground truth (all (H, W) bool).

  Args:
    pred_amodal: the predicted amodal mask; pred_visible: the predicted
      visible mask (None: the prediction has none), counted inside
      ``pred_amodal`` only.
    truth: :func:`truth_masks` (amodal, visible, hidden).

  Returns ``{'amodal_iou': float, 'visible_iou': float or None (no
  predicted visible mask), 'occluded_iou': float or None (no predicted
  visible mask, or fewer than min_occluded_px hidden ground-truth pixels):
  IoU of the predicted occluded part (amodal minus visible) with the hidden
  pixels, 'hidden_pixels': [in the predicted visible mask, in the predicted
  occluded part, outside the predicted amodal mask]: counts of the ground
  truth's hidden pixels (zeros without a predicted visible mask)}``. An IoU
  of two empty masks is 1.
  """
  amodal, visible_truth, hidden = truth
  out = {
      'amodal_iou': _iou(pred_amodal, amodal),
      'visible_iou': None,
      'occluded_iou': None,
      'hidden_pixels': [0, 0, 0],
  }
  if pred_visible is None:
    return out
  visible = pred_visible & pred_amodal
  out['visible_iou'] = _iou(visible, visible_truth)
  if np.count_nonzero(hidden) >= min_occluded_px:
    out['occluded_iou'] = _iou(pred_amodal & ~visible, hidden)
  out['hidden_pixels'] = [
      int(np.count_nonzero(hidden & visible)),
      int(np.count_nonzero(hidden & pred_amodal & ~visible)),
      int(np.count_nonzero(hidden & ~pred_amodal)),
  ]
  return out


def quality_means(objects: Sequence[Mapping[str, Any]]) -> dict:
  """Means of :func:`object_quality` records: ``{'amodal_miou': over all,
  'visible_miou': over those with a visible IoU, 'occluded': int, the number
  with an occluded IoU, 'occluded_miou': over those, 'hidden_pixels':
  {'visible', 'occluded', 'absent'}: shares of all their hidden pixels}``.
  A mean over none is -1, and so are the shares when no pixel is hidden."""
  mean = lambda v: float(np.mean(v)) if v else -1.0
  occluded = [o['occluded_iou'] for o in objects if o['occluded_iou'] is not None]
  hidden_px = np.sum([o['hidden_pixels'] for o in objects], axis=0, dtype=np.int64).reshape(-1)
  total = int(hidden_px.sum())
  shares = (hidden_px / total).tolist() if total else [-1.0] * 3
  return {
      'amodal_miou': mean([o['amodal_iou'] for o in objects]),
      'visible_miou': mean([o['visible_iou'] for o in objects if o['visible_iou'] is not None]),
      'occluded': len(occluded),
      'occluded_miou': mean(occluded),
      'hidden_pixels': dict(zip(('visible', 'occluded', 'absent'), shares)),
  }


def mask_quality(
    gt: Sequence,
    results: Sequence[dict],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    min_occluded_px: int = MIN_OCCLUDED_PX,
    results_path: str = 'results',
) -> dict:
  """Mean IoU of matched detections' masks with their ground truth.

  Returns ``{'min_occluded_px', 'matched': int, 'amodal_miou', 'visible_miou': float over the
  matched pairs, 'occluded': int pairs whose ground truth hides at least
  min_occluded_px pixels, 'occluded_miou': float over those,
  'hidden_pixels': {'visible', 'occluded', 'absent'}}``: where the matched
  detections put the pixels their ground truth hides (all of them, any
  count), as shares of those pixels: in the predicted visible mask, in the
  predicted occluded part, or outside the predicted amodal mask. A mean
  over no pair is -1, and so are the visible and occluded ones (and the
  shares) when the results carry no visible masks or nothing is hidden.
  Per pair: :func:`object_quality`; means: :func:`quality_means`.
  """
  dets = check_results(results, gt, results_path)
  objects = []
  for ann, _, _, det_of_gt in _matches(gt, dets, score_threshold, iou_threshold):
    for g, k in det_of_gt.items():
      visible = dets[k].get('visible')
      objects.append(
          object_quality(
              _decode(dets[k]['amodal']),
              None if visible is None else _decode(visible),
              truth_masks(ann, g),
              min_occluded_px,
          )
      )
  return {
      'min_occluded_px': int(min_occluded_px),
      'matched': len(objects),
      **quality_means(objects),
  }


def prompted_quality(
    image_id: int,
    dets: Mapping[str, np.ndarray],
    image_scale: Sequence[float],
    ann,
    instance_of_slot: Sequence[int],
    *,
    mask_threshold: float = 0.5,
    mask_paste: str = 'aligned',
    min_occluded_px: int = MIN_OCCLUDED_PX,
) -> list[dict]:
  """Mask quality of one image's box-prompted predictions, each slot against
  the ground-truth object whose box it was given (no matching).

  Args:
    dets: ``SLN.infer_boxes`` outputs of one image (batch axis removed):
      boxes (N, 4) canvas pixels, valid (N,), amodal_probs and
      visible_probs (N, m, m), optionally layer_probs.
    image_scale: canvas pixels per original pixel (y, x).
    ann: the image's records.ImageAnnotation.
    instance_of_slot: (N,) index into ``ann.instances`` of the object each
      slot was prompted with; -1 for a slot that holds none.

  Returns one record per slot with an object, in slot order: ``{'image_id',
  'instance': index into ann.instances, 'occlude_rate': the ground truth's,
  **object_quality}``. Each slot's masks are pasted into original pixels
  by ``results.detections_to_results`` on that slot alone (the paste of
  ``eval.mask_paste`` at ``mask_threshold``); a slot whose integer box is
  empty predicts empty masks.
  """
  h, w = int(ann.height), int(ann.width)
  out = []
  for j, g in enumerate(int(v) for v in instance_of_slot):
    if g < 0:
      continue
    got = results_lib.detections_to_results(
        image_id,
        {k: np.asarray(v)[j : j + 1] for k, v in dets.items()},
        image_scale,
        (h, w),
        mask_threshold=mask_threshold,
        mask_paste=mask_paste,
    )
    if got:
      amodal, visible = _decode(got[0]['segmentation']), _decode(got[0]['visible_mask'])
    else:
      amodal = visible = np.zeros((h, w), bool)
    out.append(
        {
            'image_id': int(image_id),
            'instance': g,
            'occlude_rate': float(ann.instances[g].occlude_rate),
            **object_quality(amodal, visible, truth_masks(ann, g), min_occluded_px),
        }
    )
  return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.count_nonzero(a | b)
  return np.count_nonzero(a & b) / union if union else 1.0


def occlusion_metrics(gt: Sequence, results: Sequence[dict], **kwargs) -> dict:
  """Depth order from the chained layers and from the pixel votes, and mask
  quality (``occlusion.json``): {'depth_order' (None when a result has no
  ``depth_layer``), 'depth_order_votes' (None when a result has no visible
  mask), 'masks'}."""
  dets = check_results(results, gt, kwargs.get('results_path', 'results'))
  layered = all('depth_layer' in d for d in dets)
  visible = all(d.get('visible') is not None for d in dets)
  votes = pairwise_votes(dets) if visible else None
  return {
      'depth_order': depth_order_accuracy(gt, dets, **kwargs) if layered else None,
      'depth_order_votes': (
          depth_order_accuracy(gt, dets, pairwise=votes, **kwargs) if visible else None
      ),
      'masks': mask_quality(gt, dets, **kwargs),
  }


def format_occlusion(report: Mapping[str, Any]) -> str:
  """Up to four lines for an :func:`occlusion_metrics` result: the depth
  orders it holds, and the masks' quality and where the hidden pixels went
  when the results carry visible masks ('' when neither)."""
  lines = []
  if report['depth_order'] is not None:
    lines.append(format_depth_order(report['depth_order']))
  if report['depth_order_votes'] is None:
    return '\n'.join(lines)
  votes = format_depth_order(report['depth_order_votes'])
  lines.append(votes.replace('depth order:', 'depth order (pixel votes):', 1))
  m = report['masks']
  lines.append(
      f"masks of {m['matched']} matched detections: amodal mIoU {m['amodal_miou']:.3f}, "
      f"visible mIoU {m['visible_miou']:.3f}, occluded-part mIoU {m['occluded_miou']:.3f} "
      f"({m['occluded']} objects hiding >= {m['min_occluded_px']} pixels)"
  )
  h = m['hidden_pixels']
  if h['visible'] >= 0:
    lines.append(
        f"hidden pixels of matched objects predicted visible {h['visible']:.3f}, "
        f"occluded {h['occluded']:.3f}, absent {h['absent']:.3f}"
    )
  return '\n'.join(lines)
