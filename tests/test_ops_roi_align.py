"""crop_and_resize vs TensorFlow, roi_align vs a torchvision transcription."""

import fractions
import math

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from sln_jax.ops import roi_align


def _boxes(rng, n):
  """Normalised boxes incl. some partly outside [0, 1] and flipped ones."""
  a = rng.uniform(-0.3, 1.3, (n, 4)).astype(np.float32)
  a[: n // 2] = np.sort(a[: n // 2].reshape(-1, 2, 2), axis=1).reshape(-1, 4)
  a[0] = [0.0, 0.0, 1.0, 1.0]
  a[1] = [0.25, 0.5, 0.25, 0.5]  # zero-size box
  return a


@pytest.mark.parametrize('crop', [1, 2, 7])
def test_crop_and_resize_matches_tf(crop):
  rng = np.random.default_rng(crop)
  feats = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  boxes = np.stack([_boxes(rng, 10), _boxes(rng, 10)])
  got = jax.jit(roi_align.crop_and_resize, static_argnums=2)(feats, boxes, crop)
  want = tf.image.crop_and_resize(feats, boxes.reshape(-1, 4), np.repeat([0, 1], 10), (crop, crop))
  assert got.shape == (2, 10, crop, crop, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want.numpy(), atol=1e-5)


def test_crop_and_resize_indexed_and_bf16():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(3, 6, 5, 2)).astype(np.float32)
  boxes, idx = _boxes(rng, 8), rng.integers(0, 3, 8).astype(np.int32)
  got = roi_align.crop_and_resize_indexed(feats, boxes, idx, 4)
  want = tf.image.crop_and_resize(feats, boxes, idx, (4, 4)).numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  half = roi_align.crop_and_resize_indexed(jnp.asarray(feats, jnp.bfloat16), boxes, idx, 4)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), want, atol=0.05)


def _bilinear_tv(img, y, x):
  """torchvision roi_align_kernel bilinear_interpolate (one channel set)."""
  h, w = img.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(img.shape[2:])
  y, x = max(y, 0.0), max(x, 0.0)
  y_lo, x_lo = int(y), int(x)
  if y_lo >= h - 1:
    y_hi = y_lo = h - 1
    y = float(y_lo)
  else:
    y_hi = y_lo + 1
  if x_lo >= w - 1:
    x_hi = x_lo = w - 1
    x = float(x_lo)
  else:
    x_hi = x_lo + 1
  ly, lx = y - y_lo, x - x_lo
  hy, hx = 1 - ly, 1 - lx
  return (
      hy * hx * img[y_lo, x_lo]
      + hy * lx * img[y_lo, x_hi]
      + ly * hx * img[y_hi, x_lo]
      + ly * lx * img[y_hi, x_hi]
  )


def _roi_align_loop(img, box, out, scale, ratio, aligned):
  """torchvision.ops.roi_align for one (y1, x1, y2, x2) box, HWC."""
  off = 0.5 if aligned else 0.0
  y0, x0 = box[0] * scale - off, box[1] * scale - off
  rh, rw = box[2] * scale - off - y0, box[3] * scale - off - x0
  if not aligned:
    rh, rw = max(rh, 1.0), max(rw, 1.0)
  bh, bw = rh / out, rw / out
  res = np.zeros((out, out) + img.shape[2:])
  for i in range(out):
    for j in range(out):
      acc = 0.0
      for iy in range(ratio):
        y = y0 + i * bh + (iy + 0.5) * bh / ratio
        for ix in range(ratio):
          x = x0 + j * bw + (ix + 0.5) * bw / ratio
          acc = acc + _bilinear_tv(img, y, x)
      res[i, j] = acc / (ratio * ratio)
  return res


@pytest.mark.parametrize('aligned,ratio', [(True, 2), (False, 1), (True, 1)])
def test_roi_align_matches_loop(aligned, ratio):
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(2, 8, 10, 3)).astype(np.float32)
  px = _boxes(rng, 12).reshape(1, 12, 4) * np.array([32, 40, 32, 40])
  px = np.concatenate([px, px[:, ::-1]]).astype(np.float32)
  px[..., 2:] = np.maximum(px[..., 2:], px[..., :2])  # torchvision: no flips
  fn = jax.jit(roi_align.roi_align, static_argnums=(2, 3, 4, 5))
  got = np.asarray(fn(feats, px, 3, 0.25, ratio, aligned))
  assert got.shape == (2, 12, 3, 3, 3)
  for b in range(2):
    for n in range(12):
      want = _roi_align_loop(feats[b], px[b, n], 3, 0.25, ratio, aligned)
      np.testing.assert_allclose(got[b, n], want, atol=1e-5)


def test_roi_align_matches_torchvision_when_available():
  tv_ops = pytest.importorskip('torchvision.ops')
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(5)
  feats = rng.normal(size=(1, 8, 10, 4)).astype(np.float32)
  px = np.abs(_boxes(rng, 6)).reshape(1, 6, 4) * 30
  px[..., 2:] = np.maximum(px[..., 2:], px[..., :2])
  got = roi_align.roi_align(feats, px.astype(np.float32), 5, 0.25, 2, True)
  rois = np.concatenate([np.zeros((6, 1)), px[0][:, [1, 0, 3, 2]]], 1)
  want = tv_ops.roi_align(
      torch.tensor(feats).permute(0, 3, 1, 2),
      torch.tensor(rois, dtype=torch.float32),
      5,
      0.25,
      2,
      True,
  )
  np.testing.assert_allclose(np.asarray(got)[0], want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_roi_levels_hand_cases():
  area = 1024.0 * 1024.0
  side = lambda px: px / 1024.0
  boxes = np.array(
      [
          [0, 0, side(224), side(224)],  # 224 px -> P4
          [0, 0, side(112), side(112)],  # -> P3
          [0, 0, side(56), side(56)],  # -> P2
          [0, 0, side(10), side(10)],  # tiny -> clamp 2
          [0, 0, side(448), side(448)],  # -> P5
          [0, 0, 1, 1],  # huge -> clamp 5
          [0, 0, 0, 0],  # padding -> 2
          [0, 0, side(300), side(300)],  # 4.42 -> 4
          [0, 0, side(330), side(330)],  # 4.56 -> 5
      ],
      np.float32,
  )
  got = np.asarray(roi_align.roi_levels(boxes, area))
  np.testing.assert_array_equal(got, [4, 3, 2, 2, 5, 5, 2, 4, 5])
  # Non-square canvas: only h * w (normalised) and the pixel area matter.
  got = roi_align.roi_levels(np.array([[0, 0, 0.5, 0.5]], np.float32), 512.0 * 256.0)
  assert int(got[0]) == round(4 + np.log2(np.sqrt(0.25 * 512 * 256) / 224))


def test_roi_levels_of_nan_and_negative_area_boxes():
  """A NaN box (a diverged proposal) or one of negative area goes to
  min_level like an empty box, so its level always names a map."""
  boxes = np.array([[np.nan] * 4, [0.5, 0.5, 0.1, 0.9], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(roi_align.roi_levels(boxes, 1024.0**2), [2, 2, 2])
  np.testing.assert_array_equal(roi_align.roi_levels(boxes, 1024.0**2, 3, 6), [3, 3, 3])


def test_multilevel_matches_per_level_tf():
  rng = np.random.default_rng(6)
  size = 64
  feats = [rng.normal(size=(2, size // s, size // s, 3)).astype(np.float32) for s in (4, 8, 16, 32)]
  sides = rng.uniform(2, 64, (2, 9, 1)) / size
  yx = rng.uniform(0, 0.6, (2, 9, 2))
  boxes = np.concatenate([yx, yx + sides], -1).astype(np.float32)
  area = float(size * size) * 16  # shifts the levels into the 2..5 range
  fn = jax.jit(roi_align.multilevel_crop_and_resize, static_argnums=(2, 3))
  got = np.asarray(fn(feats, boxes, 5, area))
  levels = np.asarray(roi_align.roi_levels(boxes, area))
  assert set(levels.ravel()) >= {2, 3}
  flat_boxes = boxes.reshape(-1, 4)
  img = np.repeat([0, 1], 9)
  per_level = np.stack(
      [tf.image.crop_and_resize(f, flat_boxes, img, (5, 5)).numpy() for f in feats]
  )  # (4, 18, 5, 5, 3)
  want = per_level[levels.reshape(-1) - 2, np.arange(18)]
  np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)
  # aligned mode: ROIAlign on the level's pixels.
  got = np.asarray(
      roi_align.multilevel_crop_and_resize(feats, boxes, 3, area, aligned=True, sampling_ratio=2)
  )
  for b in range(2):
    for n in range(9):
      lv = levels[b, n] - 2
      f = feats[lv][b]
      px = boxes[b, n] * np.array(f.shape[:2] * 2)
      want = _roi_align_loop(f, px, 3, 1.0, 2, True)
      np.testing.assert_allclose(got[b, n], want, atol=1e-5)


def test_multilevel_non_square_maps_and_levels_from_three():
  """Three non-square maps P3..P5 (min_level=3) of a 128 x 64 canvas: every
  ROI is pooled from the level of the documented rule clamped to [3, 5]
  (TF's crop_and_resize on that map; ROIAlign on its pixels, y by H_l and
  x by W_l, when aligned)."""
  rng = np.random.default_rng(13)
  h, w = 128, 64
  feats = [rng.normal(size=(2, h // s, w // s, 3)).astype(np.float32) for s in (8, 16, 32)]
  side = np.exp(rng.uniform(np.log(2), np.log(64), (2, 9, 2))) / [h, w]
  yx = rng.uniform(0, 1, (2, 9, 2)) * (1 - side)
  boxes = np.concatenate([yx, yx + side], -1).astype(np.float32)
  area = float(h * w) * 256  # levels 2..6 before the clamp
  hw = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  raw = np.round(4 + np.log2(np.sqrt(hw.astype(np.float64)) / (224 / np.sqrt(area))))
  assert raw.min() < 3 and raw.max() > 5
  levels = np.clip(raw, 3, 5).astype(int)
  np.testing.assert_array_equal(roi_align.roi_levels(boxes, area, 3, 5), levels)
  got = np.asarray(roi_align.multilevel_crop_and_resize(feats, boxes, 4, area, min_level=3))
  img = np.repeat([0, 1], 9)
  per_level = np.stack(
      [tf.image.crop_and_resize(f, boxes.reshape(-1, 4), img, (4, 4)).numpy() for f in feats]
  )
  want = per_level[levels.reshape(-1) - 3, np.arange(18)]
  np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)
  got = np.asarray(
      roi_align.multilevel_crop_and_resize(
          feats, boxes, 3, area, aligned=True, sampling_ratio=2, min_level=3
      )
  )
  for b in range(2):
    for n in range(9):
      f = feats[levels[b, n] - 3][b]
      px = boxes[b, n] * np.array(f.shape[:2] * 2)
      want = _roi_align_loop(f, px, 3, 1.0, 2, True)
      np.testing.assert_allclose(got[b, n], want, atol=1e-5)


def test_gradients_flow_to_features():
  feats = jnp.ones((1, 6, 6, 2))
  boxes = jnp.array([[[0.1, 0.1, 0.8, 0.9]]])
  g = jax.grad(lambda f: roi_align.crop_and_resize(f, boxes, 4).sum())(feats)
  assert g.shape == feats.shape and float(g.sum()) == pytest.approx(32.0)


# ------------------------------------------------------------ property


_FEATS = np.random.default_rng(11).normal(size=(2, 7, 10, 2)).astype(np.float32)
_CROP = jax.jit(roi_align.crop_and_resize, static_argnums=2)
GRID = 32  # box corners on multiples of 1/32: map edges, flips, empty boxes


def _exact_axis(lo, hi, size, crop):
  """(crop, size) float64 sampling matrix of TF's crop_and_resize along one
  axis in exact rational arithmetic, and (crop,) bool: the sample lies on an
  edge of the map (where TF's float32 rounding decides inside or out)."""
  top = size - 1
  if crop > 1:
    coords = [lo * top + i * (hi - lo) * top / (crop - 1) for i in range(crop)]
  else:
    coords = [(lo + hi) * top / 2]
  weights = np.zeros((crop, size))
  on_edge = np.zeros(crop, bool)
  for i, y in enumerate(coords):
    on_edge[i] = y in (0, top)
    if 0 <= y <= top:
      f = math.floor(y)
      weights[i, f] += float(1 - (y - f))
      weights[i, math.ceil(y)] += float(y - f)
  return weights, on_edge


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
    corners=hnp.arrays(np.int32, (2, 5, 4), elements=st.integers(-GRID // 2, GRID * 3 // 2)),
    crop=st.sampled_from([1, 3, 6]),
)
def test_property_crop_and_resize_is_exact_and_matches_tf_off_the_edges(corners, crop):
  """Any corners (flipped, zero-size, partly or wholly outside the map):
  equal to TF's formula in exact arithmetic everywhere, and to TF itself
  except at samples exactly on the map's edge, where TF's float32 sum may
  land a rounding error outside and return 0."""
  boxes = (corners / GRID).astype(np.float32)
  got = np.asarray(_CROP(_FEATS, boxes, crop))
  want_tf = (
      tf.image.crop_and_resize(_FEATS, boxes.reshape(-1, 4), np.repeat([0, 1], 5), (crop, crop))
      .numpy()
      .reshape(got.shape)
  )
  _, h, w, _ = _FEATS.shape
  for b in range(2):
    for r in range(5):
      y1, x1, y2, x2 = (fractions.Fraction(int(v), GRID) for v in corners[b, r])
      wy, edge_y = _exact_axis(y1, y2, h, crop)
      wx, edge_x = _exact_axis(x1, x2, w, crop)
      exact = np.einsum('ih,jw,hwc->ijc', wy, wx, _FEATS[b].astype(np.float64))
      np.testing.assert_allclose(got[b, r], exact, atol=2e-5)
      off_edge = ~(edge_y[:, None] | edge_x[None, :])
      np.testing.assert_allclose(got[b, r][off_edge], want_tf[b, r][off_edge], atol=2e-5)


def test_boxes_ending_on_the_far_edge_sample_the_edge_row_and_column():
  """Boxes clipped to the map (y2 = x2 = 1, as clipped proposals): their
  last samples lie exactly on the last row and column, equal to TF's formula
  in exact arithmetic, although float32 y1 * (H - 1) + i * step lands a
  rounding error beyond H - 1 for some of them (EDGE_TOLERANCE)."""
  rng = np.random.default_rng(12)
  feats = rng.normal(size=(1, 16, 33, 2)).astype(np.float32)
  start = rng.uniform(0, 1, (40, 2)).astype(np.float32)
  boxes = np.concatenate([start, np.ones_like(start)], 1)
  got = np.asarray(_CROP(feats, boxes[None], 7))[0]
  for r, box in enumerate(boxes):
    y1, x1, y2, x2 = (fractions.Fraction(float(v)) for v in box)
    wy, _ = _exact_axis(y1, y2, 16, 7)
    wx, _ = _exact_axis(x1, x2, 33, 7)
    exact = np.einsum('ih,jw,hwc->ijc', wy, wx, feats[0].astype(np.float64))
    np.testing.assert_allclose(got[r], exact, atol=2e-5)


@pytest.mark.parametrize('aligned', [False, True])
def test_bfloat16_gradient_accumulates_in_float32(aligned):
  """A bfloat16 pyramid's gradient is the float32 gradient rounded once:
  hundreds of ROIs sampling the same pixels sum in float32 (torchvision's
  autocast runs roi_align in float32), not in bfloat16 per sample."""
  rng = np.random.default_rng(7)
  maps = [jnp.asarray(rng.normal(size=(1, s, s, 8)), jnp.bfloat16) for s in (32, 16, 8)]
  lo = rng.uniform(0.0, 0.5, (1, 300, 2))
  boxes = jnp.asarray(
      np.concatenate([lo, lo + rng.uniform(0.05, 0.3, (1, 300, 2))], -1), jnp.float32
  )
  cot = jnp.asarray(rng.normal(size=(1, 300, 7, 7, 8)), jnp.bfloat16)

  def loss(fs):
    out = roi_align.multilevel_crop_and_resize(
        fs, boxes, 7, 1024.0 * 1024.0, aligned=aligned, sampling_ratio=2
    )
    return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

  got = jax.grad(loss)(maps)
  want = jax.grad(loss)([m.astype(jnp.float32) for m in maps])
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    g, w = np.asarray(g, np.float32), np.asarray(w)
    assert np.abs(w).max() > 5.0  # every level has pixels shared by many ROIs
    # within one bfloat16 rounding of the float32 gradient (2^-8 relative)
    np.testing.assert_array_less(np.abs(g - w), np.abs(w) * 2.0**-8 + 1e-6)
