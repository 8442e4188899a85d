"""Final detections from the box head (release ``refine_detections``)."""

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from sln_jax.ops import boxes as box_ops
from sln_jax.ops import nms as nms_ops


def detect(
    rois: jnp.ndarray,
    class_probs: jnp.ndarray,
    deltas: jnp.ndarray,
    window: Sequence[float],
    *,
    bbox_std: Sequence[float],
    max_detections: int = 100,
    min_confidence: float = 0.0,
    nms_threshold: float = -1.0,
    roi_valid: Optional[jnp.ndarray] = None,
    nms_tile: int = 256,
) -> Dict[str, jnp.ndarray]:
  """Detections of one image.

  Per ROI: class = argmax of ``class_probs`` (first on ties), score = its
  probability, box = the ROI refined by that class's deltas (x bbox_std) and
  clipped to ``window``. Background (class 0), invalid ROIs and scores below
  ``min_confidence`` are dropped (the release applies min_confidence only
  with NMS; with its default 0 this is the same). With ``nms_threshold >=
  0`` (static) per-class greedy NMS runs first (release USE_NMS); the top
  ``max_detections`` survivors by score are returned. Unlike the release,
  boxes are not rounded to whole pixels (``SLN.infer`` rounds them under
  ``model.detection.round_boxes``).

  Args:
    rois: (R, 4) normalised (y1, x1, y2, x2).
    class_probs: (R, C) softmax probabilities.
    deltas: (R, C, 4) class-specific deltas (before x std).
    window: (4,) normalised valid image area (y1, x1, y2, x2).
    roi_valid: optional (R,) bool; padded ROIs never become detections.

  Returns:
    dict with D = max_detections slots sorted by decreasing score:
      boxes (D, 4) float32 normalised, scores (D,) float32,
      classes (D,) int32, valid (D,) bool, roi_index (D,) int32;
      unused slots are zeros / False.
  """
  rois = jnp.asarray(rois, jnp.float32)
  deltas = jnp.asarray(deltas, jnp.float32)
  r = rois.shape[0]
  probs = jnp.asarray(class_probs, jnp.float32)
  classes = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  scores = jnp.take_along_axis(probs, classes[:, None], axis=-1)[:, 0]
  d = jnp.take_along_axis(deltas, classes[:, None, None], axis=1)[:, 0]
  boxes = box_ops.decode(d, rois, bbox_std)
  boxes = box_ops.clip(boxes, jnp.asarray(window, jnp.float32))
  keep = (classes > 0) & (scores >= min_confidence)
  if roi_valid is not None:
    keep &= roi_valid
  ranked = jnp.where(keep, scores, -jnp.inf)
  if nms_threshold >= 0:
    idx, valid = nms_ops.nms_padded(
        boxes, ranked, max_detections, nms_threshold, groups=classes, tile=nms_tile
    )
  else:
    k = min(max_detections, r)
    top, idx = jax.lax.top_k(ranked, k)
    valid = top > -jnp.inf
    pad = max_detections - k
    idx = jnp.pad(idx.astype(jnp.int32), (0, pad))
    valid = jnp.pad(valid, (0, pad))
  idx = jnp.where(valid, idx, 0).astype(jnp.int32)
  return dict(
      boxes=jnp.where(valid[:, None], boxes[idx], 0.0),
      scores=jnp.where(valid, scores[idx], 0.0),
      classes=jnp.where(valid, classes[idx], 0),
      valid=valid,
      roi_index=idx,
  )


def batched_detect(
    rois, class_probs, deltas, window, *, roi_valid=None, **kwargs
) -> Dict[str, jnp.ndarray]:
  """:func:`detect` over a batch: rois (B, R, 4), class_probs (B, R, C),
  deltas (B, R, C, 4), window (B, 4) [, roi_valid (B, R)] -> (B, D, ...)."""
  if roi_valid is None:
    roi_valid = jnp.ones(jnp.shape(rois)[:2], bool)

  def one(r, p, d, w, v):
    return detect(r, p, d, w, roi_valid=v, **kwargs)

  return jax.vmap(one)(rois, class_probs, deltas, window, roi_valid)
