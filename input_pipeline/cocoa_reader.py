"""COCOA (Zhu et al. 2017, ``COCO_amodal_{train,val,test}2014.json``) and
the release's converted folders, which use the same json.

Each annotation is one annotator's pass over an image: ``regions`` (amodal
``segmentation`` polygon, ``name``, ``isStuff``, ``occlude_rate``, ``order``
with 1 = front-most, and, when occluded, ``visible_mask`` /
``invisible_mask`` RLEs) and ``depth_constraint`` ("a-b" pairs of order
numbers, a in front of b). Only the FIRST annotation of an image (file order)
is read, as the amodalAPI evaluator does. Regions are sorted (stably) by
``order``; ``depth_rank`` is the dense rank of ``order`` (order 1 -> 0); the
constraint pairs become instance-index pairs. Visible = the ``visible_mask``
RLE, else amodal minus ``invisible_mask``, else amodal. COCOA has no classes:
``category_id`` is 1.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Optional

import numpy as np

from input_pipeline import annotation_json as aj
from input_pipeline import annotation_masks as am
from input_pipeline import records
from input_pipeline.records import AnnotationError


def parse_depth_constraint(
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


def _cocoa_image(img: aj.ImageEntry, k: int, ann: dict, path: str) -> records.ImageAnnotation:
  where = f'annotations[{k}]'
  regions = aj.get(ann, 'regions', path, where, list)
  h, w = img.height, img.width
  entries = []
  for j, reg in enumerate(regions):
    rwhere = f'{where}.regions[{j}]'
    if not isinstance(reg, dict) or 'order' not in reg:
      raise AnnotationError(
          path, f'{rwhere}.order', 'required key is missing ' f'(region of image {img.file_name})'
      )
    order = aj.get(reg, 'order', path, rwhere, int)
    entries.append((order, j, reg))
  entries.sort(key=lambda e: e[0])
  orders = [e[0] for e in entries]
  if len(set(orders)) != len(orders):
    dup = next(o for o in orders if orders.count(o) > 1)
    raise AnnotationError(
        path, f'{where}.regions', f'order {dup} appears ' f'twice in image {img.file_name}'
    )
  ranks = am.dense_rank(orders)
  instances = []
  for (order, j, reg), rank in zip(entries, ranks):
    rwhere = f'{where}.regions[{j}]'
    rle, polys = am.to_rle(
        aj.get(reg, 'segmentation', path, rwhere), h, w, path, f'{rwhere}.segmentation'
    )
    amodal = am.decode(rle)
    has_invis = 'invisible_mask' in reg
    occluded = np.zeros((h, w), bool)
    if has_invis:
      occluded = am.read_mask(reg['invisible_mask'], h, w, path, f'{rwhere}.invisible_mask')
    if 'visible_mask' in reg:
      visible = am.read_mask(reg['visible_mask'], h, w, path, f'{rwhere}.visible_mask')
    else:
      visible = amodal & ~occluded
    instances.append(
        am.instance(
            amodal,
            visible,
            occluded,
            rank,
            am.file_rate(reg, occluded, amodal, path, rwhere),
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
  pairs = parse_depth_constraint(
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
    stats: Optional[aj.ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Reads a COCOA json (``COCO_amodal_*2014.json``); see module doc."""
  data = aj.load_json(path)
  images = aj.read_images(data, path)
  groups = aj.group_annotations(data, path, images)
  out, skipped = [], 0
  for img in images:
    anns = groups.get(img.image_id)
    record = _cocoa_image(img, *anns[0], path) if anns else None  # first pass
    if record is None or not record.instances:
      skipped += 1
      if keep_empty:
        out.append(aj.empty_record(img, images_dir, path))
      continue
    aj.check_image_file(img, images_dir, path)
    out.append(record)
  return aj.finish(out, stats, skipped)


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
    dataset_dir: str, split: str, stats: Optional[aj.ReadStats] = None
) -> list[records.ImageAnnotation]:
  """Reads a release folder (COCOA-style json); each image's legacy layer
  file is ``legacy_layers.legacy_path(release_paths(...)[1], file_name)``."""
  json_path, images_dir = release_paths(dataset_dir, split)
  return load_cocoa(json_path, images_dir, stats)


def release_split(path: str) -> tuple[str, str]:
  """Annotation json inside a release folder -> (dataset_dir, split)."""
  match = re.search(r'([A-Za-z]+)2014\.json$', os.path.basename(path))
  if not match:
    raise AnnotationError(
        path,
        'file',
        'cannot infer the split from the name (expected COCO_amodal_<split>2014.json)',
    )
  return os.path.dirname(os.path.dirname(os.path.abspath(path))), match.group(1)
