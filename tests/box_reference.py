"""numpy box IoU for the tests: an independent reference for sln_jax.ops."""

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, 4) x (M, 4) boxes (y1, x1, y2, x2) -> (N, M) IoU; flipped boxes
  have area 0, and a pair with no area at all has IoU 0."""
  area = lambda x: np.maximum(x[..., 2] - x[..., 0], 0) * np.maximum(x[..., 3] - x[..., 1], 0)
  lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.maximum(hi - lo, 0), -1)
  return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)
