"""ROI pooling: crop_and_resize (TF semantics), ROIAlign (detectron2).

Features are NHWC. Boxes are (y1, x1, y2, x2).

* ``crop_and_resize``: ``tf.image.crop_and_resize`` exactly. Boxes are
  normalised so that 0 is the first and 1 the last pixel centre; sample
  ``i`` of a crop of size ``c > 1`` is at ``y = y1 * (H - 1) + i * (y2 - y1)
  * (H - 1) / (c - 1)`` (``c == 1``: the box centre); bilinear; samples
  outside ``[0, H - 1]`` give 0. Flipped boxes (y1 > y2) give flipped crops.
  One deliberate difference: a sample within float32 rounding of the edge
  (``EDGE_TOLERANCE``) counts as on it (see ``_axis_tf``).
* ``roi_align``: torchvision / detectron2 ``ROIAlign``. Boxes in input-image
  pixels, scaled by ``spatial_scale``; ``aligned=True`` shifts by -0.5 pixel;
  each output bin averages ``sampling_ratio ** 2`` bilinear samples;
  samples in ``[-1, 0)`` clamp to the border, beyond give 0.
* ``multilevel_crop_and_resize``: the release's PyramidROIAlign, one FPN
  level per ROI by the FPN paper's rule on normalised box sizes.

Implementation: every ROI reads its samples with four gathers (one per
bilinear corner) from the feature map(s) flattened to (rows, C). Cost
O(N * c^2 * 4 * C) memory traffic, independent of the map size, against
O(N * c * H * W * C) FLOPs for the one-hot-einsum formulation (for P2 at
256x256 and 1000 ROIs that is ~100 GFLOP vs ~50 M reads), so gathers are
the cheaper form at these sizes; their gradient is a scatter-add. All
levels are concatenated into one flat table so a pyramid costs a single
gather pass.
Sampling and the gradient's scatter-add run in float32 whatever the map's
dtype (torchvision's autocast policy for roi_align): a bfloat16 map gets a
gradient rounded once per pixel, not once per accumulated sample.
"""

from typing import Sequence, Tuple

import jax.numpy as jnp

# Relative to the map extent: ~30 float32 rounding steps of a coordinate.
EDGE_TOLERANCE = 4e-6

Axis = Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]


def _axis_tf(coord: jnp.ndarray, size: jnp.ndarray) -> Axis:
  """TF crop_and_resize sampling along one axis.

  Args:
    coord: (N, S) float32 sample positions in pixels.
    size: (N, 1) float32 map extent along the axis.

  Returns:
    (lo, hi) int32 indices, (w_lo, w_hi) float32 weights, valid bool, each
    (N, S).
  """
  # A sample within float32 rounding of the map's edge (EDGE_TOLERANCE) counts
  # as on it: a box edge on the map edge (a box clipped to the image) always
  # samples the edge row, whatever the compiler's rounding or FMA contraction.
  # TF's float32 sum can overshoot H - 1 for such a box and then returns 0.
  tol = EDGE_TOLERANCE * size
  valid = (coord >= -tol) & (coord <= size - 1.0 + tol)
  coord = jnp.clip(coord, 0.0, size - 1.0)
  lo_f = jnp.floor(coord)
  lerp = coord - lo_f
  top = size - 1.0
  lo = jnp.clip(lo_f, 0.0, top).astype(jnp.int32)
  hi = jnp.clip(jnp.ceil(coord), 0.0, top).astype(jnp.int32)
  return lo, hi, 1.0 - lerp, lerp, valid


def _axis_tv(coord: jnp.ndarray, size: jnp.ndarray) -> Axis:
  """torchvision roi_align ``bilinear_interpolate`` along one axis."""
  valid = (coord >= -1.0) & (coord <= size)
  c = jnp.maximum(coord, 0.0)
  lo_f = jnp.floor(c)
  at_end = lo_f >= size - 1.0
  lo_f = jnp.where(at_end, size - 1.0, lo_f)
  hi_f = jnp.where(at_end, size - 1.0, lo_f + 1.0)
  c = jnp.where(at_end, lo_f, c)
  lerp = c - lo_f
  top = jnp.maximum(size - 1.0, 0.0)
  lo = jnp.clip(lo_f, 0.0, top).astype(jnp.int32)
  hi = jnp.clip(hi_f, 0.0, top).astype(jnp.int32)
  return lo, hi, 1.0 - lerp, lerp, valid


def _sample(
    flat: jnp.ndarray, base: jnp.ndarray, width: jnp.ndarray, ay: Axis, ax: Axis
) -> jnp.ndarray:
  """Bilinear samples on a separable grid.

  Args:
    flat: (T, C) feature rows; pixel (y, x) of a map starting at row ``b``
      with width ``w`` is row ``b + y * w + x``.
    base: (N,) int32 first row of each ROI's map.
    width: (N,) int32 width of each ROI's map.
    ay, ax: per-axis sampling from ``_axis_*``, shapes (N, Sy) and (N, Sx).

  Returns:
    (N, Sy, Sx, C) float32.
  """
  y_lo, y_hi, wy_lo, wy_hi, vy = ay
  x_lo, x_hi, wx_lo, wx_hi, vx = ax
  # float32 table: the same forward values, and the gradient's scatter-add
  # accumulates in float32 (as torchvision's autocast runs roi_align in
  # float32), rounding to a bfloat16 map once per pixel, not once per sample.
  flat = flat.astype(jnp.float32)
  row0 = base[:, None, None]
  w = width[:, None, None]
  out = 0.0
  for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
    for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
      idx = row0 + yi[:, :, None] * w + xi[:, None, :]
      vals = jnp.take(flat, idx, axis=0, mode='clip')
      out = out + (wy[:, :, None] * wx[:, None, :])[..., None] * vals
  valid = (vy[:, :, None] & vx[:, None, :])[..., None]
  return jnp.where(valid, out, 0.0)


def _tf_coords(lo: jnp.ndarray, hi: jnp.ndarray, size: jnp.ndarray, crop: int) -> jnp.ndarray:
  """(N,) normalised box edges -> (N, crop) sample positions in pixels."""
  if crop > 1:
    scale = (hi - lo) * (size - 1.0) / (crop - 1)
    steps = jnp.arange(crop, dtype=jnp.float32)
    return lo[:, None] * (size[:, None] - 1.0) + steps * scale[:, None]
  return (0.5 * (lo + hi) * (size - 1.0))[:, None]


def _tv_coords(
    lo: jnp.ndarray, hi: jnp.ndarray, out: int, ratio: int, aligned: bool
) -> jnp.ndarray:
  """(N,) pixel box edges (already scaled) -> (N, out * ratio) positions."""
  offset = 0.5 if aligned else 0.0
  start = lo - offset
  length = hi - offset - start
  if not aligned:
    length = jnp.maximum(length, 1.0)
  bin_size = length / out
  i = jnp.arange(out, dtype=jnp.float32)[:, None]
  s = jnp.arange(ratio, dtype=jnp.float32)[None, :]
  frac = (i + (s + 0.5) / ratio).reshape(-1)
  return start[:, None] + frac[None, :] * bin_size[:, None]


def _pool(flat, base, height, width, boxes, crop_size, aligned, sampling_ratio, scale):
  """Shared body: (N,) ROIs on maps of (N,) sizes -> (N, c, c, C) float32."""
  hf = height.astype(jnp.float32)
  wf = width.astype(jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  if not aligned and sampling_ratio is None:
    ys = _tf_coords(boxes[:, 0], boxes[:, 2], hf, crop_size)
    xs = _tf_coords(boxes[:, 1], boxes[:, 3], wf, crop_size)
    return _sample(flat, base, width, _axis_tf(ys, hf[:, None]), _axis_tf(xs, wf[:, None]))
  r = int(sampling_ratio)
  if r <= 0:
    raise ValueError('sampling_ratio must be > 0 under static shapes')
  ys = _tv_coords(boxes[:, 0] * scale[0], boxes[:, 2] * scale[0], crop_size, r, aligned)
  xs = _tv_coords(boxes[:, 1] * scale[1], boxes[:, 3] * scale[1], crop_size, r, aligned)
  v = _sample(flat, base, width, _axis_tv(ys, hf[:, None]), _axis_tv(xs, wf[:, None]))
  n, c = v.shape[0], v.shape[-1]
  v = v.reshape(n, crop_size, r, crop_size, r, c)
  return v.mean(axis=(2, 4))


def crop_and_resize_indexed(
    images: jnp.ndarray, boxes: jnp.ndarray, box_indices: jnp.ndarray, crop_size: int
) -> jnp.ndarray:
  """``tf.image.crop_and_resize`` with the same arguments.

  Args:
    images: (M, H, W, C).
    boxes: (R, 4) normalised (y1, x1, y2, x2).
    box_indices: (R,) int32 image of each box, in [0, M).
    crop_size: output side c.

  Returns:
    (R, c, c, C) in ``images.dtype`` (computed in float32).
  """
  images = jnp.asarray(images)
  m, h, w, c = images.shape
  flat = images.reshape(m * h * w, c)
  r = boxes.shape[0]
  base = box_indices.astype(jnp.int32) * (h * w)
  height = jnp.full((r,), h, jnp.int32)
  width = jnp.full((r,), w, jnp.int32)
  out = _pool(flat, base, height, width, boxes, crop_size, False, None, None)
  return out.astype(images.dtype)


def crop_and_resize(features: jnp.ndarray, boxes: jnp.ndarray, crop_size: int) -> jnp.ndarray:
  """Per-image crop_and_resize.

  Args:
    features: (B, H, W, C).
    boxes: (B, N, 4) normalised (y1, x1, y2, x2), TF semantics (module doc).
    crop_size: output side c.

  Returns:
    (B, N, c, c, C) in ``features.dtype``.
  """
  b, n = boxes.shape[:2]
  idx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
  out = crop_and_resize_indexed(features, boxes.reshape(b * n, 4), idx, crop_size)
  return out.reshape((b, n) + out.shape[1:])


def roi_align(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> jnp.ndarray:
  """detectron2 / torchvision ROIAlign (average of bilinear samples per bin).

  Args:
    features: (B, H, W, C).
    boxes: (B, N, 4) (y1, x1, y2, x2) in input pixels; ``box *
      spatial_scale`` is in feature pixels (pixel i covers [i, i + 1) when
      ``aligned``).
    output_size: output side o.
    spatial_scale: feature pixels per input pixel (1 / stride).
    sampling_ratio: samples per bin per axis (> 0; the adaptive ``<= 0``
      mode has data-dependent shapes and is not supported).
    aligned: detectron2's half-pixel shift; False = legacy Caffe2 ROIAlign
      (ROI sizes clamped to >= 1).

  Returns:
    (B, N, o, o, C) in ``features.dtype``.
  """
  features = jnp.asarray(features)
  b, h, w, c = features.shape
  n = boxes.shape[1]
  flat = features.reshape(b * h * w, c)
  base = jnp.repeat(jnp.arange(b, dtype=jnp.int32) * (h * w), n)
  height = jnp.full((b * n,), h, jnp.int32)
  width = jnp.full((b * n,), w, jnp.int32)
  out = _pool(
      flat,
      base,
      height,
      width,
      boxes.reshape(b * n, 4),
      output_size,
      aligned,
      sampling_ratio,
      (spatial_scale, spatial_scale),
  )
  return out.reshape((b, n) + out.shape[1:]).astype(features.dtype)


def roi_levels(
    boxes: jnp.ndarray, image_area: float, min_level: int = 2, max_level: int = 5
) -> jnp.ndarray:
  """FPN level per ROI (release PyramidROIAlign).

  ``clamp(round(4 + log2(sqrt(h * w) / (224 / sqrt(image_area)))), min,
  max)`` with h, w normalised and ``image_area`` in canvas pixels (a 224x224
  pixel ROI maps to P4; rounding is half-to-even as torch.round). Empty or
  padded boxes go to ``min_level``.

  Args:
    boxes: (..., 4) normalised boxes.
    image_area: canvas area in pixels (h * w).

  Returns:
    (...,) int32 levels in [min_level, max_level].
  """
  boxes = boxes.astype(jnp.float32)
  hw = jnp.maximum((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), 0.0)
  level = 4.0 + jnp.log2(jnp.sqrt(hw) / (224.0 / float(image_area) ** 0.5))
  level = jnp.clip(jnp.round(level), min_level, max_level)
  return jnp.where(jnp.isnan(level), min_level, level).astype(jnp.int32)


def multilevel_crop_and_resize(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    crop_size: int,
    image_area: float,
    aligned: bool = False,
    sampling_ratio: int = 1,
    min_level: int = 2,
) -> jnp.ndarray:
  """Pools each ROI from its FPN level (:func:`roi_levels`).

  Args:
    features: maps of levels ``min_level, min_level + 1, ...`` (P2..P5),
      each (B, H_l, W_l, C), same C and dtype.
    boxes: (B, N, 4) normalised (y1, x1, y2, x2).
    crop_size: output side c.
    image_area: canvas area in pixels for the level rule.
    aligned: False = crop_and_resize (release); True = ROIAlign with the
      box scaled to the level's pixels (``box * (H_l, W_l)``) and
      ``sampling_ratio`` samples per bin per axis.
    sampling_ratio: used only when ``aligned``.
    min_level: level of ``features[0]``.

  Returns:
    (B, N, c, c, C) in the features' dtype.
  """
  features = [jnp.asarray(f) for f in features]
  b, n = boxes.shape[:2]
  max_level = min_level + len(features) - 1
  levels = roi_levels(boxes, image_area, min_level, max_level)
  li = levels.reshape(-1) - min_level
  sizes = [f.shape[1:3] for f in features]
  offsets, total = [], 0
  for f in features:
    offsets.append(total)
    total += f.shape[0] * f.shape[1] * f.shape[2]
  c = features[0].shape[-1]
  flat = jnp.concatenate([f.reshape(-1, c) for f in features], axis=0)
  heights = jnp.asarray([s[0] for s in sizes], jnp.int32)[li]
  widths = jnp.asarray([s[1] for s in sizes], jnp.int32)[li]
  img = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
  base = jnp.asarray(offsets, jnp.int32)[li] + img * heights * widths
  flat_boxes = boxes.reshape(b * n, 4)
  if aligned:
    scaled = flat_boxes.astype(jnp.float32) * jnp.stack(
        [heights, widths, heights, widths], axis=-1
    ).astype(jnp.float32)
    out = _pool(flat, base, heights, widths, scaled, crop_size, True, sampling_ratio, (1.0, 1.0))
  else:
    out = _pool(flat, base, heights, widths, flat_boxes, crop_size, False, None, None)
  return out.reshape((b, n) + out.shape[1:]).astype(features[0].dtype)
