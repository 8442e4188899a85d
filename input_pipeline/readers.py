"""Annotation readers: COCOA, D2SA, KINS and the release's converted folders.

Every reader returns ``list[records.ImageAnnotation]`` in the order of the
file's ``images`` list. Images without instances are skipped and counted in
an optional ``ReadStats`` (``keep_empty=True`` keeps them as records with no
instances: the evaluator scores detections on them as false positives).
Masks are COCO RLE (``counts`` as str) of size [height, width] in image
pixels; polygons are rasterised with pycocotools (what the COCO-style
evaluators use) and also kept raw in
``InstanceAnnotation.amodal_polygons`` (the legacy .npz writer rasterises
them with PIL as the release did).

Per format:
  * COCOA: one annotation per annotator pass; only the FIRST annotation of an
    image (file order) is read, as the amodalAPI evaluator does. Regions are
    sorted (stably) by ``order`` (1 = front-most); ``depth_rank`` is the dense
    rank of ``order`` (order 1 -> 0); ``depth_constraint`` "a-b" pairs (order
    numbers, a in front of b) become instance-index pairs. Visible = the
    ``visible_mask`` RLE, else amodal minus ``invisible_mask``, else amodal.
  * D2SA: flat instances grouped per image and sorted (stably) by
    ``occl_depth``; ``depth_rank`` is its dense rank; occluded =
    ``invisible_mask``, else amodal & ~visible. ``depth_pairs`` are the pairs
    of overlapping amodal masks with different ``occl_depth``.
  * KINS: ``a_segm`` amodal / ``i_segm`` visible (``segmentation`` /
    ``inmodal_seg`` in the 2019 files); occluded = amodal & ~visible. The
    depth order is derived from the masks (``derive_depth_order``); the
    file's ``oco_id``/``ico_id`` are kept in ``extra``.

Bad input raises ``records.AnnotationError(path, field, message)`` with the
field as a JSON path such as ``annotations[3].regions[0].order``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from input_pipeline import records
from input_pipeline.records import AnnotationError
from sln_jax.evaluation import depth_order

FORMATS = ('cocoa', 'd2sa', 'kins', 'release')


@dataclasses.dataclass
class ReadStats:
  """Counts filled in by a reader (pass one in via ``stats=``)."""

  num_images: int = 0  # images returned
  num_instances: int = 0  # instances returned
  skipped_empty: int = 0  # images without instances (skipped unless kept)


# ------------------------------------------------------------------ basics


def _load_json(path: str) -> dict:
  """Reads a JSON object; malformed JSON names the line and column."""
  try:
    with open(path, 'r', encoding='utf-8') as f:
      text = f.read()
  except FileNotFoundError:
    raise AnnotationError(path, '', 'annotation file not found') from None
  except (OSError, UnicodeDecodeError) as err:
    raise AnnotationError(path, '', f'cannot read: {err}') from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as err:
    raise AnnotationError(
        path, 'json', f'malformed JSON at line {err.lineno} column ' f'{err.colno}: {err.msg}'
    ) from None
  if not isinstance(data, dict):
    raise AnnotationError(path, 'json', 'top level must be a JSON object')
  return data


def _get(obj: Any, key: str, path: str, where: str, kind=None) -> Any:
  """``obj[key]``, raising AnnotationError naming ``where.key`` if absent."""
  field = f'{where}.{key}' if where else key
  if not isinstance(obj, dict) or key not in obj:
    raise AnnotationError(path, field, 'required key is missing')
  value = obj[key]
  if kind is not None and not _is_kind(value, kind):
    raise AnnotationError(
        path, field, f'expected {_kind_name(kind)}, got ' f'{type(value).__name__}'
    )
  return value


def _is_kind(value: Any, kind) -> bool:
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  return isinstance(value, kind)


def _kind_name(kind) -> str:
  return {
      int: 'an integer',
      float: 'a number',
      list: 'a list',
      dict: 'an object',
      str: 'a string',
  }.get(kind, str(kind))


@dataclasses.dataclass
class _Image:
  index: int  # position in the file's ``images`` list
  image_id: int
  file_name: str
  height: int
  width: int


def _read_images(data: dict, path: str) -> list[_Image]:
  """Validates the ``images`` list (ids unique, sizes positive)."""
  out, seen = [], set()
  for k, img in enumerate(_get(data, 'images', path, '', list)):
    where = f'images[{k}]'
    image_id = _get(img, 'id', path, where, int)
    file_name = _get(img, 'file_name', path, where, str)
    height = _get(img, 'height', path, where, int)
    width = _get(img, 'width', path, where, int)
    if height <= 0 or width <= 0:
      raise AnnotationError(
          path, f'{where}.height', f'image {file_name} has ' f'non-positive size {height}x{width}'
      )
    if image_id in seen:
      raise AnnotationError(path, f'{where}.id', f'duplicate image id {image_id}')
    seen.add(image_id)
    out.append(_Image(k, image_id, file_name, height, width))
  return out


def _check_image_file(img: _Image, images_dir: Optional[str], path: str):
  """The image must exist in ``images_dir`` with the annotated size."""
  if images_dir is None:
    return
  field = f'images[{img.index}].file_name'
  full = os.path.join(images_dir, img.file_name)
  if not os.path.isfile(full):
    raise AnnotationError(path, field, f'image file {img.file_name} not found ' f'in {images_dir}')
  try:
    with Image.open(full) as im:
      width, height = im.size
  except OSError as err:
    raise AnnotationError(path, field, f'cannot read image {full}: ' f'{err}') from None
  if (height, width) != (img.height, img.width):
    raise AnnotationError(
        path,
        f'images[{img.index}].height',
        f'{img.height}x{img.width} '
        f'(height x width) disagrees with image file {img.file_name} '
        f'({height}x{width})',
    )


# ------------------------------------------------------------------- masks


def _compressed_counts(counts: str) -> list[int]:
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


def _check_runs(runs: list, height: int, width: int):
  if any((not _is_kind(r, int)) or r < 0 for r in runs):
    raise ValueError('run lengths must be non-negative integers')
  if sum(runs) != height * width:
    raise ValueError(
        f'run lengths sum to {sum(runs)}, expected ' f'{height * width} = {height}x{width}'
    )


def _normalize_polygons(segm: list, path: str, field: str) -> list:
  """Flat [x1, y1, ...] or [[x1, y1, ...], ...] -> list of float lists."""
  polys = [segm] if segm and not isinstance(segm[0], list) else segm
  if not polys:
    raise AnnotationError(path, field, 'empty polygon list')
  out = []
  for poly in polys:
    if not isinstance(poly, list) or not all(_is_kind(v, float) for v in poly):
      raise AnnotationError(path, field, 'polygon must be a list of numbers')
    if len(poly) % 2:
      raise AnnotationError(
          path, field, f'polygon has an odd number of ' f'coordinates ({len(poly)})'
      )
    if len(poly) < 6:
      raise AnnotationError(path, field, f'polygon with fewer than 3 points ' f'({len(poly) // 2})')
    out.append([float(v) for v in poly])
  return out


def _to_rle(
    segm: Any, height: int, width: int, path: str, field: str
) -> tuple[dict, Optional[list]]:
  """Polygon(s) or RLE (compressed or not) -> (RLE with bytes counts,
  normalised polygons or None). Checks the RLE size against the image."""
  if isinstance(segm, list):
    polys = _normalize_polygons(segm, path, field)
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    return rle, polys
  if not isinstance(segm, dict) or 'counts' not in segm or 'size' not in segm:
    raise AnnotationError(
        path, field, 'expected a polygon list or an RLE object with "size" and "counts"'
    )
  size = segm['size']
  if not isinstance(size, list) or len(size) != 2 or not all(_is_kind(v, int) for v in size):
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
      _check_runs(counts, height, width)
      return mask_utils.frPyObjects(segm, height, width), None
    if isinstance(counts, bytes):
      counts = counts.decode('ascii')
    if not isinstance(counts, str):
      raise ValueError('counts must be a string or a list of integers')
    _check_runs(_compressed_counts(counts), height, width)
  except (ValueError, UnicodeDecodeError) as err:
    raise AnnotationError(path, f'{field}.counts', f'invalid RLE: {err}') from None
  return {'size': [height, width], 'counts': counts.encode('ascii')}, None


def _decode(rle: dict) -> np.ndarray:
  return mask_utils.decode(rle).astype(bool)


def _rate(occluded: np.ndarray, amodal: np.ndarray) -> float:
  area = int(amodal.sum())
  return float((occluded & amodal).sum()) / area if area else 0.0


def _dense_rank(values: list) -> list[int]:
  """Dense rank: the smallest value gets 0, equal values share a rank."""
  order = {v: r for r, v in enumerate(sorted(set(values)))}
  return [order[v] for v in values]


def _instance(
    amodal: np.ndarray,
    visible: np.ndarray,
    occluded: np.ndarray,
    rank: int,
    rate: float,
    polygons=None,
    **kw,
) -> records.InstanceAnnotation:
  return records.InstanceAnnotation(
      amodal_rle=records.encode_mask(amodal),
      visible_rle=records.encode_mask(visible),
      occluded_rle=records.encode_mask(occluded),
      depth_rank=int(rank),
      occlude_rate=float(rate),
      amodal_polygons=polygons,
      **kw,
  )


def _group_annotations(
    data: dict, path: str, images: list[_Image]
) -> dict[int, list[tuple[int, dict]]]:
  """image id -> [(index in ``annotations``, annotation)] in file order."""
  ids = {img.image_id for img in images}
  groups: dict[int, list] = {}
  for k, ann in enumerate(_get(data, 'annotations', path, '', list)):
    image_id = _get(ann, 'image_id', path, f'annotations[{k}]', int)
    if image_id not in ids:
      raise AnnotationError(
          path, f'annotations[{k}].image_id', f'no image with id {image_id} in "images"'
      )
    groups.setdefault(image_id, []).append((k, ann))
  return groups


def _category_names(data: dict) -> dict:
  cats = data.get('categories')
  if not isinstance(cats, list):
    return {}
  return {c.get('id'): str(c.get('name', '')) for c in cats if isinstance(c, dict)}


def _flat_instances(path: str, keep_empty: bool = False):
  """Reads a flat COCO-style file (one annotation per instance).

  Returns ([(image, [(index in ``annotations``, annotation)])] for the images
  that have annotations (all images with ``keep_empty``), category id -> name,
  number of images without any).
  """
  data = _load_json(path)
  images = _read_images(data, path)
  groups = _group_annotations(data, path, images)
  per_image = [
      (img, groups.get(img.image_id, []))
      for img in images
      if keep_empty or groups.get(img.image_id)
  ]
  empty = sum(1 for img in images if not groups.get(img.image_id))
  return per_image, _category_names(data), empty


def _empty(img: _Image, images_dir: Optional[str], path: str) -> records.ImageAnnotation:
  _check_image_file(img, images_dir, path)
  return records.ImageAnnotation(img.image_id, img.file_name, img.height, img.width, [], [])


def _finish(out: list, stats: Optional[ReadStats], skipped: int) -> list:
  if stats is not None:
    stats.num_images += len(out)
    stats.num_instances += sum(a.num_instances for a in out)
    stats.skipped_empty += skipped
  return out


# ------------------------------------------------------------------- COCOA


def _parse_depth_constraint(
    text: Any, order_to_index: dict, path: str, field: str, file_name: str
) -> list:
  """ "1-2,1-5" (order numbers, a in front of b) -> [(index_a, index_b)]."""
  if text is None or text == '':
    return []
  if not isinstance(text, str):
    raise AnnotationError(path, field, 'expected a string like "1-2,1-5"')
  pairs = []
  for token in text.split(','):
    token = token.strip()
    if not token:
      continue
    match = re.fullmatch(r'(\d+)\s*-\s*(\d+)', token)
    if not match:
      raise AnnotationError(
          path, field, f'malformed pair {token!r} (expected "a-b" with order numbers)'
      )
    a, b = int(match.group(1)), int(match.group(2))
    for o in (a, b):
      if o not in order_to_index:
        raise AnnotationError(
            path,
            field,
            f'pair {token!r} names order {o}, ' f'which no region of image {file_name} has',
        )
    if a == b:
      raise AnnotationError(path, field, f'pair {token!r} relates a region to itself')
    pairs.append((order_to_index[a], order_to_index[b]))
  return pairs


def _cocoa_image(img: _Image, k: int, ann: dict, path: str) -> records.ImageAnnotation:
  where = f'annotations[{k}]'
  regions = _get(ann, 'regions', path, where, list)
  h, w = img.height, img.width
  entries = []
  for j, reg in enumerate(regions):
    rwhere = f'{where}.regions[{j}]'
    if not isinstance(reg, dict) or 'order' not in reg:
      raise AnnotationError(
          path, f'{rwhere}.order', 'required key is missing ' f'(region of image {img.file_name})'
      )
    order = _get(reg, 'order', path, rwhere, int)
    entries.append((order, j, reg))
  entries.sort(key=lambda e: e[0])
  orders = [e[0] for e in entries]
  if len(set(orders)) != len(orders):
    dup = next(o for o in orders if orders.count(o) > 1)
    raise AnnotationError(
        path, f'{where}.regions', f'order {dup} appears ' f'twice in image {img.file_name}'
    )
  ranks = _dense_rank(orders)
  instances = []
  for (order, j, reg), rank in zip(entries, ranks):
    rwhere = f'{where}.regions[{j}]'
    rle, polys = _to_rle(
        _get(reg, 'segmentation', path, rwhere), h, w, path, f'{rwhere}.segmentation'
    )
    amodal = _decode(rle)
    has_invis = 'invisible_mask' in reg
    occluded = np.zeros((h, w), bool)
    if has_invis:
      occluded = _decode(_to_rle(reg['invisible_mask'], h, w, path, f'{rwhere}.invisible_mask')[0])
    if 'visible_mask' in reg:
      visible = _decode(_to_rle(reg['visible_mask'], h, w, path, f'{rwhere}.visible_mask')[0])
    else:
      visible = amodal & ~occluded
    rate = reg.get('occlude_rate')
    if rate is None:
      rate = _rate(occluded, amodal)
    elif not _is_kind(rate, float):
      raise AnnotationError(path, f'{rwhere}.occlude_rate', 'expected a number')
    instances.append(
        _instance(
            amodal,
            visible,
            occluded,
            rank,
            rate,
            polys,
            is_stuff=bool(reg.get('isStuff', 0)),
            category_id=1,
            name=str(reg.get('name', '')),
            extra={
                'order': order,
                'region_index': j,
                'area': reg.get('area'),
                'invisible_annotated': has_invis,
                'annotation_id': ann.get('id'),
            },
        )
    )
  pairs = _parse_depth_constraint(
      ann.get('depth_constraint'),
      {o: i for i, o in enumerate(orders)},
      path,
      f'{where}.depth_constraint',
      img.file_name,
  )
  return records.ImageAnnotation(img.image_id, img.file_name, h, w, instances, pairs)


def load_cocoa(
    path: str,
    images_dir: Optional[str] = None,
    stats: Optional[ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Reads a COCOA json (``COCO_amodal_*2014.json``); see module doc."""
  data = _load_json(path)
  images = _read_images(data, path)
  groups = _group_annotations(data, path, images)
  out, skipped = [], 0
  for img in images:
    anns = groups.get(img.image_id)
    record = _cocoa_image(img, *anns[0], path) if anns else None  # first pass
    if record is None or not record.instances:
      skipped += 1
      if keep_empty:
        out.append(_empty(img, images_dir, path))
      continue
    _check_image_file(img, images_dir, path)
    out.append(record)
  return _finish(out, stats, skipped)


# -------------------------------------------------------------------- D2SA


def _overlaps(masks: list[np.ndarray]) -> np.ndarray:
  """(N, N) pixel counts of pairwise intersections."""
  if not masks:
    return np.zeros((0, 0), np.int64)
  flat = np.stack(masks).reshape(len(masks), -1).astype(np.float32)
  return np.rint(flat @ flat.T).astype(np.int64)


def load_d2sa(
    path: str,
    images_dir: Optional[str] = None,
    stats: Optional[ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Reads a D2SA json (flat COCO-style instances); see module doc."""
  per_image, names, skipped = _flat_instances(path, keep_empty)
  out = []
  for img, anns in per_image:
    if not anns:
      out.append(_empty(img, images_dir, path))
      continue
    h, w = img.height, img.width
    keyed = []
    for k, ann in anns:
      depth = _get(ann, 'occl_depth', path, f'annotations[{k}]', float)
      keyed.append((depth, k, ann))
    keyed.sort(key=lambda e: e[0])  # stable, like the release's sorted()
    depths = [e[0] for e in keyed]
    ranks = _dense_rank(depths)
    instances, amodals = [], []
    for (depth, k, ann), rank in zip(keyed, ranks):
      where = f'annotations[{k}]'
      rle, polys = _to_rle(
          _get(ann, 'segmentation', path, where), h, w, path, f'{where}.segmentation'
      )
      amodal = _decode(rle)
      visible = _decode(
          _to_rle(_get(ann, 'visible_mask', path, where), h, w, path, f'{where}.visible_mask')[0]
      )
      has_invis = 'invisible_mask' in ann
      if has_invis:
        occluded = _decode(_to_rle(ann['invisible_mask'], h, w, path, f'{where}.invisible_mask')[0])
      else:
        occluded = amodal & ~visible
      category_id = _get(ann, 'category_id', path, where, int)
      region = ann.get('amodal_region')
      region = region if isinstance(region, dict) else {}
      rate = ann.get('occlude_rate')
      if rate is None:
        rate = _rate(occluded, amodal)
      elif not _is_kind(rate, float):
        raise AnnotationError(path, f'{where}.occlude_rate', 'expected a number')
      instances.append(
          _instance(
              amodal,
              visible,
              occluded,
              rank,
              rate,
              polys,
              is_stuff=bool(region.get('isStuff', 0)),
              category_id=category_id,
              name=str(region.get('name', names.get(category_id, ''))),
              extra={
                  'occl_depth': depth,
                  'order': region.get('order'),
                  'annotation_id': ann.get('id'),
                  'area': ann.get('area'),
                  'iscrowd': ann.get('iscrowd', 0),
                  'invisible_annotated': has_invis,
              },
          )
      )
      amodals.append(amodal)
    inter = _overlaps(amodals)
    pairs = [
        (a, b)
        for a in range(len(depths))
        for b in range(len(depths))
        if depths[a] < depths[b] and inter[a, b] > 0
    ]
    _check_image_file(img, images_dir, path)
    out.append(records.ImageAnnotation(img.image_id, img.file_name, h, w, instances, pairs))
  return _finish(out, stats, skipped)


# -------------------------------------------------------------------- KINS


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


def _pick_key(ann: dict, key: str, legacy_key: str) -> str:
  """The 2020 key unless only the 2019 one is present."""
  return legacy_key if key not in ann and legacy_key in ann else key


def load_kins(
    path: str,
    images_dir: Optional[str] = None,
    stats: Optional[ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Reads a KINS json (``update_{train,test}_2020.json`` or the 2019
  ``instances_*.json``); instances keep file order, see module doc."""
  per_image, names, skipped = _flat_instances(path, keep_empty)
  out = []
  for img, anns in per_image:
    if not anns:
      out.append(_empty(img, images_dir, path))
      continue
    h, w = img.height, img.width
    parts = []
    for k, ann in anns:
      where = f'annotations[{k}]'
      a_key = _pick_key(ann, 'a_segm', 'segmentation')
      i_key = _pick_key(ann, 'i_segm', 'inmodal_seg')
      rle, polys = _to_rle(_get(ann, a_key, path, where), h, w, path, f'{where}.{a_key}')
      amodal = _decode(rle)
      visible = _decode(_to_rle(_get(ann, i_key, path, where), h, w, path, f'{where}.{i_key}')[0])
      category_id = _get(ann, 'category_id', path, where, int)
      parts.append((k, ann, amodal, visible, amodal & ~visible, polys, category_id))
    pairs, ranks = derive_depth_order(
        np.stack([p[3] for p in parts]), np.stack([p[4] for p in parts])
    )
    instances = []
    for (_, ann, amodal, visible, occluded, polys, category_id), rank in zip(parts, ranks):
      extra = {
          key: ann[key]
          for key in (
              'id',
              'oco_id',
              'ico_id',
              'a_bbox',
              'i_bbox',
              'area',
              'a_area',
              'i_area',
              'iscrowd',
          )
          if key in ann
      }
      extra['invisible_annotated'] = True
      instances.append(
          _instance(
              amodal,
              visible,
              occluded,
              rank,
              _rate(occluded, amodal),
              polys,
              category_id=category_id,
              name=names.get(category_id, ''),
              extra=extra,
          )
      )
    _check_image_file(img, images_dir, path)
    out.append(records.ImageAnnotation(img.image_id, img.file_name, h, w, instances, pairs))
  return _finish(out, stats, skipped)


# ----------------------------------------------------------------- release


def release_paths(dataset_dir: str, split: str) -> tuple[str, str]:
  """(annotation json, images dir) of a release folder: ``<dir>/annotations/
  COCO_amodal_<split>2014.json`` (or the one json naming ``split``) and
  ``<dir>/<split>2014`` holding the images and their ``<stem>.npz`` layers."""
  ann_dir = os.path.join(dataset_dir, 'annotations')
  if not os.path.isdir(ann_dir):
    raise AnnotationError(
        dataset_dir, 'annotations', 'no annotations/ folder in the release dataset directory'
    )
  images_dir = os.path.join(dataset_dir, f'{split}2014')
  preferred = os.path.join(ann_dir, f'COCO_amodal_{split}2014.json')
  if os.path.isfile(preferred):
    return preferred, images_dir
  found = sorted(
      p for p in glob.glob(os.path.join(ann_dir, '*.json')) if split in os.path.basename(p)
  )
  if len(found) != 1:
    raise AnnotationError(
        ann_dir, split, f'expected one json for split ' f'{split!r}, found {len(found)}'
    )
  return found[0], images_dir


def load_release(
    dataset_dir: str, split: str, stats: Optional[ReadStats] = None
) -> list[records.ImageAnnotation]:
  """Reads a release folder (COCOA-style json); each image's legacy layer
  file is ``legacy_layers.legacy_path(release_paths(...)[1], file_name)``."""
  json_path, images_dir = release_paths(dataset_dir, split)
  return load_cocoa(json_path, images_dir, stats)


def _release_split(path: str) -> tuple[str, str]:
  """Annotation json inside a release folder -> (dataset_dir, split)."""
  match = re.search(r'([A-Za-z]+)2014\.json$', os.path.basename(path))
  if not match:
    raise AnnotationError(
        path,
        'file',
        'cannot infer the split from the name (expected COCO_amodal_<split>2014.json)',
    )
  return os.path.dirname(os.path.dirname(os.path.abspath(path))), match.group(1)


def load_annotations(
    fmt: str,
    path: str,
    images_dir: Optional[str] = None,
    stats: Optional[ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Dispatches on ``fmt`` in FORMATS. For 'release', ``path`` is the json in
  ``<dir>/annotations/`` and ``images_dir`` defaults to
  ``<dir>/<split>2014``. ``keep_empty`` keeps images without instances
  (ground truth for evaluation)."""
  if fmt == 'cocoa':
    return load_cocoa(path, images_dir, stats, keep_empty)
  if fmt == 'd2sa':
    return load_d2sa(path, images_dir, stats, keep_empty)
  if fmt == 'kins':
    return load_kins(path, images_dir, stats, keep_empty)
  if fmt == 'release':
    if images_dir is None:
      dataset_dir, split = _release_split(path)
      images_dir = os.path.join(dataset_dir, f'{split}2014')
    return load_cocoa(path, images_dir, stats, keep_empty)
  raise AnnotationError(
      path, 'format', f'unknown annotation format {fmt!r} ' f'(one of {", ".join(FORMATS)})'
  )
