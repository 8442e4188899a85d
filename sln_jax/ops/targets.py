"""Training targets: RPN anchor labels, ROI sampling, layered mask targets,
global layering maps.

Per-image functions with static shapes and explicit PRNG keys, plus
``batched_*`` wrappers (vmap, one key split per image). Boxes are
(y1, x1, y2, x2); each function only needs its box arguments to share units
(the model passes normalised coordinates). Deltas are
:func:`boxes.encode` divided by ``bbox_std``. Random subsets are drawn by
ranking uniform keys with ``lax.top_k`` (a uniform subset, like the
release's ``np.random.choice`` / ``torch.randperm``). COCO crowd boxes
(negative class ids) are not special-cased: the pipeline has none.
"""

from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from sln_jax.ops import boxes as box_ops
from sln_jax.ops import roi_align


def _masked_iou(a, b, b_valid):
  """(N, M) IoU with invalid columns at -1 (never a max, never >= a bar)."""
  return jnp.where(b_valid[None, :], box_ops.iou(a, b), -1.0)


def _random_subset(rng, mask, k, limit=None):
  """Up to ``limit`` (default k) random True entries of ``mask``.

  Returns (idx (k,) int32, chosen (k,) bool): ``idx[:n]`` are distinct
  random indices of True entries, n = min(sum(mask), limit), ``chosen`` marks
  them; the chosen ones come first.
  """
  keys = jnp.where(mask, jax.random.uniform(rng, mask.shape), -1.0)
  vals, idx = jax.lax.top_k(keys, k)
  chosen = vals >= 0.0
  if limit is not None:
    chosen &= jnp.arange(k) < limit
  return idx.astype(jnp.int32), chosen


def rpn_targets(
    rng: jax.Array,
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    *,
    positive_iou: float = 0.7,
    negative_iou: float = 0.3,
    num_samples: int = 256,
    positive_fraction: float = 0.5,
    bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """RPN anchor labels and deltas of one image (release build_rpn_targets).

  Max IoU < negative_iou -> negative; each valid GT's best anchor (first on
  ties) and every anchor with max IoU >= positive_iou -> positive (wins over
  negative). Then at most ``int(num_samples * positive_fraction)`` random
  positives are kept and at most ``num_samples - #positives`` random
  negatives; the rest become ignored. A GT that overlaps no anchor at all
  (IoU 0, e.g. an empty box) claims no anchor (the release would make
  anchor 0 positive with an infinite target).

  Args:
    rng: PRNG key.
    anchors: (A, 4) boxes with positive size.
    gt_boxes: (M, 4) boxes, same units; padding anywhere with gt_valid False.
    gt_valid: (M,) bool.

  Returns:
    labels: (A,) int32, 1 positive, 0 negative, -1 ignored.
    deltas: (A, 4) float32 targets ``encode(gt, anchor) / bbox_std`` to the
      anchor's best GT, zeros except on positives.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)
  a = anchors.shape[0]
  overlaps = _masked_iou(anchors, gt_boxes, gt_valid)  # (A, M)
  best_gt = jnp.argmax(overlaps, axis=1)
  best_iou = jnp.max(overlaps, axis=1)
  negative = best_iou < negative_iou
  gt_best = jnp.argmax(overlaps, axis=0)  # (M,)
  claims = gt_valid & (jnp.max(overlaps, axis=0) > 0.0)
  positive = jnp.zeros((a,), bool).at[jnp.where(claims, gt_best, a)].set(True, mode='drop')
  positive |= best_iou >= positive_iou
  negative &= ~positive

  rng_pos, rng_neg = jax.random.split(rng)
  max_pos = int(num_samples * positive_fraction)
  idx, chosen = _random_subset(rng_pos, positive, min(max_pos, a))
  positive = jnp.zeros((a,), bool).at[idx].set(chosen)
  limit = num_samples - jnp.sum(positive)
  idx, chosen = _random_subset(rng_neg, negative, min(num_samples, a), limit)
  negative = jnp.zeros((a,), bool).at[idx].set(chosen)

  labels = jnp.where(positive, 1, jnp.where(negative, 0, -1)).astype(jnp.int32)
  matched = jnp.where(
      positive[:, None], gt_boxes[best_gt].astype(jnp.float32), anchors.astype(jnp.float32)
  )
  deltas = box_ops.encode(matched, anchors, bbox_std)
  deltas = jnp.where(positive[:, None], deltas, 0.0)
  return labels, deltas


def negative_counts(num_rois: int, positive_ratio: float) -> Tuple[int, ...]:
  """Release negatives per positive count: ``int(pc / ratio - pc)``.

  Index pc in [0, int(num_rois * positive_ratio)], Python float arithmetic
  exactly as the release (100 ROIs at 0.7: 70 -> 30).
  """
  r = 1.0 / positive_ratio
  max_pos = int(num_rois * positive_ratio)
  return tuple(min(int(r * pc - pc), num_rois - pc) for pc in range(max_pos + 1))


def sample_rois(
    rng: jax.Array,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_classes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    *,
    num_rois: int = 100,
    positive_ratio: float = 0.7,
    fg_iou: float = 0.5,
    bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    include_gt: bool = False,
) -> Dict[str, jnp.ndarray]:
  """Samples head ROIs of one image (release detection_target_layer).

  Positives: valid proposals with max IoU >= fg_iou, a random subset of at
  most ``int(num_rois * positive_ratio)``; each matched to its best GT (first
  on ties). Negatives: valid proposals with max IoU < fg_iou, a random
  subset of ``negative_counts(...)[#positives]`` (none when there is no
  positive, as the release). Layout: positives, then negatives, then zero
  padding. The release does not add GT boxes to the proposals
  (``include_gt=False``); ``include_gt=True`` appends the valid GT boxes as
  extra proposals (Detectron-style).

  Args:
    rng: PRNG key.
    proposals: (P, 4) boxes.
    proposal_valid: (P,) bool.
    gt_boxes: (M, 4) boxes, same units.
    gt_classes: (M,) int32 class ids (> 0).
    gt_valid: (M,) bool.

  Returns:
    dict of (R = num_rois):
      rois (R, 4) float32, zeros where not valid;
      valid (R,) bool: sampled (positive or negative);
      positive (R,) bool;
      class_targets (R,) int32: GT class on positives, 0 elsewhere;
      bbox_targets (R, 4) float32: ``encode(gt, roi) / bbox_std`` on
        positives, 0 elsewhere;
      matched_gt (R,) int32: GT index on positives, 0 elsewhere.
  """
  proposals = jnp.asarray(proposals, jnp.float32)
  proposal_valid = jnp.asarray(proposal_valid, bool)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = jnp.asarray(gt_classes, jnp.int32)
  gt_valid = jnp.asarray(gt_valid, bool)
  if include_gt:
    proposals = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)])
    proposal_valid = jnp.concatenate([proposal_valid, gt_valid])
  p = proposals.shape[0]
  overlaps = _masked_iou(proposals, gt_boxes, gt_valid)  # (P, M)
  best_iou = jnp.max(overlaps, axis=1)
  positive = proposal_valid & (best_iou >= fg_iou)
  negative = proposal_valid & (best_iou < fg_iou)

  table = negative_counts(num_rois, positive_ratio)
  max_pos, max_neg = len(table) - 1, max(table)
  kp, kn = max(1, min(max_pos, p)), max(1, min(max_neg, p))
  rng_pos, rng_neg = jax.random.split(rng)
  pos_idx, pos_chosen = _random_subset(rng_pos, positive, kp, max_pos)
  pc = jnp.sum(pos_chosen).astype(jnp.int32)
  nc = jnp.asarray(table, jnp.int32)[pc]
  neg_idx, neg_chosen = _random_subset(rng_neg, negative, kn, nc)
  nc = jnp.sum(neg_chosen).astype(jnp.int32)

  slot = jnp.arange(num_rois, dtype=jnp.int32)
  is_pos = slot < pc
  is_neg = (slot >= pc) & (slot < pc + nc)
  src = jnp.where(
      is_pos, pos_idx[jnp.clip(slot, 0, kp - 1)], neg_idx[jnp.clip(slot - pc, 0, kn - 1)]
  )
  valid = is_pos | is_neg
  rois = jnp.where(valid[:, None], proposals[src].astype(jnp.float32), 0.0)
  matched = jnp.argmax(overlaps[src], axis=1).astype(jnp.int32)
  matched = jnp.where(is_pos, matched, 0)
  unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32)
  safe_rois = jnp.where(is_pos[:, None], rois, unit)
  gt = jnp.where(is_pos[:, None], gt_boxes[matched].astype(jnp.float32), safe_rois)
  deltas = box_ops.encode(gt, safe_rois, bbox_std)
  return dict(
      rois=rois,
      valid=valid,
      positive=is_pos,
      class_targets=jnp.where(is_pos, gt_classes[matched], 0).astype(jnp.int32),
      bbox_targets=jnp.where(is_pos[:, None], deltas, 0.0),
      matched_gt=matched,
  )


def mask_targets(
    gt_layers: jnp.ndarray,
    layer_boxes: jnp.ndarray,
    rois: jnp.ndarray,
    matched_gt: jnp.ndarray,
    mask_size: int = 32,
    positive: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
  """Layered mask targets of one image's ROIs.

  Each ROI's window is expressed in the frame of its GT's crop (0 at the
  crop box's first, 1 at its last edge, as the release's mini-mask path) and
  crop-and-resized (TF semantics) out of that crop, then rounded (half to
  even, as torch.round); samples outside the crop box are 0.
  ``gt_layers[m]`` must sample ``layer_boxes[m]`` with corner samples on the
  box edges (crop_and_resize alignment). Pass the tight mask boxes the crops
  were taken with (the batch's ``gt_layer_boxes``), not jittered matching
  boxes: a jittered edge that moved inward would cut the object there.

  Args:
    gt_layers: (M, K, K, L) per-GT layered masks cropped to layer_boxes.
    layer_boxes: (M, 4) the crop boxes of gt_layers, same units as ``rois``.
    rois: (R, 4) boxes.
    matched_gt: (R,) int32 GT index per ROI.
    mask_size: output side S.
    positive: optional (R,) bool; targets of other ROIs are zeroed.

  Returns:
    (R, S, S, L) float32 of 0/1.
  """
  matched_gt = jnp.asarray(matched_gt, jnp.int32)
  g = jnp.asarray(layer_boxes, jnp.float32)[matched_gt]
  r = jnp.asarray(rois, jnp.float32)
  gh = g[:, 2] - g[:, 0]
  gw = g[:, 3] - g[:, 1]
  gh = jnp.where(gh > 0, gh, 1.0)
  gw = jnp.where(gw > 0, gw, 1.0)
  rel = jnp.stack(
      [
          (r[:, 0] - g[:, 0]) / gh,
          (r[:, 1] - g[:, 1]) / gw,
          (r[:, 2] - g[:, 0]) / gh,
          (r[:, 3] - g[:, 1]) / gw,
      ],
      -1,
  )
  crops = roi_align.crop_and_resize_indexed(
      jnp.asarray(gt_layers, jnp.float32), rel, matched_gt, mask_size
  )
  crops = jnp.round(crops)
  if positive is not None:
    crops = jnp.where(positive[:, None, None, None], crops, 0.0)
  return crops


def per_image_keys(rng: jax.Array, n: int) -> jax.Array:
  """(n,) PRNG keys: ``rng`` split if it is one key, else ``rng`` itself
  (raw uint32 keys (2,) / (n, 2) or typed keys () / (n,))."""
  rng = jnp.asarray(rng)
  single = rng.ndim == 0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng.ndim == 1
  if single:
    return jax.random.split(rng, n)
  if rng.shape[0] != n:
    raise ValueError(f'{rng.shape[0]} keys for a batch of {n}')
  return rng


def batched_rpn_targets(rng, anchors, gt_boxes, gt_valid, **kwargs):
  """:func:`rpn_targets` over a batch: gt_boxes (B, M, 4), gt_valid (B, M),
  shared anchors (A, 4) -> labels (B, A), deltas (B, A, 4). ``rng``: one
  key (split per image) or (B,) per-image keys."""
  keys = per_image_keys(rng, gt_boxes.shape[0])
  return jax.vmap(lambda k, b, v: rpn_targets(k, anchors, b, v, **kwargs))(keys, gt_boxes, gt_valid)


def batched_sample_rois(rng, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, **kwargs):
  """:func:`sample_rois` over a batch (every input with a leading B axis;
  ``rng`` one key or (B,) keys)."""
  keys = per_image_keys(rng, proposals.shape[0])
  return jax.vmap(lambda *a: sample_rois(*a, **kwargs))(
      keys, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid
  )


def batched_mask_targets(gt_layers, layer_boxes, rois, matched_gt, mask_size=32, positive=None):
  """:func:`mask_targets` over a batch: gt_layers (B, M, K, K, L),
  layer_boxes (B, M, 4) (their crop boxes), rois (B, R, 4), matched_gt
  (B, R)[, positive (B, R)] -> (B, R, S, S, L)."""
  if positive is None:
    return jax.vmap(lambda a, b, c, d: mask_targets(a, b, c, d, mask_size))(
        gt_layers, layer_boxes, rois, matched_gt
    )
  return jax.vmap(lambda a, b, c, d, e: mask_targets(a, b, c, d, mask_size, e))(
      gt_layers, layer_boxes, rois, matched_gt, positive
  )


def layering_map_targets(
    gt_layers: jnp.ndarray,
    layer_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    grid: int,
    num_classes: int,
) -> jnp.ndarray:
  """Global layering map of one image: how many objects cover each cell.

  The map is the count of amodal masks over a ``grid`` x ``grid`` lattice
  of cells covering the canvas (cell (i, j) spans [i / grid, (i + 1) /
  grid) x [j / grid, (j + 1) / grid) in normalised canvas coordinates and
  is read at its centre), clipped to ``num_classes - 1`` (the last class is
  "that many or more"). Each instance's amodal mask is its layer crop summed
  over layers; the crop's K x K cells tile its box, and a centre inside the
  box reads the crop cell it falls in (nearest, so the map is exact up to a
  crop cell).

  Args:
    gt_layers: (M, K, K, L) per-instance layer crops of ``layer_boxes``.
    layer_boxes: (M, 4) normalised (y1, x1, y2, x2) crop boxes.
    gt_valid: (M,) bool.
    grid: G, cells per side (the P2 map's side: canvas / 4).
    num_classes: C >= 2.

  Returns:
    (G, G) int32 in [0, C - 1].
  """
  k = gt_layers.shape[1]
  amodal = jnp.clip(jnp.sum(jnp.asarray(gt_layers, jnp.float32), axis=-1), 0.0, 1.0)  # (M, K, K)
  centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid  # (G,)
  b = jnp.asarray(layer_boxes, jnp.float32)

  def axis(lo, hi):
    """(M,) box edges -> (M, G) crop cell index and inside flag."""
    extent = hi - lo
    u = (centres[None] - lo[:, None]) / jnp.where(extent > 0, extent, 1.0)[:, None]
    inside = (u >= 0) & (u < 1) & (extent > 0)[:, None]
    return jnp.clip(jnp.floor(u * k).astype(jnp.int32), 0, k - 1), inside

  iy, in_y = axis(b[:, 0], b[:, 2])
  ix, in_x = axis(b[:, 1], b[:, 3])
  rows = jnp.take_along_axis(amodal, iy[:, :, None], axis=1)  # (M, G, K)
  cells = jnp.take_along_axis(rows, ix[:, None, :], axis=2)  # (M, G, G)
  cover = (cells >= 0.5) & in_y[:, :, None] & in_x[:, None, :] & gt_valid[:, None, None]
  return jnp.minimum(jnp.sum(cover.astype(jnp.int32), axis=0), num_classes - 1)


def batched_layering_map_targets(gt_layers, layer_boxes, gt_valid, grid, num_classes):
  """:func:`layering_map_targets` over a batch (leading B axis) -> (B, G, G)."""
  return jax.vmap(lambda a, b, c: layering_map_targets(a, b, c, grid, num_classes))(
      gt_layers, layer_boxes, gt_valid
  )
