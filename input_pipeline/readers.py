"""Annotation readers: the one entry for COCOA, COCOA-cls, D2SA, KINS and the
release's converted folders.

``load_annotations(fmt, path, ...)`` dispatches on ``fmt`` in ``FORMATS`` and
returns ``list[records.ImageAnnotation]`` in the order of the file's
``images`` list; ``load_categories(fmt, path)`` returns the file's classes.
Images without instances are skipped and counted in an optional
``ReadStats`` (``keep_empty=True`` keeps them as records with no instances:
the evaluator scores detections on them as false positives). Masks are COCO
RLE (``counts`` as str) of size [height, width] in image pixels; polygons are
rasterised with pycocotools (what the COCO-style evaluators use) and also
kept raw in ``InstanceAnnotation.amodal_polygons`` (the legacy .npz writer
rasterises them with PIL as the release did).

Each format's reader lives in its own module, which documents the schema:
  * 'cocoa', 'release': ``cocoa_reader`` (per-image annotator passes, regions
    sorted by ``order``, ``depth_constraint`` pairs; no classes).
  * 'cocoa_cls': ``cocoa_cls_reader`` (COCOA with COCO classes, flat
    instances; depth derived from the masks).
  * 'd2sa': ``d2sa_reader`` (flat instances sorted by ``occl_depth``).
  * 'kins': ``kins_reader`` (2020 ``a_segm``/``i_segm`` and the original
    ``segmentation``/``inmodal_seg``; depth derived from the masks).
Shared parsing lives in ``annotation_json`` (files, fields, images,
categories) and ``annotation_masks`` (segmentations, rates, depth order).

Bad input raises ``records.AnnotationError(path, field, message)`` with the
field as a JSON path such as ``annotations[3].regions[0].order``.
"""

from __future__ import annotations

import os
from typing import Optional

from input_pipeline import annotation_masks, records
from input_pipeline.annotation_json import ReadStats, load_json, read_categories
from input_pipeline.annotation_masks import derive_depth_order
from input_pipeline.cocoa_cls_reader import load_cocoa_cls
from input_pipeline.cocoa_reader import load_cocoa, load_release, release_paths, release_split
from input_pipeline.d2sa_reader import load_d2sa
from input_pipeline.kins_reader import load_kins
from input_pipeline.records import AnnotationError

__all__ = [
    'FILE_FORMATS',
    'FORMATS',
    'ReadStats',
    'derive_depth_order',
    'load_annotations',
    'load_categories',
    'load_cocoa',
    'load_cocoa_cls',
    'load_d2sa',
    'load_kins',
    'load_release',
    'release_paths',
]

# The COCO compressed-RLE decoder, for the tests that check RLE strings.
_compressed_counts = annotation_masks.compressed_counts

FORMATS = ('cocoa', 'cocoa_cls', 'd2sa', 'kins', 'release')
# The formats of one annotation file (the command-line tools' --format).
FILE_FORMATS = ('cocoa', 'cocoa_cls', 'd2sa', 'kins')

# Formats whose files carry no classes: every instance is category 1.
_CLASSLESS = ('cocoa', 'release')
_CLASSLESS_CATEGORIES = ({'id': 1, 'name': 'object'},)

_READERS = {
    'cocoa': load_cocoa,
    'cocoa_cls': load_cocoa_cls,
    'd2sa': load_d2sa,
    'kins': load_kins,
}


def _unknown_format(fmt: str, path: str) -> AnnotationError:
  return AnnotationError(
      path, 'format', f'unknown annotation format {fmt!r} ' f'(one of {", ".join(FORMATS)})'
  )


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
  if fmt in _READERS:
    return _READERS[fmt](path, images_dir, stats, keep_empty)
  if fmt == 'release':
    if images_dir is None:
      dataset_dir, split = release_split(path)
      images_dir = os.path.join(dataset_dir, f'{split}2014')
    return load_cocoa(path, images_dir, stats, keep_empty)
  raise _unknown_format(fmt, path)


def load_categories(fmt: str, path: str) -> list[dict]:
  """The classes of an annotation file: [{'id': int, 'name': str}, ...]
  sorted by id, the ``category_id`` values its records carry.

  Formats without classes ('cocoa', 'release') give
  ``[{'id': 1, 'name': 'object'}]`` without reading the file. The others
  read the file's ``categories`` list (extra keys such as ``supercategory``
  are dropped).

  Raises:
    records.AnnotationError: unknown ``fmt``, an unreadable file, or a
      ``categories`` list that is missing or has an entry that is not an
      object with an integer ``id`` (unique) and a string ``name`` (the field
      named as ``categories[k].id``).
  """
  if fmt in _CLASSLESS:
    return [dict(c) for c in _CLASSLESS_CATEGORIES]
  if fmt not in _READERS:
    raise _unknown_format(fmt, path)
  return read_categories(load_json(path), path)
