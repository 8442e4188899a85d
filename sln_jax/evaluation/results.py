"""Network outputs -> COCO results: mask paste, RLE, depth order (numpy).

Coordinates: boxes are (y1, x1, y2, x2) in pixels, (y2, x2) exclusive. Masks
are pasted as in the release's ``unmold_mask``: each m x m probability map is
resized bilinearly to its *integer* box, thresholded (``>= threshold``) and
placed into an all-zero image. Integer boxes: y1, x1, y2, x2 rounded to the
nearest integer (halves up) and clipped to the image; the release truncates
instead (``astype(int32)``), which shrinks boxes by half a pixel on average.

Two resize geometries (``eval.mask_paste``). 'aligned' (default): cell i of
m lands on pixel ``i * (n - 1) / (m - 1)`` of the n-pixel box, so the first
and last cells sit on the box's first and last pixel rows and columns
(``torch.nn.functional.interpolate(..., align_corners=True)``): the inverse
of the training targets, which sample each box on its first .. last pixel
(``input_pipeline.pipeline.crop_layers``, crop_and_resize). 'bilinear':
half-pixel centres (source coordinate ``(i + 0.5) * m / n - 0.5``, clamped),
the convention of PIL/OpenCV and ``align_corners=False`` and the release's
(``scipy.misc.imresize``); against those targets it shrinks every mask by
about n / m pixels around the box centre. No antialiasing in either.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sln_jax.evaluation import depth_order


# --------------------------------------------------------------- pasting
def integer_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
  """(y1, x1, y2, x2) float pixels -> rounded (halves up), clipped ints."""
  y1, x1, y2, x2 = (int(np.floor(float(v) + 0.5)) for v in box)
  return (
      min(max(y1, 0), height),
      min(max(x1, 0), width),
      min(max(y2, 0), height),
      min(max(x2, 0), width),
  )


@functools.lru_cache(maxsize=1024)
def _interp_matrix(n_out: int, n_in: int, align_corners: bool = False) -> np.ndarray:
  """(n_out, n_in) bilinear weights, edge clamped: half-pixel centres, or
  (``align_corners``) first and last samples on the first and last pixel.

  Cached (read-only): pasted boxes come in a few hundred sizes."""
  if align_corners and n_out == 1:
    src = np.full(1, (n_in - 1) / 2)
  elif align_corners:
    src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
  else:
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0.0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  w = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  w[rows, lo] = 1.0 - frac
  w[rows, hi] += frac  # a second statement: adds where hi == lo (the clamped edge)
  w.flags.writeable = False
  return w


def _argmax_last(x: np.ndarray) -> np.ndarray:
  """``np.argmax(x, axis=-1)`` (ties: the first) for a few channels, in int8:
  one comparison per channel instead of numpy's per-pixel reduction."""
  best = x[..., 0]
  index = np.zeros(x.shape[:-1], np.int8 if x.shape[-1] < 127 else np.int32)
  for k in range(1, x.shape[-1]):
    better = x[..., k] > best
    index[better] = k
    best = np.where(better, x[..., k], best)
  return index


def resize_bilinear(
    prob: np.ndarray, height: int, width: int, align_corners: bool = False
) -> np.ndarray:
  """(m, n) or (m, n, C) map -> (height, width[, C]) float64, bilinear.

  Two matrix products, rows then columns: O(height * m * n + height * n *
  width) per channel.
  """
  m, n = prob.shape[:2]
  wy = _interp_matrix(height, m, align_corners)
  wx = _interp_matrix(width, n, align_corners)
  if prob.ndim == 2:
    return wy @ prob.astype(np.float64) @ wx.T
  # Channel-first (C, m, n) so each channel takes the 2-D path's two products
  # (the same numbers as resizing it alone); returned as a channel-last view.
  chans = np.moveaxis(prob.astype(np.float64).reshape(m, n, -1), -1, 0)
  out = np.moveaxis(wy @ chans @ wx.T, 0, -1)  # (height, width, C)
  return out.reshape((height, width) + prob.shape[2:])


def _paste_crop(
    prob: np.ndarray, box: tuple[int, int, int, int], align_corners: bool = False
) -> np.ndarray:
  """Resized probabilities inside the integer box: (y2-y1, x2-x1[, C])."""
  y1, x1, y2, x2 = box
  if y2 <= y1 or x2 <= x1:
    return np.zeros((max(y2 - y1, 0), max(x2 - x1, 0)) + prob.shape[2:])
  return resize_bilinear(prob, y2 - y1, x2 - x1, align_corners)


MASK_PASTES = ('aligned', 'bilinear', 'release')


def release_paste(prob: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
  """The release's ``utils.unmold_mask`` inside ``box``: (y2-y1, x2-x1) bool.

  QUIRK (``eval.mask_paste='release'``): ``scipy.misc.imresize`` (scipy 1.2)
  first byte-scales the (m, m) probabilities by their own minimum and maximum
  (``(p - min) * 255 / (max - min or 1)``, clipped, + 0.5, truncated to
  uint8, in float32 as numpy 1.16 computed it), PIL resizes that 'L' image
  bilinearly (antialiased when shrinking), and pixels >= 0.5 * 255 are kept.
  So a mask's threshold sits halfway between its lowest and highest
  probability, not at 0.5: a weak mask still gives pixels, a constant one
  none.
  """
  y1, x1, y2, x2 = box
  if y2 <= y1 or x2 <= x1:
    return np.zeros((max(y2 - y1, 0), max(x2 - x1, 0)), bool)
  p = np.asarray(prob, np.float32)
  lo, hi = p.min(), p.max()
  scale = np.float32(255.0 / ((hi - lo) or 1))
  byte = ((np.clip((p - lo) * scale, 0, 255) + np.float32(0.5))).astype(np.uint8)
  resized = Image.fromarray(byte, 'L').resize((x2 - x1, y2 - y1), Image.BILINEAR)
  return np.asarray(resized) >= 128


def release_box(
    canvas_box: Sequence[float], image_scale: Sequence[float], height: int, width: int
) -> tuple[int, int, int, int]:
  """The release's ``unmold_detections`` box: canvas pixels times original /
  canvas extent, truncated to int (its boxes are already whole canvas
  pixels, ``model.detection.round_boxes``), then clipped to the image."""
  sy, sx = float(image_scale[0]), float(image_scale[1])
  fy = height / round(height * sy)  # the release: image_shape / window extent
  fx = width / round(width * sx)
  y1, x1, y2, x2 = (
      int(v * f) for v, f in zip(np.asarray(canvas_box, np.float64), (fy, fx, fy, fx))
  )
  return (
      min(max(y1, 0), height),
      min(max(x1, 0), width),
      min(max(y2, 0), height),
      min(max(x2, 0), width),
  )


def paste_masks(
    probs: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5
) -> np.ndarray:
  """Pastes (D, m, m) probabilities into (D, height, width) bool masks.

  ``boxes``: (D, 4) y1x1y2x2 in original-image pixels (see module doc for the
  rounding). A box that is empty after rounding/clipping gives an empty mask.
  """
  probs = np.asarray(probs)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  out = np.zeros((len(boxes), height, width), bool)
  for i, box in enumerate(boxes):
    b = integer_box(box, height, width)
    out[i, b[0] : b[2], b[1] : b[3]] = _paste_crop(probs[i], b) >= threshold
  return out


# --------------------------------------------------------------- depth order
def pairwise_votes_crops(
    layers: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]]
) -> np.ndarray:
  """Pixel votes for the pairwise depth order of instances.

  ``layers[i]``: int map over ``boxes[i]`` (-1 absent, 0 visible, k occluded
  behind k objects). At each pixel where both i and j are present the lower
  layer is in front. Returns (N, N) int64, antisymmetric: entry [i, j] =
  (pixels where i is in front of j) - (pixels where j is in front of i).
  """
  n = len(layers)
  votes = np.zeros((n, n), np.int64)
  b = np.asarray(boxes, np.int64).reshape(n, 4)
  lo = np.maximum(b[:, None, :2], b[None, :, :2])  # (n, n, 2) overlap top-left
  hi = np.minimum(b[:, None, 2:], b[None, :, 2:])
  ii, jj = np.nonzero(np.triu(np.all(hi > lo, axis=-1), 1))  # i < j, boxes overlap
  if not ii.size:
    return votes
  # Each map twice, absent pixels -1 in `low` and the dtype's maximum in
  # `high`: `high_i < low_j` holds exactly where both are present and i is in
  # front, so a pair costs two comparisons and two counts of 1-byte pixels.
  layers = [np.asarray(l) for l in layers]
  fits = all(
      l.dtype == np.int8 or (np.min(l, initial=0) >= -128 and np.max(l, initial=0) < 127)
      for l in layers
  )
  dtype = np.int8 if fits else np.int64
  low = [l.astype(dtype, copy=False) for l in layers]
  high = [np.where(l < 0, np.iinfo(dtype).max, l).astype(dtype, copy=False) for l in low]
  # Overlap rows and columns in each crop's own frame, as Python ints.
  frame = np.stack(
      [
          lo[ii, jj, 0] - b[ii, 0],
          hi[ii, jj, 0] - b[ii, 0],
          lo[ii, jj, 1] - b[ii, 1],
          hi[ii, jj, 1] - b[ii, 1],
          lo[ii, jj, 0] - b[jj, 0],
          hi[ii, jj, 0] - b[jj, 0],
          lo[ii, jj, 1] - b[jj, 1],
          hi[ii, jj, 1] - b[jj, 1],
      ],
      axis=1,
  ).tolist()
  count = np.count_nonzero
  margin = []
  for i, j, (a0, a1, a2, a3, c0, c1, c2, c3) in zip(ii.tolist(), jj.tolist(), frame):
    si, sj = np.s_[a0:a1, a2:a3], np.s_[c0:c1, c2:c3]
    margin.append(count(high[i][si] < low[j][sj]) - count(high[j][sj] < low[i][si]))
  votes[ii, jj] = margin
  votes[jj, ii] = -votes[ii, jj]
  return votes


def pairwise_order_crops(
    layers: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]]
) -> np.ndarray:
  """Pairwise depth order of instances given box-local layer maps.

  The sign of :func:`pairwise_votes_crops`: the majority of the pixels where
  both are present decides. Same semantics as ``sln_jax.semdist.pairwise_order``
  on the full-image maps. Returns (N, N) int8: +1 i in front of j, -1 behind,
  0 no overlap or undecided.
  """
  return np.sign(pairwise_votes_crops(layers, boxes)).astype(np.int8)


def depth_layers(order: np.ndarray, strength: Optional[np.ndarray] = None) -> np.ndarray:
  """(N, N) pairwise order -> (N,) int depth layer, 0 = front-most.

  ``order[i, j] == 1``: i in front of j. The relations are taken strongest
  first (``|strength[i, j]|``, e.g. the pixel margin of
  :func:`pairwise_votes_crops`; ties, and all relations when ``strength`` is
  None: smaller i, then smaller j, so with detections sorted by score the
  confident ones win) and one that contradicts those taken is dropped
  (``depth_order.acyclic_relations``); the layer is the longest chain of kept
  relations in front (``depth_order.chain_depth``). A consistent order keeps
  every relation.
  """
  order = np.asarray(order)
  weight = np.ones(order.shape) if strength is None else 1 + np.abs(strength)
  return depth_order.chain_depth(depth_order.acyclic_relations(np.where(order == 1, weight, 0)))


# --------------------------------------------------------------- results
def rle_of_crop(crop: np.ndarray, box: Sequence[int], height: int, width: int) -> dict:
  """COCO RLE (counts str) of a (height, width) mask that is ``crop`` inside
  the integer ``box`` (y1, x1, y2, x2) and 0 elsewhere: the string
  pycocotools' ``encode`` gives the full mask, at the cost of the crop
  rather than of the whole image (docs/benchmarks.md).

  Runs follow the column-major order: a run starts at each pixel whose value
  differs from the one before it, found in the crop's columns, each followed
  by a 0; a crop touching the bottom edge ends a column where the next
  column's first pixel may start, so starts met twice cancel.
  """
  y1, x1 = int(box[0]), int(box[1])
  crop = np.asarray(crop, bool)
  ch, cw = crop.shape
  cols = np.zeros((cw, ch + 1), np.int8)  # column-major, a 0 after each column
  cols[:, :ch] = crop.T
  flat = cols.reshape(-1)
  p = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  if flat.size and flat[0]:
    p = np.concatenate([[0], p])
  col, row = np.divmod(p, ch + 1)
  at = (x1 + col) * height + y1 + row  # first pixel of each new run
  if y1 + ch == height and at.size:
    at, n = np.unique(at, return_counts=True)
    at = at[(n % 2 == 1) & (at < height * width)]  # nothing starts after the last pixel
  counts = np.diff(np.concatenate([[0], at, [height * width]]))
  rle = mask_utils.frPyObjects({'size': [height, width], 'counts': counts.tolist()}, height, width)
  rle['counts'] = rle['counts'].decode('ascii')
  return rle


def detections_to_results(
    image_id: int,
    dets: Mapping[str, np.ndarray],
    image_scale: Sequence[float],
    orig_hw: Sequence[int],
    category_map: Optional[Mapping[int, int]] = None,
    *,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    mask_paste: str = 'aligned',
) -> list[dict]:
  """COCO results for one image from ``SLN.infer`` outputs (batch axis removed).

  Args:
    dets: boxes (D, 4) canvas pixels y1x1y2x2, scores (D,), classes (D,),
      valid (D,), amodal_probs (D, m, m), visible_probs (D, m, m) and
      optionally layer_probs (D, m, m, L).
    image_scale: canvas pixels per original pixel (y, x).
    orig_hw: original image (height, width).
    category_map: model class index -> dataset category id (None: identity).
    mask_paste: 'aligned' (probabilities resized bilinearly into the rounded
      box with the first and last cells on its first and last pixel rows and
      columns, the geometry of the training targets, ``>= mask_threshold``),
      'bilinear' (the same with half-pixel centres, the release's resize
      geometry, which shrinks each mask by about box/m pixels) or 'release'
      (the release's truncated box and byte-scaled PIL resize:
      ``release_box``, ``release_paste``; ``mask_threshold`` unused).

  Returns a list of {image_id, category_id, score, bbox [x, y, w, h] original
  pixels (the float box clipped to the image), segmentation (amodal RLE,
  counts str), visible_mask (RLE), depth_layer (int, 0 = front-most)},
  highest score first. Detections
  that are invalid, below ``score_threshold`` or whose integer box is empty
  (dropped by the release too) are left out. ``depth_layer`` comes from the
  pasted masks: per detection, -1 outside the amodal mask, 0 on the visible
  mask, else 1 + argmax of layer channels 1..L-1 (1 when L == 1), ordered with
  ``pairwise_votes_crops`` and ``depth_layers`` (relations weighted by their
  pixel margin).
  """
  if mask_paste not in MASK_PASTES:
    raise ValueError(f'mask_paste must be one of {MASK_PASTES}, got {mask_paste!r}')
  h, w = int(orig_hw[0]), int(orig_hw[1])
  sy, sx = float(image_scale[0]), float(image_scale[1])
  boxes = np.asarray(dets['boxes'], np.float64) / np.array([sy, sx, sy, sx])
  scores = np.asarray(dets['scores'], np.float64)
  classes = np.asarray(dets['classes'])
  valid = np.asarray(dets['valid'], bool)
  layer_probs = dets.get('layer_probs')
  keep = [
      i for i in np.argsort(-scores, kind='stable') if valid[i] and scores[i] >= score_threshold
  ]
  aligned = mask_paste == 'aligned'
  if mask_paste == 'release':
    box_of = lambda i: release_box(dets['boxes'][i], image_scale, h, w)
    paste = release_paste
  else:
    box_of = lambda i: integer_box(boxes[i], h, w)
    paste = lambda prob, b: _paste_crop(np.asarray(prob), b, aligned) >= mask_threshold
  deeper_probs = None
  if layer_probs is not None and np.shape(layer_probs)[-1] > 1:
    deeper_probs = np.asarray(layer_probs)[..., 1:]  # layer channels 1..L-1
  # Layer maps hold -1 .. L - 1: one byte each for the depth votes.
  num_layers = 1 if layer_probs is None else np.shape(layer_probs)[-1]
  layer_dtype = np.int8 if num_layers < 127 else np.int32
  results, layer_maps, int_boxes = [], [], []
  for i in keep:
    b = box_of(i)
    if b[2] <= b[0] or b[3] <= b[1]:
      continue
    amodal = paste(dets['amodal_probs'][i], b)
    visible = paste(dets['visible_probs'][i], b) & amodal
    # -1 outside the amodal mask, 0 on the visible one, else 1 + the argmax
    # of layer channels 1..L-1 (1 with one layer).
    deeper = (
        1 if deeper_probs is None else 1 + _argmax_last(_paste_crop(deeper_probs[i], b, aligned))
    )
    layer = np.where(amodal, deeper, -1)
    layer = np.where(visible, 0, layer).astype(layer_dtype)
    layer_maps.append(layer)
    int_boxes.append(b)
    cls = int(classes[i])
    y1, x1, y2, x2 = np.clip(boxes[i], 0, [h, w, h, w])
    results.append(
        {
            'image_id': int(image_id),
            'category_id': int(category_map[cls]) if category_map else cls,
            'score': float(scores[i]),
            'bbox': [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            'segmentation': rle_of_crop(amodal, b, h, w),
            'visible_mask': rle_of_crop(visible, b, h, w),
        }
    )
  votes = pairwise_votes_crops(layer_maps, int_boxes)
  layers = depth_layers(np.sign(votes), strength=votes)
  for r, d in zip(results, layers):
    r['depth_layer'] = int(d)
  return results
