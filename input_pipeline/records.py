"""Lossless per-image amodal annotation records shared by every reader.

Two levels:
  * ``ImageAnnotation`` / ``InstanceAnnotation``: compact, masks as COCO RLE
    (pycocotools dicts, ``counts`` as bytes or str). What readers return and
    what the evaluator consumes.
  * ``AmodalRecord``: dense numpy masks for one image, built by
    ``to_record``; what the TFDS builders and the semdist encoder consume.

Conventions: masks are (N, H, W) bool in image pixels; ``depth_rank`` is 0 for
the front-most instance (larger = further back, ties allowed for objects that
never overlap); ``depth_pairs`` lists (front, back) instance indices as
annotated (COCOA ``depth_constraint``), from per-instance depths (D2SA
``occl_depth``) or derived from the masks (KINS, COCOA-cls). Instances keep
the order of the source file (COCOA: by ``order``; D2SA: by ``occl_depth``);
there is no cap on their number.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
from pycocotools import mask as mask_utils

from sln_jax.errors import UserError


@dataclasses.dataclass
class InstanceAnnotation:
  amodal_rle: dict  # amodal mask (COCO RLE, size [h, w])
  visible_rle: dict  # visible (modal) mask
  occluded_rle: dict  # annotated invisible part (empty if fully visible)
  depth_rank: int  # 0 = front-most
  occlude_rate: float  # invisible area / amodal area, in [0, 1]
  is_stuff: bool = False
  category_id: int = 1
  name: str = ''
  # Raw amodal polygon(s) as in the file ([[x1, y1, x2, y2, ...], ...]) when the
  # source gave a polygon; the legacy .npz writer rasterises these with PIL.
  amodal_polygons: Optional[list] = None
  # Source-specific extras kept for lossless round trips (e.g. COCOA `order`).
  extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ImageAnnotation:
  image_id: int
  file_name: str  # relative to the images directory
  height: int
  width: int
  instances: list  # list[InstanceAnnotation]
  depth_pairs: list = dataclasses.field(default_factory=list)  # [(front, back)]

  @property
  def num_instances(self) -> int:
    return len(self.instances)


@dataclasses.dataclass
class AmodalRecord:
  """Dense masks of one image. N may be 0 only if the caller allows it."""

  image_id: int
  image_path: str
  height: int
  width: int
  amodal: np.ndarray  # (N, H, W) bool
  visible: np.ndarray  # (N, H, W) bool
  occluded: np.ndarray  # (N, H, W) bool
  depth_rank: np.ndarray  # (N,) int32, 0 = front-most
  occlude_rate: np.ndarray  # (N,) float32
  is_stuff: np.ndarray  # (N,) bool
  category_id: np.ndarray  # (N,) int32
  depth_pairs: np.ndarray  # (K, 2) int32 (front, back)


def decode_rle(rle: dict) -> np.ndarray:
  """COCO RLE -> (H, W) bool."""
  return mask_utils.decode(rle).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
  """(H, W) bool -> COCO RLE with ``counts`` as str (JSON-serialisable)."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle['counts'] = rle['counts'].decode('ascii')
  return rle


def to_record(ann: ImageAnnotation, images_dir: str = '') -> AmodalRecord:
  """Decodes every instance of ``ann`` into dense masks."""
  h, w, n = ann.height, ann.width, ann.num_instances

  def stack(key: str) -> np.ndarray:
    if n == 0:
      return np.zeros((0, h, w), bool)
    return np.stack([decode_rle(getattr(i, key)) for i in ann.instances])

  pairs = np.asarray(ann.depth_pairs, np.int32).reshape(-1, 2)
  return AmodalRecord(
      image_id=int(ann.image_id),
      image_path=os.path.join(images_dir, ann.file_name),
      height=h,
      width=w,
      amodal=stack('amodal_rle'),
      visible=stack('visible_rle'),
      occluded=stack('occluded_rle'),
      depth_rank=np.asarray([i.depth_rank for i in ann.instances], np.int32),
      occlude_rate=np.asarray([i.occlude_rate for i in ann.instances], np.float32),
      is_stuff=np.asarray([i.is_stuff for i in ann.instances], bool),
      category_id=np.asarray([i.category_id for i in ann.instances], np.int32),
      depth_pairs=pairs,
  )


class AnnotationError(UserError):
  """A user-fixable problem in an annotation file: names the file and field."""

  def __init__(self, path: str, field: str, message: str):
    super().__init__(message, path=path, field=field)
