"""Pictures of predictions: each instance's mask and box in its own colour,
and the predict mode's output per image (COCO results JSON and picture).
"""

from __future__ import annotations

import colorsys
import json
import re
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from sln_jax import files
from sln_jax.evaluation.results import detections_to_results

# Files the predict modes read as images (by suffix, any case).
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')


def image_id_of(stem: str, fallback: int) -> int:
  """The image id of a predicted file: the trailing digits of its stem
  (COCO names), else ``fallback``."""
  digits = re.search(r'(\d+)$', stem)
  return int(digits.group(1)) if digits else fallback


# --------------------------------------------------------------- drawing
def instance_colour(k: int) -> tuple[int, int, int]:
  """Deterministic, well-spread RGB colour for instance ``k`` (golden hue)."""
  hue = (0.13 + 0.618033988749895 * k) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return int(255 * r), int(255 * g), int(255 * b)


def _decode(rle) -> np.ndarray:
  return mask_utils.decode(rle).astype(bool)


def render_prediction(image: np.ndarray, results: Sequence[dict], stripe: int = 6) -> np.ndarray:
  """(H, W, 3) uint8 picture of ``results`` (one image's COCO results).

  Each instance in its own colour (``instance_colour(rank by score)``):
  visible part blended at alpha 0.5, occluded part (amodal minus visible) as
  diagonal stripes at alpha 0.5 over a 0.15 tint, box outline, and its
  ``depth_layer`` (or rank) near the box corner. Drawn back to front.
  """
  canvas = np.asarray(image, np.float64).copy()
  ranked = sorted(range(len(results)), key=lambda k: -results[k]['score'])
  colour_of = {k: instance_colour(n) for n, k in enumerate(ranked)}
  order = sorted(ranked, key=lambda k: -results[k].get('depth_layer', 0))
  h, w = canvas.shape[:2]
  yy, xx = np.mgrid[:h, :w]
  stripes = ((yy + xx) // stripe) % 2 == 0
  for k in order:
    r = results[k]
    amodal = _decode(r['segmentation'])
    visible = _decode(r['visible_mask']) if 'visible_mask' in r else amodal
    occluded = amodal & ~visible
    colour = np.array(colour_of[k], np.float64)
    for region, alpha in ((occluded, 0.15), (occluded & stripes, 0.5), (visible, 0.5)):
      canvas[region] = (1 - alpha) * canvas[region] + alpha * colour
  pil = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  font = ImageFont.load_default()
  for k in order:
    r = results[k]
    x, y, bw, bh = r['bbox']
    draw.rectangle([x, y, x + bw, y + bh], outline=colour_of[k], width=2)
    label = str(r.get('depth_layer', ranked.index(k)))
    tx, ty = max(x + 2, 0), max(y + 1, 0)
    tb = draw.textbbox((tx, ty), label, font=font)
    draw.rectangle(tb, fill=(0, 0, 0))
    draw.text((tx, ty), label, fill=colour_of[k], font=font)
  return np.asarray(pil)


def draw_prediction(image: np.ndarray, results: Sequence[dict], path: str) -> None:
  """Writes ``render_prediction(image, results)`` to ``path`` (PNG, atomic)."""
  picture = Image.fromarray(render_prediction(image, results))
  with files.atomic_output_file(path, 'wb') as f:
    picture.save(f, format='PNG')


def write_prediction(
    image_id: int,
    dets: Mapping[str, np.ndarray],
    image_scale: Sequence[float],
    image: np.ndarray,
    json_path: str,
    png_path: str,
    **kwargs,
) -> int:
  """Writes one image's COCO results (``detections_to_results(image_id,
  dets, image_scale, image.shape[:2], **kwargs)``) to ``json_path`` and its
  picture to ``png_path`` (both atomic); returns the number of results."""
  results = detections_to_results(image_id, dets, image_scale, image.shape[:2], **kwargs)
  write_results_and_picture(results, image, json_path, png_path)
  return len(results)


def write_results_and_picture(
    results: Sequence[dict], image: np.ndarray, json_path: str, png_path: str
) -> None:
  """Writes one image's COCO ``results`` to ``json_path`` and their picture
  over ``image`` to ``png_path`` (both atomic)."""
  with files.atomic_output_file(json_path) as f:
    json.dump(list(results), f)
  draw_prediction(image, results, png_path)
