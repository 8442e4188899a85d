"""The release's layered annotation files (``<image stem>.npz``, array
``layer``, uint64 (H, W)), written exactly as its conversion notebook did.

Encoding (object i = 0..31: the position in the file's ``regions`` list,
``extra['region_index']``, for COCOA, as the release indexes
``anns['regions'][i]``; else the ``ImageAnnotation.instances`` order, which
for D2SA is the release's ``occl_depth`` sort):
  * bit 32+i where instance i's annotated invisible mask is non-zero;
  * bit i where (amodal XOR invisible) is non-zero, so invisible pixels
    outside the amodal mask get both bits;
  * then every distinct value is cleared to 0 everywhere unless one of its
    4-connected components has at least 64 pixels.
Amodal masks given as polygons are rasterised with PIL
(``ImageDraw.polygon(points, fill=255)`` on an 'L' image of size (w, h), one
call per polygon); RLE masks are decoded with pycocotools. As in the release,
an instance without an annotated ``invisible_mask``
(``extra['invisible_annotated']`` False) counts as fully visible. The file is
``np.savez_compressed(..., layer=...)`` (deterministic bytes). Unlike the
release, more than 32 instances are refused, never dropped.
"""

from __future__ import annotations

import os
from typing import Optional
import zipfile

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from input_pipeline import records
from input_pipeline.records import AnnotationError
from sln_jax import files

MAX_INSTANCES = 32  # bits 0..31 visible, 32..63 invisible
MIN_COMPONENT_SIZE = 64  # a value survives if one component has >= 64 pixels
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def legacy_path(images_dir: str, file_name: str) -> str:
  """Where the release keeps an image's layer file: beside the image."""
  return os.path.join(images_dir, os.path.splitext(file_name)[0] + '.npz')


def rasterize_polygons(polygons: list, height: int, width: int) -> np.ndarray:
  """[[x1, y1, x2, y2, ...], ...] (pixel coords) -> (H, W) bool, with PIL."""
  img = Image.new('L', (width, height))
  draw = ImageDraw.Draw(img)
  for poly in polygons:
    draw.polygon(list(poly), fill=255)
  return np.asarray(img) > 0


def check_capacity(ann: records.ImageAnnotation, source: Optional[str] = None):
  """Raises AnnotationError if ``ann`` has more instances than the format."""
  if ann.num_instances > MAX_INSTANCES:
    raise AnnotationError(
        source or ann.file_name,
        f'image {ann.file_name} (id {ann.image_id})',
        f'{ann.num_instances} instances; the legacy .npz layer format holds at '
        f'most {MAX_INSTANCES} (write fewer or use the TFDS records)',
    )


def remove_small_values(layer: np.ndarray, min_size: int = MIN_COMPONENT_SIZE) -> np.ndarray:
  """Clears (to 0) every value none of whose 4-connected components has
  ``min_size`` pixels. Returns a new array."""
  out = layer.copy()
  for value in np.unique(layer):
    if value == 0:
      continue
    mask = layer == value
    labels, count = ndimage.label(mask, structure=_FOUR_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    if sizes.max() < min_size:
      out[mask] = 0
  return out


def _amodal_mask(inst: records.InstanceAnnotation, height: int, width: int) -> np.ndarray:
  if inst.amodal_polygons:
    return rasterize_polygons(inst.amodal_polygons, height, width)
  return records.decode_rle(inst.amodal_rle)


def encode_legacy_layers(ann: records.ImageAnnotation, source: Optional[str] = None) -> np.ndarray:
  """ImageAnnotation -> (H, W) uint64 label map (see module doc).

  ``source`` names the file in errors (default: the image's file_name).
  """
  check_capacity(ann, source)
  h, w = ann.height, ann.width
  layer = np.zeros((h, w), np.uint64)
  bits = [inst.extra.get('region_index', i) for i, inst in enumerate(ann.instances)]
  if sorted(bits) != list(range(len(bits))):
    raise AnnotationError(
        source or ann.file_name, f'image {ann.file_name}', f'region indices {bits} are not 0..N-1'
    )
  for i, inst in zip(bits, ann.instances):
    amodal = _amodal_mask(inst, h, w)
    if inst.extra.get('invisible_annotated', True):
      invisible = records.decode_rle(inst.occluded_rle)
    else:
      invisible = np.zeros((h, w), bool)
    layer[invisible] |= np.uint64(1 << (32 + i))
    layer[amodal ^ invisible] |= np.uint64(1 << i)
  return remove_small_values(layer)


def save_layer(path: str, layer: np.ndarray):
  """Writes ``layer`` atomically, as the release did (np.savez_compressed)."""
  with files.atomic_output_file(path, 'wb') as f:
    np.savez_compressed(f, layer=np.asarray(layer, np.uint64))


def write_legacy_layers(path: str, ann: records.ImageAnnotation, source: Optional[str] = None):
  """Encodes ``ann`` and writes ``path`` (``<image stem>.npz``)."""
  save_layer(path, encode_legacy_layers(ann, source))


def read_legacy_layers(path: str, num_instances: Optional[int] = None) -> dict:
  """Reads a layer file.

  Returns dict of (N, H, W) bool arrays: ``visible`` (bit i: the release's
  amodal XOR invisible), ``invisible`` (bit 32+i) and ``amodal`` (their union).
  N is ``num_instances`` or 1 + the highest instance index present.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      if 'layer' not in data.files:
        raise AnnotationError(path, 'layer', 'no array named "layer"')
      layer = data['layer']
  except FileNotFoundError:
    raise AnnotationError(path, '', 'layer file not found') from None
  except (OSError, ValueError, zipfile.BadZipFile) as err:
    raise AnnotationError(path, '', f'not a .npz layer file: {err}') from None
  if layer.dtype != np.uint64 or layer.ndim != 2:
    raise AnnotationError(
        path, 'layer', f'expected uint64 (H, W), got ' f'{layer.dtype} {layer.shape}'
    )
  if num_instances is None:
    present = np.bitwise_or.reduce(layer.ravel()) if layer.size else 0
    bits = int(present) | (int(present) >> 32)
    num_instances = (bits & 0xFFFFFFFF).bit_length()
  if not 0 <= num_instances <= MAX_INSTANCES:
    raise AnnotationError(
        path, 'num_instances', f'{num_instances} is outside ' f'0..{MAX_INSTANCES}'
    )
  shifts = np.arange(num_instances, dtype=np.uint64)[:, None, None]
  one = np.uint64(1)
  visible = ((layer[None] >> shifts) & one).astype(bool)
  invisible = ((layer[None] >> (shifts + np.uint64(32))) & one).astype(bool)
  return {'visible': visible, 'invisible': invisible, 'amodal': visible | invisible}
