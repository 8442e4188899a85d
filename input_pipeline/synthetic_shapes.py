"""Geometry and paint of the synthetic scenes (``input_pipeline.synthetic``):
shape outlines as polygons (x right, y down, pixel coordinates), their
rasterisation by pycocotools, and the textures of objects and backgrounds.

Every function draws from the ``numpy.random.Generator`` it is given, so a
scene is a function of its generator's seed.
"""

from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils


def clip_polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
  """Sutherland-Hodgman clip of (K, 2) xy points to [0, w] x [0, h]."""
  pts = list(map(tuple, points))
  for axis, bound, keep_below in (
      (0, 0.0, False),
      (0, float(width), True),
      (1, 0.0, False),
      (1, float(height), True),
  ):
    if not pts:
      break
    if keep_below:
      inside = lambda p, axis=axis, bound=bound: p[axis] <= bound
    else:
      inside = lambda p, axis=axis, bound=bound: p[axis] >= bound
    out = []
    for k, cur in enumerate(pts):
      prev = pts[k - 1]
      if inside(cur) != inside(prev):
        t = (bound - prev[axis]) / (cur[axis] - prev[axis])
        out.append(tuple(prev[a] + t * (cur[a] - prev[a]) for a in (0, 1)))
      if inside(cur):
        out.append(cur)
    pts = out
  return np.asarray(pts, np.float64).reshape(-1, 2)


def rotate(points: np.ndarray, angle: float, center) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  return points @ np.array([[c, s], [-s, c]]) + np.asarray(center)


def thing_polygon(kind: str, rng: np.random.Generator, center, radius: float) -> np.ndarray:
  """(K, 2) xy vertices of a thing of ``kind`` around ``center``."""
  angle = rng.uniform(0, 2 * math.pi)
  if kind == 'ellipse':
    a, b = radius * rng.uniform(0.65, 1.0, 2)
    k = int(np.clip(2 * math.pi * max(a, b) / 2.0, 24, 64))
    t = np.linspace(0, 2 * math.pi, k, endpoint=False)
    pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
  elif kind == 'rectangle':
    hw, hh = radius * rng.uniform(0.55, 1.0, 2)
    pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
  elif kind == 'triangle':
    t = np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.35, 0.35, 3)
    r = radius * rng.uniform(0.85, 1.2, 3)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
  elif kind == 'polygon':
    k = int(rng.integers(5, 10))
    t = np.sort(rng.uniform(0, 2 * math.pi, k))
    r = radius * rng.uniform(0.55, 1.1, k)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
  else:
    raise ValueError(f'unknown thing kind {kind!r}')
  return rotate(pts, angle, center)


def stuff_polygon(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """(K, 2) xy vertices of a large stuff region (before clipping)."""
  side = min(width, height)
  center = (rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height)
  if kind == 'band':
    half_len = math.hypot(width, height)
    half_w = side * rng.uniform(0.12, 0.2)
    pts = np.array(
        [[-half_len, -half_w], [half_len, -half_w], [half_len, half_w], [-half_len, half_w]]
    )
    return rotate(pts, rng.uniform(0, math.pi), center)
  if kind == 'blob':
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    r = np.full_like(t, side * rng.uniform(0.3, 0.42))
    for freq in (2, 3, 5):
      r *= 1 + rng.uniform(-0.12, 0.12) * np.cos(freq * t + rng.uniform(0, 2 * math.pi))
    return np.stack([center[0] + r * np.cos(t), center[1] + r * np.sin(t)], 1)
  raise ValueError(f'unknown stuff kind {kind!r}')


def rasterize(flat: list, height: int, width: int) -> np.ndarray:
  """Flat polygon -> (H, W) bool, exactly as a COCO reader decodes it."""
  rle = mask_utils.frPyObjects([flat], height, width)
  return mask_utils.decode(rle)[..., 0].astype(bool)


# ------------------------------------------------------------------ textures


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return 255.0 * np.asarray(rgb)


def smooth_noise(
    rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, height: int, width: int, cells: int
) -> np.ndarray:
  """Low-frequency noise in [0, 1] at pixels (ys, xs): a random
  (cells + 1)^2 grid spread over the image, bilinearly interpolated."""
  grid = rng.random((cells + 1, cells + 1))
  gy = ys * (cells / max(height - 1, 1))
  gx = xs * (cells / max(width - 1, 1))
  y0 = np.minimum(gy.astype(int), cells - 1)
  x0 = np.minimum(gx.astype(int), cells - 1)
  fy, fx = gy - y0, gx - x0
  return (
      grid[y0, x0] * (1 - fy) * (1 - fx)
      + grid[y0, x0 + 1] * (1 - fy) * fx
      + grid[y0 + 1, x0] * fy * (1 - fx)
      + grid[y0 + 1, x0 + 1] * fy * fx
  )


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """(H, W, 3) float muted background: noise, gradient or stripes."""
  yy, xx = np.mgrid[:height, :width].astype(np.float64)
  c1 = hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.7))
  c2 = hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.7))
  kind = rng.integers(3)
  if kind == 0:
    w = smooth_noise(rng, yy, xx, height, width, int(rng.integers(3, 8)))
  elif kind == 1:
    a = rng.uniform(0, 2 * math.pi)
    proj = xx * math.cos(a) + yy * math.sin(a)
    w = (proj - proj.min()) / max(np.ptp(proj), 1e-6)
  else:
    a = rng.uniform(0, math.pi)
    period = rng.uniform(10, 24)
    w = 0.5 + 0.25 * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
  return c1 * (1 - w[..., None]) + c2 * w[..., None]


def object_texture(rng: np.random.Generator, mask: np.ndarray, stuff: bool) -> np.ndarray:
  """(P, 3) float colours of the P pixels of ``mask`` (row-major order): a
  saturated patterned texture for one region."""
  height, width = mask.shape
  yy, xx = (c.astype(np.float64) for c in np.nonzero(mask))
  hue = rng.random()
  sat = rng.uniform(0.35, 0.6) if stuff else rng.uniform(0.65, 1.0)
  c1 = hsv_to_rgb(hue, sat, rng.uniform(0.6, 1.0))
  c2 = hsv_to_rgb((hue + rng.uniform(0.15, 0.5)) % 1.0, sat, rng.uniform(0.25, 0.6))
  kind = int(rng.integers(5)) if not stuff else 5
  a = rng.uniform(0, math.pi)
  u = xx * math.cos(a) + yy * math.sin(a)
  v = -xx * math.sin(a) + yy * math.cos(a)
  if kind == 0:  # solid with faint shading
    w = 0.15 * smooth_noise(rng, yy, xx, height, width, 3)
  elif kind == 1:  # stripes
    w = np.floor(u / rng.uniform(3, 7)) % 2
  elif kind == 2:  # checker
    cell = rng.uniform(3, 7)
    w = (np.floor(u / cell) + np.floor(v / cell)) % 2
  elif kind == 3:  # dots
    period = rng.uniform(5, 9)
    du = (u % period) - period / 2
    dv = (v % period) - period / 2
    w = (du * du + dv * dv < (period * 0.3) ** 2).astype(np.float64)
  elif kind == 4:  # gradient across the region
    w = (u - u.min()) / max(np.ptp(u), 1e-6)
  else:  # stuff: coarse mottling
    w = smooth_noise(rng, yy, xx, height, width, int(rng.integers(6, 12)))
  return c1 * (1 - w[:, None]) + c2 * w[:, None]
