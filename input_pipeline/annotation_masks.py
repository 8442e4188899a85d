"""The mask side of the annotation readers: segmentations to masks and order.

A segmentation is a polygon (flat ``[x1, y1, ...]`` or a list of them),
rasterised with pycocotools (what the COCO-style evaluators use), or a COCO
RLE (compressed ``counts`` string or uncompressed run lengths) whose size
must be the image's and whose runs must cover it exactly. Besides parsing,
this module builds ``records.InstanceAnnotation`` from dense masks, computes
occlusion rates and dense depth ranks, and derives a depth order from the
masks where a file has none (``derive_depth_order``). Problems raise
``records.AnnotationError`` naming the file and the field.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from pycocotools import mask as mask_utils

from input_pipeline import records
from input_pipeline.annotation_json import is_kind
from input_pipeline.records import AnnotationError
from sln_jax.evaluation import depth_order


def compressed_counts(counts: str) -> list[int]:
  """Decodes COCO's compressed RLE string into run lengths (for checking)."""
  runs, p = [], 0
  while p < len(counts):
    x, k, more = 0, 0, True
    while more:
      if p >= len(counts):
        raise ValueError('truncated counts string')
      c = ord(counts[p]) - 48
      if c < 0 or c > 63:
        raise ValueError(f'invalid character {counts[p]!r} in counts')
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    if len(runs) > 2:
      x += runs[-2]
    runs.append(x)
  return runs


def check_runs(runs: list, height: int, width: int):
  """Run lengths must be non-negative integers covering height x width."""
  if any((not is_kind(r, int)) or r < 0 for r in runs):
    raise ValueError('run lengths must be non-negative integers')
  if sum(runs) != height * width:
    raise ValueError(
        f'run lengths sum to {sum(runs)}, expected ' f'{height * width} = {height}x{width}'
    )


def normalize_polygons(segm: list, path: str, field: str) -> list:
  """Flat [x1, y1, ...] or [[x1, y1, ...], ...] -> list of float lists."""
  polys = [segm] if segm and not isinstance(segm[0], list) else segm
  if not polys:
    raise AnnotationError(path, field, 'empty polygon list')
  out = []
  for poly in polys:
    if not isinstance(poly, list) or not all(is_kind(v, float) for v in poly):
      raise AnnotationError(path, field, 'polygon must be a list of numbers')
    if len(poly) % 2:
      raise AnnotationError(
          path, field, f'polygon has an odd number of ' f'coordinates ({len(poly)})'
      )
    if len(poly) < 6:
      raise AnnotationError(path, field, f'polygon with fewer than 3 points ' f'({len(poly) // 2})')
    out.append([float(v) for v in poly])
  return out


def to_rle(
    segm: Any, height: int, width: int, path: str, field: str
) -> tuple[dict, Optional[list]]:
  """Polygon(s) or RLE (compressed or not) -> (RLE with bytes counts,
  normalised polygons or None). Checks the RLE size against the image."""
  if isinstance(segm, list):
    polys = normalize_polygons(segm, path, field)
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    return rle, polys
  if not isinstance(segm, dict) or 'counts' not in segm or 'size' not in segm:
    raise AnnotationError(
        path, field, 'expected a polygon list or an RLE object with "size" and "counts"'
    )
  size = segm['size']
  if not isinstance(size, list) or len(size) != 2 or not all(is_kind(v, int) for v in size):
    raise AnnotationError(path, f'{field}.size', 'expected [height, width]')
  if list(size) != [height, width]:
    raise AnnotationError(
        path,
        f'{field}.size',
        f'RLE size {list(size)} disagrees with the ' f"image's height/width [{height}, {width}]",
    )
  counts = segm['counts']
  try:
    if isinstance(counts, list):
      check_runs(counts, height, width)
      return mask_utils.frPyObjects(segm, height, width), None
    if isinstance(counts, bytes):
      counts = counts.decode('ascii')
    if not isinstance(counts, str):
      raise ValueError('counts must be a string or a list of integers')
    check_runs(compressed_counts(counts), height, width)
  except (ValueError, UnicodeDecodeError) as err:
    raise AnnotationError(path, f'{field}.counts', f'invalid RLE: {err}') from None
  return {'size': [height, width], 'counts': counts.encode('ascii')}, None


def decode(rle: dict) -> np.ndarray:
  return mask_utils.decode(rle).astype(bool)


def read_mask(segm: Any, height: int, width: int, path: str, field: str) -> np.ndarray:
  """A segmentation (polygon or RLE) as an (H, W) bool mask."""
  return decode(to_rle(segm, height, width, path, field)[0])


def rate(occluded: np.ndarray, amodal: np.ndarray) -> float:
  """Occluded pixels on the object over the amodal area (0 if empty)."""
  area = int(amodal.sum())
  return float((occluded & amodal).sum()) / area if area else 0.0


def file_rate(ann: dict, occluded: np.ndarray, amodal: np.ndarray, path: str, where: str) -> float:
  """The annotation's ``occlude_rate`` when present (a number), else ``rate``."""
  value = ann.get('occlude_rate')
  if value is None:
    return rate(occluded, amodal)
  if not is_kind(value, float):
    raise AnnotationError(path, f'{where}.occlude_rate', 'expected a number')
  return value


def dense_rank(values: list) -> list[int]:
  """Dense rank: the smallest value gets 0, equal values share a rank."""
  order = {v: r for r, v in enumerate(sorted(set(values)))}
  return [order[v] for v in values]


def instance(
    amodal: np.ndarray,
    visible: np.ndarray,
    occluded: np.ndarray,
    rank: int,
    occlude_rate: float,
    polygons=None,
    **kw,
) -> records.InstanceAnnotation:
  """An InstanceAnnotation with the three masks RLE-encoded."""
  return records.InstanceAnnotation(
      amodal_rle=records.encode_mask(amodal),
      visible_rle=records.encode_mask(visible),
      occluded_rle=records.encode_mask(occluded),
      depth_rank=int(rank),
      occlude_rate=float(occlude_rate),
      amodal_polygons=polygons,
      **kw,
  )


def overlaps(masks: list[np.ndarray]) -> np.ndarray:
  """(N, N) pixel counts of pairwise intersections."""
  if not masks:
    return np.zeros((0, 0), np.int64)
  flat = np.stack(masks).reshape(len(masks), -1).astype(np.float32)
  return np.rint(flat @ flat.T).astype(np.int64)


def overlapping_depth_pairs(depths: list, amodals: list[np.ndarray]) -> list:
  """[(front, back)]: pairs with a smaller depth in front whose amodal masks
  overlap (the pairs an annotated per-instance depth orders)."""
  inter = overlaps(amodals)
  n = len(depths)
  return [(a, b) for a in range(n) for b in range(n) if depths[a] < depths[b] and inter[a, b] > 0]


def derive_depth_order(visible: np.ndarray, occluded: np.ndarray) -> tuple[list, np.ndarray]:
  """Depth order from masks: A is in front of B where A's visible mask covers
  part of B's occluded mask.

  Args:
    visible: (N, H, W) bool.
    occluded: (N, H, W) bool.
  Returns:
    pairs: sorted [(front, back)] forming a DAG.
    depth_rank: (N,) int32, 0 for instances nothing is in front of, else
      1 + the largest rank among the instances directly in front.
  Cycles (A over B and B over A, or longer) are broken deterministically:
  candidate edges are accepted greedily by decreasing overlap (pixels of
  vis_front & occ_back; ties by smaller front, then back index) and an edge
  that would close a cycle is dropped, so the weakest overlap loses
  (``sln_jax.evaluation.depth_order``, the rule the predictions' depth
  layers follow).
  """
  n = visible.shape[0]
  if n == 0:
    return [], np.zeros((0,), np.int32)
  vis = visible.reshape(n, -1).astype(np.float32)
  occ = occluded.reshape(n, -1).astype(np.float32)
  weight = np.rint(vis @ occ.T).astype(np.int64)  # [a, b] = |vis_a & occ_b|
  np.fill_diagonal(weight, 0)
  kept = depth_order.acyclic_relations(weight)
  pairs = [(int(a), int(b)) for a, b in zip(*np.nonzero(kept))]
  return pairs, depth_order.chain_depth(kept).astype(np.int32)
