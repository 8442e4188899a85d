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
methods report "occluded mIoU".
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
    ious = np.asarray(
        mask_utils.iou([d['amodal'] for _, d in kept], g_rles, [0] * len(g_rles))
    ).reshape(len(kept), -1)
    det_of_gt: dict[int, int] = {}
    for row, (k, _) in enumerate(kept):
      cand = [
          (ious[row, g], g)
          for g in range(len(g_rles))
          if g not in det_of_gt and ious[row, g] >= iou_threshold
      ]
      if cand:
        det_of_gt[max(cand)[1]] = k
    yield ann, local, g_rles, det_of_gt


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


def mask_quality(
    gt: Sequence,
    results: Sequence[dict],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    min_occluded_px: int = 20,
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
  """
  dets = check_results(results, gt, results_path)
  amodal_ious, visible_ious, occluded_ious = [], [], []
  hidden_px = np.zeros(3, np.int64)  # predicted visible, occluded, absent
  for ann, _, g_rles, det_of_gt in _matches(gt, dets, score_threshold, iou_threshold):
    for g, k in det_of_gt.items():
      inst = ann.instances[g]
      truth = _decode(g_rles[g])
      pred = _decode(dets[k]['amodal'])
      amodal_ious.append(_iou(pred, truth))
      if dets[k].get('visible') is None:
        continue
      where = f'image {int(ann.image_id)}'
      true_visible = _decode(
          as_rle(inst.visible_rle, ann.height, ann.width, 'ground truth', f'{where}.visible_rle')
      )
      visible = _decode(dets[k]['visible']) & pred
      visible_ious.append(_iou(visible, true_visible))
      hidden = truth & _decode(
          as_rle(inst.occluded_rle, ann.height, ann.width, 'ground truth', f'{where}.occluded_rle')
      )
      if hidden.sum() >= min_occluded_px:
        occluded_ious.append(_iou(pred & ~visible, hidden))
      hidden_px += [
          np.count_nonzero(hidden & visible),
          np.count_nonzero(hidden & pred & ~visible),
          np.count_nonzero(hidden & ~pred),
      ]
  mean = lambda v: float(np.mean(v)) if v else -1.0
  total = int(hidden_px.sum())
  shares = (hidden_px / total).tolist() if total else [-1.0] * 3
  return {
      'min_occluded_px': int(min_occluded_px),
      'matched': len(amodal_ious),
      'amodal_miou': mean(amodal_ious),
      'visible_miou': mean(visible_ious),
      'occluded': len(occluded_ious),
      'occluded_miou': mean(occluded_ious),
      'hidden_pixels': dict(zip(('visible', 'occluded', 'absent'), shares)),
  }


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
