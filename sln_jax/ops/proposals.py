"""RPN proposals (release ``proposal_layer``), batched, static shapes."""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from sln_jax.ops import boxes as box_ops
from sln_jax.ops import nms as nms_ops


def generate_proposals(
    rpn_probs: jnp.ndarray,
    rpn_deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    *,
    pre_nms_topk: int,
    nms_threshold: float,
    post_nms_topk: int,
    bbox_std: Sequence[float],
    window: Optional[Sequence[float]] = None,
    nms_tile: int = 256,
    nms_pixel_scale: Optional[float] = None,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Top-k anchors by foreground score -> decoded, clipped boxes -> NMS.

  Args:
    rpn_probs: (B, A) foreground probability (or any monotone score).
    rpn_deltas: (B, A, 4) predicted (dy, dx, log dh, log dw), before x std.
    anchors: (A, 4) normalised (y1, x1, y2, x2) (anchors / canvas size).
    pre_nms_topk: anchors kept before NMS (min'd with A), release 6000.
    nms_threshold: IoU threshold, release 0.7.
    post_nms_topk: P, proposals kept after NMS, release 1000.
    bbox_std: (4,) delta multiplier, release (0.1, 0.1, 0.2, 0.2).
    window: normalised clip window (y1, x1, y2, x2); default the whole
      canvas (0, 0, 1, 1) as the release.
    nms_tile: tile size of :func:`nms.nms_padded`.
    nms_pixel_scale: None (default): NMS on plain IoU of the normalised
      boxes. The canvas side in pixels (release QUIRK,
      ``model.rpn.legacy_nms_plus_one``): NMS as the release's, on the boxes
      in canvas pixels with one pixel added to every width and height
      (:func:`nms.nms_padded` ``pixel_scale``). The rois stay normalised.

  Returns:
    rois: (B, P, 4) float32 normalised (y1, x1, y2, x2), by decreasing
      score, zeros in unused slots.
    valid: (B, P) bool.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  k = min(int(pre_nms_topk), anchors.shape[0])
  win = jnp.asarray((0.0, 0.0, 1.0, 1.0) if window is None else window, jnp.float32)

  def one(probs, deltas):
    scores, idx = jax.lax.top_k(probs.astype(jnp.float32), k)
    boxes = box_ops.decode(deltas[idx], anchors[idx], bbox_std)
    boxes = box_ops.clip(boxes, win)
    keep, valid = nms_ops.nms_padded(
        boxes,
        scores,
        post_nms_topk,
        nms_threshold,
        tile=nms_tile,
        pixel_scale=nms_pixel_scale,
        presorted=True,
    )  # top_k's order
    rois = jnp.where(valid[:, None], boxes[keep], 0.0)
    return rois, valid

  return jax.vmap(one)(rpn_probs, rpn_deltas)
