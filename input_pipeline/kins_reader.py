"""KINS (KITTI INStance, amodal; Qi et al. 2019), both releases.

  * The 2020 release (``update_train_2020.json`` / ``update_test_2020.json``):
    per annotation ``a_segm`` / ``i_segm`` (amodal / visible polygons),
    ``a_bbox`` / ``i_bbox``, ``a_area`` / ``i_area``, ``oco_id`` (occlusion
    cluster) and ``ico_id`` (relative occlusion order in the cluster, 0 for
    instances that overlap nothing), ``category_id``, ``iscrowd``; eight
    categories, ids 1-8 (cyclist, pedestrian, rider, car, tram, truck, van,
    misc).
  * The original release (``instances_train.json`` / ``instances_val.json``):
    ``segmentation`` (amodal polygons) and ``inmodal_seg`` (visible, an RLE),
    ``bbox`` / ``inmodal_bbox``, ``area``, ``category_id``; seven categories,
    ids 1, 2, 4, 5, 6, 7, 8 (no 3).

Sources for these keys: the KINS README (qqlu/Amodal-Instance-Segmentation-
through-KINS-Dataset, README.md: "a_*" / "i_*", "oco_id" / "ico_id");
XiaohangZhan/deocclusion datasets/reader.py (instances_*.json: ``inmodal_seg``
decoded as RLE, ``segmentation`` polygons); trqminh/aistron
aistron/data/datasets/register_kins.py (the two category lists).

The visible mask is read from ``i_segm``, else ``inmodal_seg``; the amodal one
from ``a_segm``, else ``segmentation``. Occluded = amodal & ~visible. The
depth order is derived from the masks (``annotation_masks.derive_depth_order``;
the 2020 ``ico_id`` orders only within a cluster); ``oco_id``/``ico_id`` are
kept in ``extra``. Instances keep file order.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from input_pipeline import annotation_json as aj
from input_pipeline import annotation_masks as am
from input_pipeline import records

_EXTRA_KEYS = ('id', 'oco_id', 'ico_id', 'a_bbox', 'i_bbox', 'area', 'a_area', 'i_area', 'iscrowd')


def _pick_key(ann: dict, key: str, legacy_key: str) -> str:
  """The 2020 key unless only the original release's one is present."""
  return legacy_key if key not in ann and legacy_key in ann else key


def load_kins(
    path: str,
    images_dir: Optional[str] = None,
    stats: Optional[aj.ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Reads a KINS json (``update_{train,test}_2020.json`` or the original
  ``instances_*.json``); instances keep file order, see module doc."""
  per_image, names, skipped = aj.flat_instances(path, keep_empty)
  out = []
  for img, anns in per_image:
    if not anns:
      out.append(aj.empty_record(img, images_dir, path))
      continue
    h, w = img.height, img.width
    parts = []
    for k, ann in anns:
      where = f'annotations[{k}]'
      a_key = _pick_key(ann, 'a_segm', 'segmentation')
      i_key = _pick_key(ann, 'i_segm', 'inmodal_seg')
      rle, polys = am.to_rle(aj.get(ann, a_key, path, where), h, w, path, f'{where}.{a_key}')
      amodal = am.decode(rle)
      visible = am.read_mask(aj.get(ann, i_key, path, where), h, w, path, f'{where}.{i_key}')
      category_id = aj.get(ann, 'category_id', path, where, int)
      parts.append((k, ann, amodal, visible, amodal & ~visible, polys, category_id))
    pairs, ranks = am.derive_depth_order(
        np.stack([p[3] for p in parts]), np.stack([p[4] for p in parts])
    )
    instances = []
    for (_, ann, amodal, visible, occluded, polys, category_id), rank in zip(parts, ranks):
      extra = {key: ann[key] for key in _EXTRA_KEYS if key in ann}
      extra['invisible_annotated'] = True
      instances.append(
          am.instance(
              amodal,
              visible,
              occluded,
              rank,
              am.rate(occluded, amodal),
              polys,
              category_id=category_id,
              name=names.get(category_id, ''),
              extra=extra,
          )
      )
    aj.check_image_file(img, images_dir, path)
    out.append(records.ImageAnnotation(img.image_id, img.file_name, h, w, instances, pairs))
  return aj.finish(out, stats, skipped)
