"""Drawing primitives of the pictures: enlarging, fills, hatching, outlines,
label tags, captions and the legend.

Everything works on (H, W, 3) uint8 / float images in pixel rows and columns
(y down, x right) and (H, W) bool masks of the same size. Text is set in
DejaVu Sans, the TrueType font matplotlib ships, so labels read the same on
every machine.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from typing import Sequence

from matplotlib import font_manager
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# Pictures are drawn at least this many pixels on their long side: smaller
# images are enlarged by an integer factor (nearest neighbour, so each source
# pixel stays a visible block); larger ones keep their size.
MIN_LONG_SIDE = 768

VISIBLE_ALPHA = 0.45  # visible part: translucent fill in the object's colour
HIDDEN_TINT_ALPHA = 0.2  # hidden part: a light wash of the lighter tone ...
HIDDEN_HATCH_ALPHA = 0.75  # ... under diagonal hatching in the lighter tone
LIGHTER = 0.55  # the hidden part's tone: the colour mixed with this much white
OUTLINE_PX = 2  # amodal outline thickness (output pixels)
DASH_PX = 6  # dash length of the outline of false positives and misses


def scale_factor(height: int, width: int, min_long_side: int = MIN_LONG_SIDE) -> int:
  """The integer enlargement that brings the long side to ``min_long_side``
  or more (1 for images already that large)."""
  return max(1, math.ceil(min_long_side / max(height, width, 1)))


def enlarge(array: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement of the first two axes by ``factor``."""
  if factor == 1:
    return array
  return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
  """DejaVu Sans at ``size`` pixels (matplotlib's bundled TrueType file)."""
  path = font_manager.findfont(font_manager.FontProperties(family='DejaVu Sans'))
  return ImageFont.truetype(path, size)


def text_size(scale: int) -> int:
  """Label font size for a picture whose long side is ``scale`` pixels."""
  return int(np.clip(round(scale / 48), 13, 28))


def colour(k: int) -> tuple[int, int, int]:
  """Deterministic, well-spread RGB colour number ``k`` (golden-ratio hues)."""
  hue = (0.13 + 0.618033988749895 * k) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return int(255 * r), int(255 * g), int(255 * b)


def lighter(rgb: Sequence[int], amount: float = LIGHTER) -> tuple[int, int, int]:
  """``rgb`` mixed with ``amount`` of white."""
  return tuple(int(round(c + amount * (255 - c))) for c in rgb)


def text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
  """Black on light colours, white on dark ones (relative luminance)."""
  luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
  return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def hatch_pattern(height: int, width: int, period: int) -> np.ndarray:
  """(H, W) bool: diagonal stripes, ``period`` pixels on and ``period`` off
  along each row."""
  yy, xx = np.mgrid[:height, :width]
  return ((yy + xx) // max(period, 1)) % 2 == 0


def dash_pattern(height: int, width: int, dash: int = DASH_PX) -> np.ndarray:
  """(H, W) bool checkerboard of ``dash``-pixel squares: ANDed with a thin
  outline it leaves dashes along horizontal and vertical edges."""
  yy, xx = np.mgrid[:height, :width]
  return (yy // dash + xx // dash) % 2 == 0


def outline(mask: np.ndarray, thickness: int = OUTLINE_PX) -> np.ndarray:
  """(H, W) bool: the pixels of ``mask`` within ``thickness`` of its border
  (the image border counts as outside)."""
  if not mask.any():
    return mask
  inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
  return mask & ~inner


def blend(canvas: np.ndarray, region: np.ndarray, rgb: Sequence[int], alpha: float) -> None:
  """In place: ``canvas[region] = (1 - alpha) canvas + alpha rgb``
  (canvas float (H, W, 3))."""
  canvas[region] = (1.0 - alpha) * canvas[region] + alpha * np.asarray(rgb, np.float64)


@dataclasses.dataclass
class Shape:
  """One object to draw, in the enlarged picture's pixels.

  amodal, visible: (H, W) bool masks (visible inside amodal); box: (x, y, w,
  h) pixels; depth: larger = further back (drawn first); dashed: outline and
  box dashed (a false positive or a missed object); text: its label tag.
  """

  amodal: np.ndarray
  visible: np.ndarray
  rgb: tuple[int, int, int]
  box: Sequence[float]
  depth: float
  text: str
  dashed: bool = False


def draw_shapes(image: np.ndarray, shapes: Sequence[Shape], hatch_period: int) -> Image.Image:
  """The shapes over ``image`` (H, W, 3) uint8, back to front.

  Per shape: the hidden part (amodal minus visible) washed and hatched in the
  lighter tone of its colour, the visible part filled translucently in its
  colour, then its amodal outline (dashed when ``shape.dashed``). Label tags
  come last, over every mask, at the top-left corner of each box.
  """
  canvas = np.asarray(image, np.float64).copy()
  h, w = canvas.shape[:2]
  hatch = hatch_pattern(h, w, hatch_period)
  dashes = dash_pattern(h, w)
  order = sorted(range(len(shapes)), key=lambda k: -shapes[k].depth)
  for k in order:
    s = shapes[k]
    hidden = s.amodal & ~s.visible
    light = lighter(s.rgb)
    blend(canvas, hidden, light, HIDDEN_TINT_ALPHA)
    blend(canvas, hidden & hatch, light, HIDDEN_HATCH_ALPHA)
    blend(canvas, s.visible, s.rgb, VISIBLE_ALPHA)
    edge = outline(s.amodal)
    if s.dashed:
      edge &= dashes
    blend(canvas, edge, s.rgb, 1.0)
  picture = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(picture)
  face = font(text_size(max(h, w)))
  taken: list = []
  for k in order:
    s = shapes[k]
    if s.dashed:
      dashed_rectangle(draw, s.box, s.rgb)
  for k in order:
    s = shapes[k]
    taken.append(label_tag(draw, s.box, s.text, s.rgb, face, (w, h), taken))
  return picture


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], rgb, dash: int = DASH_PX):
  """The outline of ``box`` (x, y, w, h) in ``dash``-pixel dashes."""
  x, y, bw, bh = box
  x2, y2 = x + bw, y + bh
  edges = ((x, x2, True, y), (x, x2, True, y2), (y, y2, False, x), (y, y2, False, x2))
  for a, b, horizontal, at in edges:
    t = a
    while t < b:
      e = min(t + dash, b)
      line = [(t, at), (e, at)] if horizontal else [(at, t), (at, e)]
      draw.line(line, fill=tuple(rgb), width=1)
      t += 2 * dash


def _overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_tag(
    draw: ImageDraw.ImageDraw,
    box: Sequence[float],
    text: str,
    rgb,
    face: ImageFont.FreeTypeFont,
    size: tuple[int, int],
    taken: Sequence[Sequence[int]] = (),
) -> tuple[int, int, int, int]:
  """``text`` on a tag in ``rgb`` just above the top-left corner of ``box``
  (x, y, w, h), kept inside the picture of ``size`` (W, H) and moved down
  past the tags in ``taken`` (x1, y1, x2, y2) it would cover; returns its
  rectangle."""
  if not text:
    return (0, 0, 0, 0)
  left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
  tw, th = right - left + 6, bottom - top + 4
  x = int(np.clip(box[0], 0, max(size[0] - tw, 0)))
  y = int(np.clip(box[1] - th, 0, max(size[1] - th, 0)))
  for _ in range(8):
    rect = (x, y, x + tw, y + th)
    if not any(_overlaps(rect, t) for t in taken) or y + 2 * th > size[1]:
      break
    y += th + 1
  draw.rectangle([x, y, x + tw, y + th], fill=tuple(rgb), outline=(0, 0, 0))
  draw.text((x + 3 - left, y + 2 - top), text, fill=text_colour(rgb), font=face)
  return (x, y, x + tw + 1, y + th + 1)


def caption_height(width: int, height: int) -> int:
  """Height of the white bar ``caption`` puts over a ``width`` x ``height``
  panel."""
  return text_size(max(width, height)) + 2 + 12


def caption(panel: Image.Image, text: str) -> Image.Image:
  """``panel`` under a white bar (``caption_height``) holding ``text``."""
  face = font(text_size(max(panel.size)) + 2)
  bar = caption_height(*panel.size)
  out = Image.new('RGB', (panel.width, panel.height + bar), (255, 255, 255))
  out.paste(panel, (0, bar))
  ImageDraw.Draw(out).text((6, 6), text, fill=(0, 0, 0), font=face)
  return out


GAP_PX = 12  # white between side-by-side panels


def side_by_side(panels: Sequence[Image.Image], gap: int = GAP_PX) -> Image.Image:
  """The panels in a row on white, ``gap`` pixels apart, top-aligned."""
  width = sum(p.width for p in panels) + gap * (len(panels) - 1)
  height = max(p.height for p in panels)
  out = Image.new('RGB', (width, height), (255, 255, 255))
  x = 0
  for p in panels:
    out.paste(p, (x, 0))
    x += p.width + gap
  return out


LEGEND_ITEMS = (
    ('fill', 'visible part'),
    ('hatch', 'hidden (occluded) part'),
    ('outline', 'amodal outline'),
    ('dashed', 'false positive / missed'),
)


def legend(
    width: int, extra: str = '', size: int = 16, items: Sequence[tuple[str, str]] = LEGEND_ITEMS
) -> Image.Image:
  """A white strip ``width`` pixels wide with a swatch and its words for each
  of ``items`` (``LEGEND_ITEMS`` or some of them), then ``extra`` (for example
  how labels read), wrapped onto as many rows as the width needs."""
  face = font(size)
  box = size + 6
  row_h = box + 10
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  items = [(kind, text, box + 6 + probe.textlength(text, font=face)) for kind, text in items]
  if extra:
    items.append(('text', extra, probe.textlength(extra, font=face)))
  placed, x, row = [], 8, 0
  for kind, text, item_w in items:
    if x > 8 and x + item_w > width - 8:
      x, row = 8, row + 1
    placed.append((kind, text, x, 8 + row * row_h))
    x += int(round(item_w)) + 18
  strip = np.full((8 + (row + 1) * row_h, max(width, 1), 3), 255, np.float64)
  grey = (90, 90, 90)
  hatch = hatch_pattern(*strip.shape[:2], 4)
  dashes = dash_pattern(*strip.shape[:2], 4)
  for kind, _, x0, y0 in placed:
    region = np.zeros(strip.shape[:2], bool)
    region[y0 : y0 + box, x0 : x0 + box] = True
    if kind == 'fill':
      blend(strip, region, grey, VISIBLE_ALPHA)
    elif kind == 'hatch':
      blend(strip, region, lighter(grey), HIDDEN_TINT_ALPHA)
      blend(strip, region & hatch, lighter(grey), HIDDEN_HATCH_ALPHA)
    elif kind == 'outline':
      blend(strip, outline(region), grey, 1.0)
    elif kind == 'dashed':
      blend(strip, outline(region) & dashes, grey, 1.0)
  out = Image.fromarray(np.round(strip).astype(np.uint8))
  draw = ImageDraw.Draw(out)
  for kind, text, x0, y0 in placed:
    tx = x0 if kind == 'text' else x0 + box + 6
    draw.text((tx, y0 + (box - size) // 2), text, fill=(0, 0, 0), font=face)
  return out


def stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
  """``bottom`` under ``top`` on white (as wide as the wider)."""
  out = Image.new('RGB', (max(top.width, bottom.width), top.height + bottom.height), (255,) * 3)
  out.paste(top, (0, 0))
  out.paste(bottom, (0, top.height))
  return out
