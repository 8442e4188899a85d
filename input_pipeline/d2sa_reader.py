"""D2SA (MVTec D2S amodal, ``D2S_amodal_*.json``).

Flat COCO-style instances: amodal ``segmentation`` (RLE or polygon),
``visible_mask`` (required), optional ``invisible_mask``, ``category_id`` (60
classes), ``occlude_rate``, ``occl_depth`` (per-instance depth) and sometimes
``amodal_region`` {name, isStuff, order, ...}. Instances are grouped per
image and sorted (stably) by ``occl_depth``; ``depth_rank`` is its dense
rank; occluded = ``invisible_mask``, else amodal & ~visible.
``depth_pairs`` are the pairs of overlapping amodal masks with different
``occl_depth``.
"""

from __future__ import annotations

from typing import Optional

from input_pipeline import annotation_json as aj
from input_pipeline import annotation_masks as am
from input_pipeline import records


def load_d2sa(
    path: str,
    images_dir: Optional[str] = None,
    stats: Optional[aj.ReadStats] = None,
    keep_empty: bool = False,
) -> list[records.ImageAnnotation]:
  """Reads a D2SA json (flat COCO-style instances); see module doc."""
  per_image, names, skipped = aj.flat_instances(path, keep_empty)
  out = []
  for img, anns in per_image:
    if not anns:
      out.append(aj.empty_record(img, images_dir, path))
      continue
    h, w = img.height, img.width
    keyed = []
    for k, ann in anns:
      depth = aj.get(ann, 'occl_depth', path, f'annotations[{k}]', float)
      keyed.append((depth, k, ann))
    keyed.sort(key=lambda e: e[0])  # stable, like the release's sorted()
    depths = [e[0] for e in keyed]
    ranks = am.dense_rank(depths)
    instances, amodals = [], []
    for (depth, k, ann), rank in zip(keyed, ranks):
      where = f'annotations[{k}]'
      rle, polys = am.to_rle(
          aj.get(ann, 'segmentation', path, where), h, w, path, f'{where}.segmentation'
      )
      amodal = am.decode(rle)
      visible = am.read_mask(
          aj.get(ann, 'visible_mask', path, where), h, w, path, f'{where}.visible_mask'
      )
      has_invis = 'invisible_mask' in ann
      if has_invis:
        occluded = am.read_mask(ann['invisible_mask'], h, w, path, f'{where}.invisible_mask')
      else:
        occluded = amodal & ~visible
      category_id = aj.get(ann, 'category_id', path, where, int)
      region = ann.get('amodal_region')
      region = region if isinstance(region, dict) else {}
      instances.append(
          am.instance(
              amodal,
              visible,
              occluded,
              rank,
              am.file_rate(ann, occluded, amodal, path, where),
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
    pairs = am.overlapping_depth_pairs(depths, amodals)
    aj.check_image_file(img, images_dir, path)
    out.append(records.ImageAnnotation(img.image_id, img.file_name, h, w, instances, pairs))
  return aj.finish(out, stats, skipped)
