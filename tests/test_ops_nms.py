"""Padded NMS against tf.image.non_max_suppression; with pixel_scale, against
the release's +1 pixel NMS (a numpy transcription of its formulas)."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import numpy as np
import pytest
import tensorflow as tf

from sln_jax.ops import nms
from tests import box_reference


def _boxes(rng, n, extent=1.0):
  yx = rng.uniform(0, extent * 0.8, (n, 2))
  hw = rng.uniform(0.05, 0.4, (n, 2)) * extent
  return np.concatenate([yx, yx + hw], 1).astype(np.float32)


_JIT = jax.jit(nms.nms_padded, static_argnums=(2, 6, 8, 9))


def _check(boxes, scores, k, thr, tile=4, score_threshold=-np.inf, groups=None, sweeps=4):
  """Against TF; and ``presorted`` on the same boxes sorted by score
  (stable) gives the same boxes."""
  idx, valid = _JIT(boxes, scores, k, thr, score_threshold, groups, tile, None, sweeps, False)
  idx, valid = np.asarray(idx), np.asarray(valid)
  order = np.argsort(-scores, kind='stable')
  s_idx, s_valid = _JIT(
      boxes[order],
      scores[order],
      k,
      thr,
      score_threshold,
      None if groups is None else groups[order],
      tile,
      None,
      sweeps,
      True,
  )
  np.testing.assert_array_equal(np.asarray(s_valid), valid)
  np.testing.assert_array_equal(np.where(valid, order[np.asarray(s_idx)], 0), idx)
  assert idx.shape == (k,) and idx.dtype == np.int32 and valid.dtype == bool
  if groups is None:
    want = tf.image.non_max_suppression(
        boxes, scores, k, thr, score_threshold=float(max(score_threshold, -3e38))
    ).numpy()
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
  boxes[10:15] = boxes[3]  # exact duplicates
  scores = rng.choice([0.2, 0.5, 0.9], 30).astype(np.float32)  # many ties
  for tile in (1, 4, 7, 64):
    for sweeps in (1, 2, 5):
      _check(boxes, scores, 30, 0.5, tile=tile, sweeps=sweeps)
  _check(boxes, scores, 30, 1.0, tile=5)  # nothing suppressed (IoU > 1)
  _check(boxes, scores, 30, 0.0, tile=5)  # any overlap suppresses


def test_all_suppressed_and_padding():
  box = np.array([[0.1, 0.1, 0.5, 0.5]], np.float32)
  boxes = np.repeat(box, 12, 0)
  scores = np.linspace(0.1, 0.9, 12).astype(np.float32)
  scores[5:] = -np.inf  # padding
  idx, valid = _JIT(boxes, scores, 6, 0.5, -np.inf, None, 4)
  assert list(np.asarray(valid)) == [True] + [False] * 5
  assert int(idx[0]) == 4  # best non-padded box
  # Everything padded: nothing selected.
  idx, valid = _JIT(boxes, np.full(12, -np.inf, np.float32), 6, 0.5, -np.inf, None, 4)
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
  idx, valid = jax.jit(nms.batched_nms_padded, static_argnums=(2, 3))(boxes, scores, 8, 0.5)
  assert idx.shape == (3, 8)
  for b in range(3):
    want = tf.image.non_max_suppression(boxes[b], scores[b], 8, 0.5).numpy()
    n = int(np.asarray(valid[b]).sum())
    np.testing.assert_array_equal(np.asarray(idx[b])[:n], want)


# ------------------------------------------------- release +1 pixel IoU
CANVAS = 1024


def _release_nms(boxes, scores, thr, k):
  """The release's proposal NMS (nms/pth_nms.py, nms_kernel.cu devIoU) in
  float32: pixel boxes (y1, x1, y2, x2), areas (x2 - x1 + 1) * (y2 - y1 + 1),
  intersection sides max(right - left + 1, 0), suppress when IoU > thr;
  greedy by decreasing score; its first k kept (proposal_layer's keep[:k])."""
  b = boxes.astype(np.float32)
  one, zero = np.float32(1), np.float32(0)
  order = np.argsort(-scores, kind='stable')
  areas = (b[:, 3] - b[:, 1] + one) * (b[:, 2] - b[:, 0] + one)
  suppressed = np.zeros(len(b), bool)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    left, right = np.maximum(b[i, 1], b[:, 1]), np.minimum(b[i, 3], b[:, 3])
    top, bottom = np.maximum(b[i, 0], b[:, 0]), np.minimum(b[i, 2], b[:, 2])
    inter = np.maximum(right - left + one, zero) * np.maximum(bottom - top + one, zero)
    suppressed |= inter / (areas[i] + areas - inter) > np.float32(thr)
  return np.asarray(keep[:k], np.int64)


def _clustered_pixel_boxes(rng, n, canvas=CANVAS, clusters=12):
  """Proposal-like boxes: clusters of jittered copies, clipped to the
  canvas, with zero-width / zero-height boxes squashed onto its edges."""
  centre = rng.uniform(0.05, 0.95, (clusters, 2)) * canvas
  size = rng.uniform(0.005, 0.08, (clusters, 2)) * canvas
  c = rng.integers(0, clusters, n)
  yx = centre[c] + rng.normal(0, 0.15, (n, 2)) * size[c]
  hw = size[c] * np.exp(rng.normal(0, 0.15, (n, 2)))
  b = np.concatenate([yx - hw / 2, yx + hw / 2], 1)
  edge = rng.choice(n, n // 10, replace=False)  # 10% flat on an edge
  for j, e in zip(edge, rng.integers(0, 4, len(edge))):
    if e == 0:
      b[j, [1, 3]] = 0.0  # x1 = x2 = 0
    elif e == 1:
      b[j, [1, 3]] = canvas  # x1 = x2 = canvas
    elif e == 2:
      b[j, [0, 2]] = 0.0
    else:
      b[j, [0, 2]] = canvas
  return np.clip(b, 0, canvas).astype(np.float32)


def _plus_one(boxes, scores, k, thr, canvas=CANVAS, tile=256):
  idx, valid = jax.jit(nms.nms_padded, static_argnums=(2, 6, 7))(
      boxes, scores, k, thr, -np.inf, None, tile, float(canvas)
  )
  idx, valid = np.asarray(idx), np.asarray(valid)
  n = int(valid.sum())
  assert np.all(valid[:n]) and not np.any(valid[n:]) and np.all(idx[n:] == 0)
  return idx[:n]


@pytest.mark.parametrize('thr,canvas', [(0.7, 1024), (0.5, 1024), (0.3, 640)])
def test_plus_one_matches_release_formulas(thr, canvas):
  """pixel_scale: the release's NMS on the normalised boxes times the
  canvas side (clustered boxes, 10% of zero width or height on an edge);
  the kept set differs from the plain-IoU default."""
  rng = np.random.default_rng(int(thr * 10))
  px = _clustered_pixel_boxes(rng, 1500, canvas)
  scores = rng.permutation(1500).astype(np.float32) / 1500  # no ties
  norm = px / np.float32(canvas)
  for k, tile in ((300, 256), (1500, 100)):
    got = _plus_one(norm, scores, k, thr, canvas, tile)
    want = _release_nms(norm * np.float32(canvas), scores, thr, k)
    np.testing.assert_array_equal(got, want)
    plain, valid = _JIT(norm, scores, k, thr, -np.inf, None, tile)
    plain = np.asarray(plain)[np.asarray(valid)]
    assert len(set(plain) ^ set(got)) > 0.05 * len(got)


def test_plus_one_suppresses_what_plain_iou_keeps():
  """Two cases where only the +1 convention suppresses: boxes shifted by one
  pixel (IoU 0.5 plain, 0.6 with +1) and two zero-width boxes on the right
  edge (0 plain, 1 with +1)."""
  px = np.array(
      [[0, 0, 3, 3], [0, 1, 3, 4], [100, 1024, 120, 1024], [101, 1024, 121, 1024]], np.float32
  )
  scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
  norm = px / CANVAS
  plain, valid = _JIT(norm, scores, 4, 0.55, -np.inf, None, 4)
  assert list(np.asarray(plain)[np.asarray(valid)]) == [0, 1, 2, 3]
  got = _plus_one(norm, scores, 4, 0.55, tile=4)
  assert list(got) == [0, 2]
  np.testing.assert_array_equal(got, _release_nms(px, scores, 0.55, 4))


def test_empty_output_slots_suppress_nothing():
  """Output slots not filled yet are no boxes: with the +1 convention a box
  flat on the canvas corner (0, 0, 0, 0) has IoU 1 with its duplicate and is
  still kept first; with a negative threshold (every pair overlaps) the best
  box of each group is kept."""
  px = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2], [10, 10, 20, 20]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
  got = _plus_one(px / CANVAS, scores, 4, 0.7, tile=4)
  np.testing.assert_array_equal(got, _release_nms(px, scores, 0.7, 4))
  assert list(got) == [0, 2, 3]
  rng = np.random.default_rng(10)
  boxes, scores = _boxes(rng, 9), rng.permutation(9).astype(np.float32)
  idx, valid = _JIT(boxes, scores, 3, -1.0, -np.inf, None, 4)
  assert list(np.asarray(valid)) == [True, False, False]
  assert int(idx[0]) == int(np.argmax(scores))
  groups = np.arange(9, dtype=np.int32) % 2
  idx, valid = _JIT(boxes, scores, 3, -1.0, -np.inf, groups, 4)
  want = sorted(
      (int(np.flatnonzero(groups == g)[np.argmax(scores[groups == g])]) for g in (0, 1)),
      key=lambda i: -scores[i],
  )
  assert list(np.asarray(valid)) == [True, True, False]
  assert list(np.asarray(idx)[:2]) == want


# ------------------------------------------------------------ property

N = 24


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    corner=hnp.arrays(np.int32, (N, 2), elements=st.integers(0, 12)),
    side=hnp.arrays(np.int32, (N, 2), elements=st.integers(1, 8)),
    scores=hnp.arrays(np.int32, (N,), elements=st.integers(0, 5)),
    k=st.sampled_from([3, N]),
    thr=st.sampled_from([0.0, 0.2, 0.45, 0.6, 0.85]),
    score_threshold=st.sampled_from([-np.inf, 1.5]),
    tile=st.sampled_from([1, 5, N]),
    sweeps=st.sampled_from([1, 2, 4]),
)
def test_property_matches_tf_on_crowded_grids(
    corner, side, scores, k, thr, score_threshold, tile, sweeps
):
  """Small integer grids: many duplicates, nested boxes, shared edges and
  score ties. Pairs whose IoU sits within float rounding of the threshold
  (where float32 arithmetic order decides) are left out."""
  boxes = np.concatenate([corner, corner + side], 1).astype(np.float32)
  iou = box_reference.iou(boxes.astype(np.float64), boxes.astype(np.float64))
  hypothesis.assume(not np.any((np.abs(iou - thr) < 1e-5) & (iou > 0)))
  _check(
      boxes,
      scores.astype(np.float32),
      k,
      thr,
      tile=tile,
      score_threshold=score_threshold,
      sweeps=sweeps,
  )


def test_one_loop_without_an_inner_loop():
  """Each tile's fixed point runs inside the single tile loop (XLA:GPU waits
  on the host for every loop condition): one while, none nested in it."""
  rng = np.random.default_rng(5)
  boxes, scores = _boxes(rng, 40), rng.uniform(size=40).astype(np.float32)
  jaxpr = jax.make_jaxpr(lambda b, s: nms.nms_padded(b, s, 10, 0.5, tile=8))(boxes, scores).jaxpr
  loops = [e for e in jaxpr.eqns if e.primitive.name == 'while']
  assert len(loops) == 1
  body = loops[0].params['body_jaxpr'].jaxpr
  assert not [e for e in body.eqns if e.primitive.name in ('while', 'cond')]


def test_presorted_skips_the_sort_and_its_gathers():
  rng = np.random.default_rng(6)
  boxes, scores = _boxes(rng, 40), np.sort(rng.uniform(size=40))[::-1].astype(np.float32)

  def outside_the_loop(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name != 'while':
        yield e.primitive.name
        for sub in e.params.values():
          sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
          if hasattr(sub, 'eqns'):
            yield from outside_the_loop(sub)

  def prims(presorted):
    jaxpr = jax.make_jaxpr(lambda b, s: nms.nms_padded(b, s, 10, 0.5, tile=8, presorted=presorted))(
        boxes, scores
    )
    return set(outside_the_loop(jaxpr.jaxpr))

  assert {'sort', 'gather'} <= prims(False)
  assert not {'sort', 'gather'} & prims(True)
