"""The image path of inference in numpy: resize into the canvas, pad, and
the GLM's copy of the canvas.

The same arithmetic as the tf.data pipeline (``input_pipeline.pipeline``),
which reads these functions' TF twins, without TensorFlow or Flax, so the
predict mode and an exported model (``sln_jax.exported``) share it. Images
are (H, W, C) arrays, row-major; sizes are (height, width).
"""

from __future__ import annotations

import numpy as np

RESIZE_MODES = ('pad', 'squash')


def resized_size(height: int, width: int, image_size: int, resize_mode: str) -> tuple[int, int]:
  """(new_h, new_w) of the resized image inside the S x S canvas.

  'pad': the longer side becomes S, the other is rounded half up (integer
  arithmetic, so numpy and TF agree exactly); 'squash': (S, S).
  """
  if resize_mode not in RESIZE_MODES:
    raise ValueError(f'input.resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}')
  height, width = int(height), int(width)
  if resize_mode == 'squash':
    return image_size, image_size
  m = max(height, width)
  rnd = lambda v: max((2 * v * image_size + m) // (2 * m), 1)  # noqa: E731
  return rnd(height), rnd(width)


def _triangle_spans(in_size: int, out_size: int):
  """One axis of TF's ScaleAndTranslate (triangle kernel, antialias=True).

  The banded form of the (out_size, in_size) weight matrix of the
  antialiased bilinear resize: output pixel i is sum_k weights[i, k] *
  input[index[i, k]]. Half-pixel centres; the kernel radius is
  max(in_size / out_size, 1) input pixels; taps outside the image are
  dropped and the rest renormalised to sum 1 (PIL's edge handling). The
  float32 arithmetic follows ``ComputeSpansCore`` step by step.

  Returns:
    index (out_size, span) int64 (clipped to the image; their weights are 0
    where TF's span ends) and weights (out_size, span) float32.
  """
  f32 = np.float32
  scale = f32(out_size) / f32(in_size)
  inv_scale = f32(1.0 / np.float64(scale))  # C++ ``1.0 / scale``
  kernel_scale = max(inv_scale, f32(1))
  span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
  sample = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale
  start = np.ceil(sample - kernel_scale - f32(0.5)).astype(np.int64)
  end = np.floor(sample + kernel_scale - f32(0.5)).astype(np.int64)
  start = np.clip(start, 0, in_size - 1)
  end = np.clip(end, 0, in_size - 1) + 1
  index = start[:, None] + np.arange(span)[None]
  dist = np.abs((index.astype(f32) + f32(0.5) - sample[:, None]) * (f32(1) / kernel_scale))
  weights = np.where((index < end[:, None]) & (dist < 1), f32(1) - dist, f32(0)).astype(f32)
  total = np.zeros(out_size, f32)
  for k in range(span):  # sequential float32 sum, as TF
    total += weights[:, k]
  weights *= (f32(1) / total)[:, None]
  return np.minimum(index, in_size - 1), weights


def resize_bilinear_np(
    image: np.ndarray, out_h: int, out_w: int, antialias: bool = False
) -> np.ndarray:
  """Numpy twin of the pipeline's ``_resize_uint8`` before its rounding.

  Args:
    image: (H, W, C).
    out_h, out_w: output size.
    antialias: as the pipeline's ``_resize_uint8``: when an axis shrinks, TF's
      ``tf.image.resize(method='bilinear', antialias=True)`` (the triangle
      filter of PIL's BILINEAR, support widened by the shrink factor) as two
      banded weight-matrix products, rows then columns in float32 like TF's
      ScaleAndTranslate. Otherwise (and always with antialias=False)
      ``tf.image.resize(method='bilinear', antialias=False)``: half-pixel
      centres, edge clamping, the ResizeBilinear arithmetic.

  Returns:
    (out_h, out_w, C) float32.
  """
  image = np.asarray(image, np.float32)
  if antialias and (out_h < image.shape[0] or out_w < image.shape[1]):
    rows, row_w = _triangle_spans(image.shape[0], out_h)
    cols, col_w = _triangle_spans(image.shape[1], out_w)
    mid = np.zeros((out_h,) + image.shape[1:], np.float32)
    for k in range(rows.shape[1]):
      mid += row_w[:, k, None, None] * image[rows[:, k]]
    out = np.zeros((out_h, out_w) + image.shape[2:], np.float32)
    for k in range(cols.shape[1]):
      out += col_w[None, :, k, None] * mid[:, cols[:, k]]
    return out

  def axis(in_size, out_size):
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    fl = np.floor(src)
    lo = np.maximum(fl, 0).astype(np.int64)
    hi = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)
    return lo, hi, (src - fl).astype(np.float32)

  y0, y1, fy = axis(image.shape[0], out_h)
  x0, x1, fx = axis(image.shape[1], out_w)
  fx = fx[None, :, None]
  top = image[y0][:, x0] + (image[y0][:, x1] - image[y0][:, x0]) * fx
  bot = image[y1][:, x0] + (image[y1][:, x1] - image[y1][:, x0]) * fx
  return top + (bot - top) * fy[:, None, None]


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Rounds to the nearest integer and clips to uint8 (TF's cast after
  ``tf.round``)."""
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def preprocess_image(
    image: np.ndarray, image_size: int, resize_mode: str, glm_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One image -> the model's inputs.

  Args:
    image: (H, W, 3) uint8 RGB (grayscale (H, W) is broadcast to RGB, an
      alpha channel dropped).
    image_size: S, the canvas side.
    resize_mode: 'pad' (keep aspect, pad bottom/right) | 'squash'.
    glm_size: G, the side of the GLM's copy of the canvas.

  Returns:
    canvas (S, S, 3) uint8 (resized with antialiasing, then padded),
    image_shape (2,) float32 (valid h, w), image_scale (2,) float32 (canvas
    px per original px, y then x), glm_image (G, G, 3) uint8 (the canvas
    resized without antialiasing).
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=2)
  image = image[..., :3]
  h, w = image.shape[:2]
  nh, nw = resized_size(h, w, image_size, resize_mode)
  canvas = np.zeros((image_size, image_size, 3), np.uint8)
  canvas[:nh, :nw] = to_uint8(resize_bilinear_np(image, nh, nw, antialias=True))
  glm_image = to_uint8(resize_bilinear_np(canvas, glm_size, glm_size, antialias=False))
  return (canvas, np.array([nh, nw], np.float32), np.array([nh / h, nw / w], np.float32), glm_image)
