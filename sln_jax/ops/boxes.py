"""Box geometry in the release's (Matterport) convention.

Boxes are ``(y1, x1, y2, x2)`` with ``h = y2 - y1`` and ``w = x2 - x1`` (no
+1). Units are whatever the caller uses (pixels or coordinates normalised by
the canvas size) as long as both arguments of a function share them. Deltas
are ``(dy, dx, log dh, log dw)`` divided by a per-coordinate ``std``.
All functions are pure jax.numpy, broadcast over leading axes and jit-safe.
"""

import math
from typing import Optional, Sequence, Union

import jax.numpy as jnp

# Largest log-scale a decoded delta may apply (detectron2's bound, a 62.5x
# growth); keeps exp() finite so that no NaN box reaches NMS or ROI pooling.
DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16.0)

ArrayLike = Union[jnp.ndarray, Sequence[float], float]


def area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area of ``boxes (..., 4)``; flipped or empty boxes have area 0."""
  h = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  w = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return h * w


def encode(
    boxes: jnp.ndarray, anchors: jnp.ndarray, std: ArrayLike = (1.0, 1.0, 1.0, 1.0)
) -> jnp.ndarray:
  """Deltas that move ``anchors`` onto ``boxes`` (release ``box_refinement``).

  Args:
    boxes: (..., 4) target boxes (y1, x1, y2, x2).
    anchors: (..., 4) reference boxes, same units; must have h, w > 0.
    std: (4,) divisor of the deltas (e.g. config ``bbox_std``).

  Returns:
    (..., 4) float32 ``((cy - acy) / ah, (cx - acx) / aw, log(h / ah),
    log(w / aw)) / std``.
  """
  boxes = boxes.astype(jnp.float32)
  anchors = anchors.astype(jnp.float32)
  ah = anchors[..., 2] - anchors[..., 0]
  aw = anchors[..., 3] - anchors[..., 1]
  acy = anchors[..., 0] + 0.5 * ah
  acx = anchors[..., 1] + 0.5 * aw
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  cy = boxes[..., 0] + 0.5 * h
  cx = boxes[..., 1] + 0.5 * w
  deltas = jnp.stack([(cy - acy) / ah, (cx - acx) / aw, jnp.log(h / ah), jnp.log(w / aw)], axis=-1)
  return deltas / jnp.asarray(std, jnp.float32)


def decode(
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    std: ArrayLike = (1.0, 1.0, 1.0, 1.0),
    max_log_scale: Optional[float] = DEFAULT_MAX_LOG_SCALE,
) -> jnp.ndarray:
  """Applies ``deltas * std`` to ``anchors`` (release ``apply_box_deltas``).

  Args:
    deltas: (..., 4) (dy, dx, log dh, log dw), as predicted (before x std).
    anchors: (..., 4) boxes (y1, x1, y2, x2).
    std: (4,) multiplier of the deltas.
    max_log_scale: upper clamp of ``log dh`` and ``log dw`` after x std;
      None disables it (the release has none).

  Returns:
    (..., 4) float32 boxes; as the release, ``y2 = y1 + h`` and
    ``x2 = x1 + w``.
  """
  deltas = deltas.astype(jnp.float32) * jnp.asarray(std, jnp.float32)
  anchors = anchors.astype(jnp.float32)
  h = anchors[..., 2] - anchors[..., 0]
  w = anchors[..., 3] - anchors[..., 1]
  cy = anchors[..., 0] + 0.5 * h + deltas[..., 0] * h
  cx = anchors[..., 1] + 0.5 * w + deltas[..., 1] * w
  dh, dw = deltas[..., 2], deltas[..., 3]
  if max_log_scale is not None:
    dh = jnp.minimum(dh, max_log_scale)
    dw = jnp.minimum(dw, max_log_scale)
  h = h * jnp.exp(dh)
  w = w * jnp.exp(dw)
  y1 = cy - 0.5 * h
  x1 = cx - 0.5 * w
  return jnp.stack([y1, x1, y1 + h, x1 + w], axis=-1)


def iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Pairwise intersection over union.

  Args:
    a: (..., N, 4) boxes (y1, x1, y2, x2).
    b: (..., M, 4) boxes, same units and leading axes (broadcastable).

  Returns:
    (..., N, M) float32 IoU; 0 wherever either box has no area (padding,
    empty or flipped boxes).
  """
  a = a.astype(jnp.float32)[..., :, None, :]
  b = b.astype(jnp.float32)[..., None, :, :]
  ih = jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0])
  iw = jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1])
  inter = jnp.maximum(ih, 0.0) * jnp.maximum(iw, 0.0)
  area_a, area_b = area(a), area(b)
  union = area_a + area_b - inter
  ok = (area_a > 0) & (area_b > 0) & (union > 0)
  return jnp.where(ok, inter / jnp.where(ok, union, 1.0), 0.0)


def iou_plus_one(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Pairwise IoU with the py-faster-rcnn "+1" pixel convention.

  A box spans ``y2 - y1 + 1`` by ``x2 - x1 + 1`` pixels (inclusive integer
  corners), so a zero-width box still has an area of one pixel column. As the
  release's NMS (``nms/src/cuda/nms_kernel.cu`` ``devIoU``, ``pth_nms.py``):
  intersection sides ``max(min(b2) - max(b1) + 1, 0)``, IoU
  ``inter / (area_a + area_b - inter)``. Only meaningful in pixel units.

  Args:
    a: (..., N, 4) boxes (y1, x1, y2, x2) in pixels.
    b: (..., M, 4) boxes, same units and leading axes (broadcastable).

  Returns:
    (..., N, M) float32 IoU; 0 where the union is not positive (only for
    boxes flipped by more than a pixel, which the release never forms).
  """
  a = a.astype(jnp.float32)[..., :, None, :]
  b = b.astype(jnp.float32)[..., None, :, :]
  ih = jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0])
  iw = jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1])
  inter = jnp.maximum(iw + 1.0, 0.0) * jnp.maximum(ih + 1.0, 0.0)
  area_a = (a[..., 3] - a[..., 1] + 1.0) * (a[..., 2] - a[..., 0] + 1.0)
  area_b = (b[..., 3] - b[..., 1] + 1.0) * (b[..., 2] - b[..., 0] + 1.0)
  union = area_a + area_b - inter
  ok = union > 0
  return jnp.where(ok, inter / jnp.where(ok, union, 1.0), 0.0)


def clip(boxes: jnp.ndarray, window: ArrayLike) -> jnp.ndarray:
  """Clamps ``boxes (..., 4)`` into ``window (..., 4)`` = (y1, x1, y2, x2)."""
  window = jnp.asarray(window, boxes.dtype)
  lo = jnp.stack([window[..., 0], window[..., 1]] * 2, axis=-1)
  hi = jnp.stack([window[..., 2], window[..., 3]] * 2, axis=-1)
  return jnp.minimum(jnp.maximum(boxes, lo), hi)


def _scale(size: ArrayLike) -> jnp.ndarray:
  size = jnp.asarray(size, jnp.float32)
  if size.ndim == 0:
    size = jnp.stack([size, size])
  return jnp.concatenate([size, size], axis=-1)


def normalize(boxes: jnp.ndarray, size: ArrayLike) -> jnp.ndarray:
  """Pixels -> normalised: divides by ``size`` = (h, w) (..., 2) or scalar.

  As the release (``boxes / [h, w, h, w]``), not Matterport-TF's (h - 1).
  """
  return boxes.astype(jnp.float32) / _scale(size)


def denormalize(boxes: jnp.ndarray, size: ArrayLike) -> jnp.ndarray:
  """Inverse of :func:`normalize`."""
  return boxes.astype(jnp.float32) * _scale(size)
