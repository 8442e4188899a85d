"""COCOA-cls: COCOA with COCO classes, as released by the D2SA authors
(Follmann et al.; ``COCOA_annotations_detectron/COCO_amodal_{train,val}2014_
with_classes.json``), the class-aware COCOA of AISFormer, BCNet, aistron and
VRSP-Net.

Flat COCO-style instances, one annotation per object: ``segmentation``
(amodal, polygons or RLE), ``visible_mask`` and, when the object is occluded,
``invisible_mask`` (RLE, or polygons), ``category_id`` (COCO's 80 thing
classes with their sparse ids 1..90), ``occlude_rate``, ``bbox``, ``area``,
``iscrowd``, ``id``, ``image_id``; ``categories`` lists {id, name,
supercategory}. Sources for these keys: YutingXiao/Amodal-Segmentation-Based-
on-Visible-Region-Segmentation-and-Shape-Prior (VRSP-Net)
detectron2/data/datasets/cocoa_cls.py (``segmentation``, ``visible_mask`` as
RLE or polygons, ``occlude_rate``, ``category_id``) and builtin.py (the file
names); trqminh/aistron datasets/prepare_cocoa.py (``segmentation``,
``bbox``, ``visible_mask``, ``categories``) and
aistron/data/datasets/register_cocoa.py (the 80 categories).

Masks: visible = ``visible_mask``, else amodal minus ``invisible_mask``, else
amodal; occluded = ``invisible_mask``, else amodal & ~visible (the COCOA
reader's rule). ``occlude_rate`` is the file's, computed when absent.

Depth: the file has no depth order (no COCOA ``order`` or
``depth_constraint``), so it is derived from the masks as for KINS
(``annotation_masks.derive_depth_order``: A is in front of B where A's visible
mask covers B's occluded part; cycles lose their weakest overlap) and
instances keep file order. A file whose annotations carry D2SA's
``occl_depth`` (all of an image's, or none) is ordered by it instead, as the
D2SA reader does.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from input_pipeline import annotation_json as aj
from input_pipeline import annotation_masks as am
from input_pipeline import records
from input_pipeline.records import AnnotationError


def _instance(ann: dict, k: int, img: aj.ImageEntry, names: dict, path: str) -> tuple:
  """(amodal, visible, occluded, polygons, instance fields) of one annotation."""
  h, w = img.height, img.width
  where = f'annotations[{k}]'
  rle, polys = am.to_rle(
      aj.get(ann, 'segmentation', path, where), h, w, path, f'{where}.segmentation'
  )
  amodal = am.decode(rle)
  has_invis = 'invisible_mask' in ann
  occluded = None
  if has_invis:
    occluded = am.read_mask(ann['invisible_mask'], h, w, path, f'{where}.invisible_mask')
  if 'visible_mask' in ann:
    visible = am.read_mask(ann['visible_mask'], h, w, path, f'{where}.visible_mask')
  else:
    visible = amodal & ~occluded if has_invis else amodal
  if occluded is None:
    occluded = amodal & ~visible
  category_id = aj.get(ann, 'category_id', path, where, int)
  region = ann.get('amodal_region')
  region = region if isinstance(region, dict) else {}
  fields = dict(
      occlude_rate=am.file_rate(ann, occluded, amodal, path, where),
      is_stuff=bool(ann.get('isStuff', region.get('isStuff', 0))),
      category_id=category_id,
      name=names.get(category_id, ''),
      extra={
          'annotation_id': ann.get('id'),
          'area': ann.get('area'),
          'iscrowd': ann.get('iscrowd', 0),
          'invisible_annotated': has_invis,
      },
  )
  return amodal, visible, occluded, polys, fields


def _annotated_depths(anns: list, img: aj.ImageEntry, path: str) -> Optional[list]:
  """The image's ``occl_depth`` values (file order), or None when no
  annotation of the image has one."""
  present = ['occl_depth' in ann for _, ann in anns]
  if not any(present):
    return None
  if not all(present):
    k = anns[present.index(False)][0]
    raise AnnotationError(
        path,
        f'annotations[{k}].occl_depth',
        f'required key is missing (other annotations of image {img.file_name} have one)',
    )
  return [aj.get(ann, 'occl_depth', path, f'annotations[{k}]', float) for k, ann in anns]


def load_cocoa_cls(
    path: str,
    images_dir: Optional[str] = None,
    stats: Optional[aj.ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Reads a COCOA-cls json (``COCO_amodal_*2014_with_classes.json``); see
  module doc."""
  per_image, names, skipped = aj.flat_instances(path, keep_empty)
  out = []
  for img, anns in per_image:
    if not anns:
      out.append(aj.empty_record(img, images_dir, path))
      continue
    depths = _annotated_depths(anns, img, path)
    parts = [_instance(ann, k, img, names, path) for k, ann in anns]
    if depths is None:
      pairs, ranks = am.derive_depth_order(
          np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts])
      )
    else:
      order = sorted(range(len(parts)), key=lambda i: depths[i])  # stable
      parts, depths = [parts[i] for i in order], [depths[i] for i in order]
      for (*_, fields), depth in zip(parts, depths):
        fields['extra']['occl_depth'] = depth
      ranks = am.dense_rank(depths)
      pairs = am.overlapping_depth_pairs(depths, [p[0] for p in parts])
    instances = [
        am.instance(amodal, visible, occluded, rank, polygons=polys, **fields)
        for (amodal, visible, occluded, polys, fields), rank in zip(parts, ranks)
    ]
    aj.check_image_file(img, images_dir, path)
    h, w = img.height, img.width
    out.append(records.ImageAnnotation(img.image_id, img.file_name, h, w, instances, pairs))
  return aj.finish(out, stats, skipped)
