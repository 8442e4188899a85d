"""Box geometry against direct numpy transcriptions of the release formulas."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np

from sln_jax.ops import boxes as box_ops

STD = np.array([0.1, 0.1, 0.2, 0.2], np.float32)


def _random_boxes(rng, n, scale=100.0):
  yx = rng.uniform(0, scale, (n, 2))
  hw = rng.uniform(1, scale / 2, (n, 2))
  return np.concatenate([yx, yx + hw], 1).astype(np.float32)


def _np_iou(a, b):
  """Release utils.compute_overlaps, loop form."""
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      ih = min(p[2], q[2]) - max(p[0], q[0])
      iw = min(p[3], q[3]) - max(p[1], q[1])
      inter = max(ih, 0) * max(iw, 0)
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
      out[i, j] = inter / union
  return out


def test_iou_matches_numpy_and_zero_for_padding():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
  got = np.asarray(jax.jit(box_ops.iou)(a, b))
  assert got.shape == (7, 5) and got.dtype == np.float32
  np.testing.assert_allclose(got, _np_iou(a, b), atol=1e-6)
  padded = np.concatenate([b, np.zeros((2, 4), np.float32)])
  got = np.asarray(box_ops.iou(a, padded))
  assert np.all(got[:, 5:] == 0) and np.all(np.isfinite(got))
  # Identical boxes have IoU 1; batched leading axes broadcast.
  np.testing.assert_allclose(np.diagonal(np.asarray(box_ops.iou(a, a))), 1.0, rtol=1e-6)
  batched = np.asarray(box_ops.iou(np.stack([a, a]), np.stack([b, b])))
  assert batched.shape == (2, 7, 5)


def test_hand_iou():
  a = np.array([[0, 0, 10, 10]], np.float32)
  b = np.array([[0, 5, 10, 15], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
  np.testing.assert_allclose(np.asarray(box_ops.iou(a, b))[0], [50 / 150, 0.0, 1.0], rtol=1e-6)


def test_encode_decode_roundtrip_and_formula():
  rng = np.random.default_rng(1)
  anchors, boxes = _random_boxes(rng, 20), _random_boxes(rng, 20)
  deltas = np.asarray(jax.jit(box_ops.encode)(boxes, anchors, STD))
  ah, aw = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  want = (
      np.stack(
          [
              ((boxes[:, 0] + 0.5 * h) - (anchors[:, 0] + 0.5 * ah)) / ah,
              ((boxes[:, 1] + 0.5 * w) - (anchors[:, 1] + 0.5 * aw)) / aw,
              np.log(h / ah),
              np.log(w / aw),
          ],
          1,
      )
      / STD
  )
  np.testing.assert_allclose(deltas, want, rtol=1e-5, atol=1e-5)
  back = np.asarray(jax.jit(box_ops.decode)(deltas, anchors, STD))
  np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)


def test_decode_hand_values_and_clamp():
  anchor = np.array([[10, 20, 30, 60]], np.float32)  # h 20, w 40
  d = np.array([[0.5, -0.25, np.log(2.0), 0.0]], np.float32)
  got = np.asarray(box_ops.decode(d, anchor))
  # centre (20 + 10, 40 - 10), size (40, 40).
  np.testing.assert_allclose(got, [[10, 10, 50, 50]], atol=1e-5)
  huge = np.array([[0, 0, 1e4, 1e4]], np.float32)
  out = np.asarray(box_ops.decode(huge, anchor, max_log_scale=np.log(62.5)))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 20 * 62.5, rtol=1e-5)


def test_clip_and_normalize():
  b = np.array([[-5, 3, 120, 50], [10, -1, 20, 300]], np.float32)
  got = np.asarray(box_ops.clip(jnp.asarray(b), (0, 0, 100, 200)))
  np.testing.assert_array_equal(got, [[0, 3, 100, 50], [10, 0, 20, 200]])
  n = np.asarray(box_ops.normalize(b, (100.0, 200.0)))
  np.testing.assert_allclose(n, b / [100, 200, 100, 200], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(box_ops.denormalize(n, (100, 200))), b, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(box_ops.normalize(b, 50.0)), b / 50, rtol=1e-6)


# ------------------------------------------------------------ properties

PROPERTY = hypothesis.settings(max_examples=40, deadline=None)
N = 6  # fixed shapes: one compilation per property


@st.composite
def box_sets(draw, n=N, min_side=0.5):
  """(n, 4) float32 boxes y1x1y2x2 with sides >= min_side, on a 0.25 grid
  (so duplicates, shared edges and nested boxes come up)."""
  corner = draw(hnp.arrays(np.int32, (n, 2), elements=st.integers(-40, 400)))
  side = draw(hnp.arrays(np.int32, (n, 2), elements=st.integers(int(4 * min_side), 200)))
  return (np.concatenate([corner, corner + side], 1) / 4).astype(np.float32)


_IOU = jax.jit(box_ops.iou)
_ENCODE, _DECODE = jax.jit(box_ops.encode), jax.jit(box_ops.decode)


@PROPERTY
@hypothesis.given(box_sets(), box_sets())
def test_property_iou_matches_numpy_symmetric_and_bounded(a, b):
  got = np.asarray(_IOU(a, b))
  np.testing.assert_allclose(got, _np_iou(a.astype(np.float64), b.astype(np.float64)), atol=2e-6)
  np.testing.assert_allclose(np.asarray(_IOU(b, a)), got.T, atol=1e-7)
  assert np.all((got >= 0) & (got <= 1))
  np.testing.assert_allclose(np.diagonal(np.asarray(_IOU(a, a))), 1.0, rtol=1e-6)


@PROPERTY
@hypothesis.given(box_sets(), box_sets(min_side=1.0))
def test_property_encode_then_decode_returns_the_box(boxes, anchors):
  deltas = _ENCODE(boxes, anchors, STD)
  # Sides within [0.5, 50] and [1, 50]: a box is at most 50x its anchor, so
  # decode's default upper clamp of log dh, log dw (log(1000 / 16)) never binds.
  assert np.all(np.asarray(deltas)[:, 2:] * STD[2:] < box_ops.DEFAULT_MAX_LOG_SCALE)
  back = np.asarray(_DECODE(deltas, anchors, STD))
  scale = np.maximum(np.abs(boxes).max(), 1.0)
  np.testing.assert_allclose(back, boxes, atol=2e-5 * scale + 1e-4)


def test_area_hand_values():
  """Flipped (either side) and empty boxes have area 0."""
  b = np.array([[0, 0, 2, 3], [5, 5, 4, 9], [5, 5, 9, 4], [0, 0, -1, -1], [1, 1, 1, 4]], np.float32)
  np.testing.assert_array_equal(np.asarray(box_ops.area(b)), [6, 0, 0, 0, 0])
