"""Synthetic amodal scenes written as a COCOA-schema dataset.

Each image holds textured shapes (ellipses, rotated rectangles, triangles,
random star polygons) and sometimes one large "stuff" region (a wide band or
a blob, ``isStuff`` = 1) at random depths with real overlaps, painted back to
front on a muted textured background (noise, gradient or stripes). Objects
are saturated and patterned (solid, stripes, checker, dots, gradient) so a
small CNN can tell them from the background.

Layout (the release's, read by ``readers.load_cocoa`` / ``load_release``)::

  <out>/annotations/COCO_amodal_<split>2014.json
  <out>/<split>2014/COCO_<split>2014_<image id:012d>.png  (or .jpg, quality 95)

JSON schema (COCOA, as in the release's annotation files, apchenstu/SLN-Amodal):
``images`` [{id, file_name, width, height}], ``annotations`` with one entry
per image {id, image_id, size, depth_constraint "a-b,..." (overlapping pairs,
a in front, by ``order``), regions}; each region {segmentation: flat polygon
[x1, y1, ...] in pixel coordinates (x right, y down, clipped to [0, w] x
[0, h]), name, area (amodal pixel count), isStuff, occlude_rate (invisible /
amodal pixels), order (1 = front-most; regions listed by order), and only
when occluded visible_mask / invisible_mask as COCO RLE with str counts}.

Self-consistency: the amodal mask is pycocotools' rasterisation of the
polygon exactly as written (``frPyObjects`` + ``decode``); visible = amodal
minus the amodal masks of every region in front; invisible = amodal &
~visible. Deterministic: the same arguments give byte-identical files (each
image draws from its own ``SeedSequence((seed, crc32(split), index))``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from typing import Callable, Optional, Sequence, Union
import zlib

import numpy as np
from PIL import Image
import tqdm

from input_pipeline import records
from input_pipeline import synthetic_shapes as shapes
from sln_jax import errors, files

THING_KINDS = ('ellipse', 'rectangle', 'triangle', 'polygon')
STUFF_KINDS = ('band', 'blob')
OCCLUSION_BINS = ('none', 'partial', 'heavy')  # 0, (0, 0.25], > 0.25


@dataclasses.dataclass(frozen=True)
class SceneParams:
  """Scene generator knobs (sizes are fractions of the shorter image side).

  Attributes:
    min_objects, max_objects: regions per image (stuff included).
    occlusion: probability that a new object is placed overlapping an
      earlier one (else uniformly); raises the share of occluded instances.
    stuff_prob: probability that an image has one stuff region.
    min_visible_fraction: every region keeps at least this share of its
      amodal area visible (bounds occlude_rate by 1 - this).
    thing_radius: (low, high) object radius.
    min_area: smallest amodal area, a fraction of the image area.
  """

  min_objects: int = 3
  max_objects: int = 6
  occlusion: float = 0.6
  stuff_prob: float = 0.3
  min_visible_fraction: float = 0.25
  thing_radius: tuple = (0.10, 0.22)
  min_area: float = 0.005

  def validate(self) -> None:
    if not 1 <= self.min_objects <= self.max_objects:
      raise errors.UserError(
          f'need 1 <= min_objects <= max_objects, got {self.min_objects}, ' f'{self.max_objects}',
          field='min_objects',
      )
    for name in ('occlusion', 'stuff_prob', 'min_visible_fraction'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise errors.UserError(f'must be in [0, 1], got ' f'{getattr(self, name)}', field=name)


# ------------------------------------------------------------------ scenes
@dataclasses.dataclass
class _Region:
  flat: list  # polygon [x1, y1, ...] as written
  amodal: np.ndarray  # (H, W) bool
  name: str
  is_stuff: bool
  center: tuple
  radius: float


def _visible_masks(regions: Sequence[_Region]) -> list:
  """Visible masks of regions listed front to back."""
  covered = np.zeros_like(regions[0].amodal)
  out = []
  for r in regions:
    out.append(r.amodal & ~covered)
    covered |= r.amodal
  return out


def _make_region(
    rng, params: SceneParams, height: int, width: int, stuff: bool, placed: Sequence[_Region]
) -> Optional[_Region]:
  """One random region, or None if it is degenerate after clipping."""
  side = min(height, width)
  if stuff:
    kind = STUFF_KINDS[int(rng.integers(len(STUFF_KINDS)))]
    pts = shapes.stuff_polygon(kind, rng, width, height)
    center, radius = (width / 2, height / 2), float(side)
  else:
    kind = THING_KINDS[int(rng.integers(len(THING_KINDS)))]
    radius = side * rng.uniform(*params.thing_radius)
    things = [r for r in placed if not r.is_stuff]
    if things and rng.random() < params.occlusion:
      other = things[int(rng.integers(len(things)))]
      dist = rng.uniform(0.45, 1.0) * (radius + other.radius)
      t = rng.uniform(0, 2 * math.pi)
      center = (other.center[0] + dist * math.cos(t), other.center[1] + dist * math.sin(t))
    else:
      center = (rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height)
    center = (
        float(np.clip(center[0], 0.1 * width, 0.9 * width)),
        float(np.clip(center[1], 0.1 * height, 0.9 * height)),
    )
    pts = shapes.thing_polygon(kind, rng, center, radius)
  pts = shapes.clip_polygon(pts, width, height)
  if len(pts) < 3:
    return None
  flat = [round(float(v), 2) for v in pts.reshape(-1)]
  amodal = shapes.rasterize(flat, height, width)
  if amodal.sum() < params.min_area * height * width:
    return None
  return _Region(flat, amodal, kind, stuff, center, radius)


def _scene_regions(rng: np.random.Generator, params: SceneParams, height: int, width: int) -> list:
  """Regions listed front to back; every one keeps enough visible area."""
  target = int(rng.integers(params.min_objects, params.max_objects + 1))
  want_stuff = rng.random() < params.stuff_prob
  regions: list = []  # front to back
  for _ in range(20 * target):
    if len(regions) == target:
      break
    stuff = want_stuff and not any(r.is_stuff for r in regions)
    region = _make_region(rng, params, height, width, stuff, regions)
    if region is None:
      continue
    if stuff and rng.random() < 0.7:  # stuff mostly at the back
      pos = len(regions)
    else:
      pos = int(rng.integers(len(regions) + 1))
    trial = regions[:pos] + [region] + regions[pos:]
    visible = _visible_masks(trial)
    if all(v.sum() >= params.min_visible_fraction * r.amodal.sum() for v, r in zip(visible, trial)):
      regions = trial
  return regions


def _render(
    rng: np.random.Generator, regions: Sequence[_Region], height: int, width: int
) -> np.ndarray:
  """(H, W, 3) uint8: background, then regions painted back to front."""
  img = shapes.background(rng, height, width)
  for r in reversed(regions):
    img[r.amodal] = shapes.object_texture(rng, r.amodal, r.is_stuff)
  img += rng.normal(0.0, 3.0, img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _annotation(regions: Sequence[_Region], image_id: int) -> tuple[dict, list]:
  """COCOA annotation dict and the per-region occlude rates."""
  visible = _visible_masks(regions)
  out, rates, pairs = [], [], []
  for k, (r, vis) in enumerate(zip(regions, visible)):
    area = int(r.amodal.sum())
    invisible = r.amodal & ~vis
    rate = float(invisible.sum()) / area
    entry = {
        'segmentation': r.flat,
        'name': r.name,
        'area': float(area),
        'isStuff': int(r.is_stuff),
        'occlude_rate': rate,
        'order': k + 1,
    }
    if invisible.any():
      entry['visible_mask'] = records.encode_mask(vis)
      entry['invisible_mask'] = records.encode_mask(invisible)
    out.append(entry)
    rates.append(rate)
    for j in range(k):
      if (regions[j].amodal & r.amodal).any():
        pairs.append((j + 1, k + 1))
  ann = {
      'id': image_id,
      'image_id': image_id,
      'size': len(regions),
      'depth_constraint': ','.join(f'{a}-{b}' for a, b in sorted(pairs)),
      'regions': out,
  }
  return ann, rates


# ------------------------------------------------------------------ datasets


def annotation_path(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, 'annotations', f'COCO_amodal_{split}2014.json')


def images_dir(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, f'{split}2014')


def looks_generated(out_dir: str) -> bool:
  """True when ``out_dir`` holds only this module's layout (``annotations/``
  with ``COCO_amodal_*2014.json``, ``<split>2014/`` image folders, top-level
  ``*.json`` markers): what ``make_synthetic.py`` may replace."""
  entries = os.listdir(out_dir)
  ann_dir = os.path.join(out_dir, 'annotations')
  if 'annotations' not in entries or not os.path.isdir(ann_dir):
    return False
  if not all(re.fullmatch(r'COCO_amodal_\w+2014\.json', name) for name in os.listdir(ann_dir)):
    return False
  return all(
      name == 'annotations'
      or name.endswith('.json')
      or (re.fullmatch(r'\w+2014', name) and os.path.isdir(os.path.join(out_dir, name)))
      for name in entries
  )


def occlusion_stats(rates: Sequence[float]) -> dict:
  """Share of occluded instances, mean occlude_rate of the occluded ones and
  counts per bin: none (0), partial (0, 0.25], heavy (> 0.25)."""
  rates = np.asarray(rates, np.float64)
  occluded = rates[rates > 0]
  return {
      'num_instances': int(rates.size),
      'occluded_share': float(occluded.size / rates.size) if rates.size else 0.0,
      'mean_occlude_rate_occluded': float(occluded.mean()) if occluded.size else 0.0,
      'histogram': {
          'none': int((rates == 0).sum()),
          'partial': int(((rates > 0) & (rates <= 0.25)).sum()),
          'heavy': int((rates > 0.25).sum()),
      },
  }


def _size_hw(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)):
    h = w = int(image_size)
  else:
    h, w = (int(v) for v in image_size)
  if min(h, w) < 32:
    raise errors.UserError(f'must be at least 32 pixels, got {h}x{w}', field='image_size')
  return h, w


def generate_split(
    out_dir: str,
    split: str,
    num_images: int,
    image_size: Union[int, Sequence[int]] = 128,
    seed: int = 0,
    params: SceneParams = SceneParams(),
    image_format: str = 'png',
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
  """Writes one split (json + images) under ``out_dir``.

  Args:
    out_dir: dataset root (created if missing).
    split: split name, e.g. 'train' (file names use ``<split>2014``).
    num_images: images to generate (ids 1..num_images).
    image_size: side S or (height, width) in pixels, >= 32.
    seed: base seed; each image uses (seed, crc32(split), index).
    params: scene knobs.
    image_format: 'png' (lossless) or 'jpg' (quality 95).
    progress: optional callback, called with 1 after each image.

  Returns:
    ``occlusion_stats`` of the split plus 'num_images'.
  """
  params.validate()
  h, w = _size_hw(image_size)
  if num_images < 0:
    raise errors.UserError(f'must be >= 0, got {num_images}', field='num_images')
  if image_format not in ('png', 'jpg'):
    raise errors.UserError(f"must be 'png' or 'jpg', got {image_format!r}", field='image_format')
  img_dir = images_dir(out_dir, split)
  os.makedirs(img_dir, exist_ok=True)
  split_code = zlib.crc32(split.encode('utf-8'))
  images, annotations, rates = [], [], []
  for index in range(num_images):
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_code, index]))
    regions = _scene_regions(rng, params, h, w)
    pixels = _render(rng, regions, h, w)
    image_id = index + 1
    file_name = f'COCO_{split}2014_{image_id:012d}.{image_format}'
    buf = io.BytesIO()
    if image_format == 'png':
      Image.fromarray(pixels).save(buf, format='PNG', compress_level=1)
    else:
      Image.fromarray(pixels).save(buf, format='JPEG', quality=95)
    with open(os.path.join(img_dir, file_name), 'wb') as f:
      f.write(buf.getvalue())
    images.append({'id': image_id, 'file_name': file_name, 'width': w, 'height': h})
    ann, image_rates = _annotation(regions, image_id)
    annotations.append(ann)
    rates.extend(image_rates)
    if progress is not None:
      progress(1)
  with files.atomic_output_file(annotation_path(out_dir, split)) as f:
    json.dump({'images': images, 'annotations': annotations}, f, separators=(',', ':'))
  return {'num_images': num_images, **occlusion_stats(rates)}


def generate_dataset(
    out_dir: str,
    splits: Optional[dict] = None,
    image_size: Union[int, Sequence[int]] = 128,
    seed: int = 0,
    params: SceneParams = SceneParams(),
    image_format: str = 'png',
    progress: bool = False,
) -> dict:
  """Writes every split of ``splits`` ({name: num_images}, default
  {'train': 400, 'val': 50}) under ``out_dir``.

  Returns:
    {split: stats} plus 'all' (stats over every split), see
    ``generate_split``. ``progress`` shows a tqdm bar on stderr.
  """
  splits = dict(splits if splits is not None else {'train': 400, 'val': 50})
  if 'all' in splits:
    raise errors.UserError("'all' is reserved for the totals", field='splits')
  bar = None
  if progress:
    bar = tqdm.tqdm(total=sum(splits.values()), unit='img', desc='synthetic')
  try:
    out = {}
    for split, num in splits.items():
      out[split] = generate_split(
          out_dir,
          split,
          int(num),
          image_size,
          seed,
          params,
          image_format,
          bar.update if bar is not None else None,
      )
  finally:
    if bar is not None:
      bar.close()
  total = sum(s['num_instances'] for s in out.values())
  hist = {b: sum(s['histogram'][b] for s in out.values()) for b in OCCLUSION_BINS}
  occluded = hist['partial'] + hist['heavy']
  out['all'] = {
      'num_images': sum(s['num_images'] for s in out.values()),
      'num_instances': total,
      'occluded_share': occluded / total if total else 0.0,
      'mean_occlude_rate_occluded': (
          sum(
              s['mean_occlude_rate_occluded']
              * (s['histogram']['partial'] + s['histogram']['heavy'])
              for s in out.values()
          )
          / occluded
          if occluded
          else 0.0
      ),
      'histogram': hist,
  }
  return out
