"""Padded NMS against tf.image.non_max_suppression."""
import jax
import numpy as np
import pytest
import tensorflow as tf

from sln_jax.ops import nms


def _boxes(rng, n, extent=1.0):
  yx = rng.uniform(0, extent * 0.8, (n, 2))
  hw = rng.uniform(0.05, 0.4, (n, 2)) * extent
  return np.concatenate([yx, yx + hw], 1).astype(np.float32)


_JIT = jax.jit(nms.nms_padded, static_argnums=(2, 6))


def _check(boxes, scores, k, thr, tile=4, score_threshold=-np.inf,
           groups=None):
  idx, valid = _JIT(boxes, scores, k, thr, score_threshold, groups, tile)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == (k,) and idx.dtype == np.int32 and valid.dtype == bool
  if groups is None:
    want = tf.image.non_max_suppression(
        boxes, scores, k, thr,
        score_threshold=float(max(score_threshold, -3e38))).numpy()
  else:
    want = _per_group_tf(boxes, scores, k, thr, groups)
  n = int(valid.sum())
  assert np.all(valid[:n]) and not np.any(valid[n:])
  np.testing.assert_array_equal(idx[:n], want)
  assert np.all(idx[n:] == 0)


def _per_group_tf(boxes, scores, k, thr, groups):
  keep = []
  for g in np.unique(groups):
    ix = np.flatnonzero(groups == g)
    sel = tf.image.non_max_suppression(boxes[ix], scores[ix], k, thr).numpy()
    keep.extend(ix[sel])
  keep = np.asarray(keep, np.int64)
  order = np.lexsort((keep, -scores[keep]))
  return keep[order][:k]


@pytest.mark.parametrize('thr', [0.3, 0.5, 0.7])
def test_random_boxes_match_tf(thr):
  rng = np.random.default_rng(int(thr * 10))
  for n, k in ((37, 10), (37, 40), (64, 25)):
    boxes = _boxes(rng, n)
    scores = rng.uniform(size=n).astype(np.float32)
    _check(boxes, scores, k, thr)


def test_ties_duplicates_and_tile_independence():
  rng = np.random.default_rng(7)
  boxes = _boxes(rng, 30)
  boxes[10:15] = boxes[3]                 # exact duplicates
  scores = rng.choice([0.2, 0.5, 0.9], 30).astype(np.float32)  # many ties
  for tile in (1, 4, 7, 64):
    _check(boxes, scores, 30, 0.5, tile=tile)
  _check(boxes, scores, 30, 1.0, tile=5)  # nothing suppressed (IoU > 1)
  _check(boxes, scores, 30, 0.0, tile=5)  # any overlap suppresses


def test_all_suppressed_and_padding():
  box = np.array([[0.1, 0.1, 0.5, 0.5]], np.float32)
  boxes = np.repeat(box, 12, 0)
  scores = np.linspace(0.1, 0.9, 12).astype(np.float32)
  scores[5:] = -np.inf                    # padding
  idx, valid = _JIT(boxes, scores, 6, 0.5, -np.inf, None, 4)
  assert list(np.asarray(valid)) == [True] + [False] * 5
  assert int(idx[0]) == 4                 # best non-padded box
  # Everything padded: nothing selected.
  idx, valid = _JIT(boxes, np.full(12, -np.inf, np.float32), 6, 0.5, -np.inf,
                    None, 4)
  assert not np.any(np.asarray(valid)) and np.all(np.asarray(idx) == 0)


def test_score_threshold_and_groups():
  rng = np.random.default_rng(8)
  boxes = _boxes(rng, 40)
  scores = rng.uniform(size=40).astype(np.float32)
  _check(boxes, scores, 20, 0.5, score_threshold=0.4)
  groups = rng.integers(0, 3, 40).astype(np.int32)
  _check(boxes, scores, 40, 0.3, groups=groups)
  _check(boxes, scores, 7, 0.3, groups=groups)


def test_batched_matches_single():
  rng = np.random.default_rng(9)
  boxes = np.stack([_boxes(rng, 20) for _ in range(3)])
  scores = rng.uniform(size=(3, 20)).astype(np.float32)
  idx, valid = jax.jit(nms.batched_nms_padded, static_argnums=(2, 3))(
      boxes, scores, 8, 0.5)
  assert idx.shape == (3, 8)
  for b in range(3):
    want = tf.image.non_max_suppression(boxes[b], scores[b], 8, 0.5).numpy()
    n = int(np.asarray(valid[b]).sum())
    np.testing.assert_array_equal(np.asarray(idx[b])[:n], want)


# ------------------------------------------------------------ property
import hypothesis  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

N = 24


def _np_iou(a, b):
  ih = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
  iw = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
  inter = ih * iw
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(
    corner=hnp.arrays(np.int32, (N, 2), elements=st.integers(0, 12)),
    side=hnp.arrays(np.int32, (N, 2), elements=st.integers(1, 8)),
    scores=hnp.arrays(np.int32, (N,), elements=st.integers(0, 5)),
    k=st.sampled_from([3, N]),
    thr=st.sampled_from([0.0, 0.2, 0.45, 0.6, 0.85]),
    score_threshold=st.sampled_from([-np.inf, 1.5]),
    tile=st.sampled_from([1, 5, N]))
def test_property_matches_tf_on_crowded_grids(corner, side, scores, k, thr, score_threshold, tile):
  """Small integer grids: many duplicates, nested boxes, shared edges and
  score ties. Pairs whose IoU sits within float rounding of the threshold
  (where float32 arithmetic order decides) are left out."""
  boxes = np.concatenate([corner, corner + side], 1).astype(np.float32)
  iou = _np_iou(boxes.astype(np.float64), boxes.astype(np.float64))
  hypothesis.assume(not np.any((np.abs(iou - thr) < 1e-5) & (iou > 0)))
  _check(boxes, scores.astype(np.float32), k, thr, tile=tile,
         score_threshold=score_threshold)
