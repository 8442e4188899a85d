"""Anchor boxes in the release's (Matterport) convention.

Anchors are static: they are computed once with numpy on the host (at trace
time) and enter jitted code as constants. Boxes are (y1, x1, y2, x2) in
canvas pixels; centres sit at multiples of the feature stride (no half-stride
offset); ratio = width / height; each level uses one scale. Order: level
(P2..P6), then feature row, then column, then ratio -- the order of the RPN
head's outputs (flattened NHWC with the anchors-per-location axis last).
"""

import math
from typing import Sequence, Tuple

import numpy as np

DEFAULT_STRIDES = (4, 8, 16, 32, 64)


def feature_shapes(
    image_size: Tuple[int, int], feature_strides: Sequence[int] = DEFAULT_STRIDES
) -> Tuple[Tuple[int, int], ...]:
  """Backbone feature-map shapes ``ceil(image_size / stride)`` per level."""
  h, w = image_size
  return tuple((int(math.ceil(h / s)), int(math.ceil(w / s))) for s in feature_strides)


def level_anchors(
    scale: float,
    ratios: Sequence[float],
    shape: Tuple[int, int],
    feature_stride: int,
    anchor_stride: int = 1,
) -> np.ndarray:
  """Anchors of one level: (rows * cols * len(ratios), 4) float64 pixels."""
  ratios = np.asarray(ratios, np.float64)
  heights = scale / np.sqrt(ratios)
  widths = scale * np.sqrt(ratios)
  cy = np.arange(0, shape[0], anchor_stride, dtype=np.float64) * feature_stride
  cx = np.arange(0, shape[1], anchor_stride, dtype=np.float64) * feature_stride
  cy = np.broadcast_to(cy[:, None, None], (cy.size, cx.size, ratios.size))
  cx = np.broadcast_to(cx[None, :, None], cy.shape)
  h = np.broadcast_to(heights, cy.shape)
  w = np.broadcast_to(widths, cy.shape)
  boxes = np.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)
  return boxes.reshape(-1, 4)


def generate_anchors(
    image_size: Tuple[int, int],
    scales: Sequence[float],
    ratios: Sequence[float],
    feature_strides: Sequence[int] = DEFAULT_STRIDES,
    anchor_stride: int = 1,
) -> np.ndarray:
  """All pyramid anchors (release ``generate_pyramid_anchors``).

  Args:
    image_size: (h, w) canvas size in pixels.
    scales: one anchor side (pixels) per level, e.g. (32, 64, 128, 256, 512).
    ratios: width / height ratios, e.g. (0.5, 1, 2).
    feature_strides: stride of each level, same length as ``scales``.
    anchor_stride: anchors on every ``anchor_stride``-th feature cell.

  Returns:
    (A, 4) float32 numpy array of (y1, x1, y2, x2) in canvas pixels, where
    A = sum over levels of ceil(h/s/anchor_stride) * ceil(w/s/anchor_stride)
    * len(ratios).
  """
  if len(scales) != len(feature_strides):
    raise ValueError(f'{len(scales)} anchor scales for ' f'{len(feature_strides)} feature strides')
  shapes = feature_shapes(image_size, feature_strides)
  return np.concatenate(
      [
          level_anchors(s, ratios, shp, st, anchor_stride)
          for s, shp, st in zip(scales, shapes, feature_strides)
      ]
  ).astype(np.float32)


def num_anchors(
    image_size: Tuple[int, int],
    num_ratios: int,
    feature_strides: Sequence[int] = DEFAULT_STRIDES,
    anchor_stride: int = 1,
) -> int:
  """Number of anchors :func:`generate_anchors` returns."""
  total = 0
  for h, w in feature_shapes(image_size, feature_strides):
    total += (-(-h // anchor_stride)) * (-(-w // anchor_stride)) * num_ratios
  return total
