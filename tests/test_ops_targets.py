"""Target assignment against numpy transcriptions of the release."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from sln_jax.ops import targets
from tests import box_reference

STD = np.array([0.1, 0.1, 0.2, 0.2])


def _encode(box, ref):
  h, w = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
  gh, gw = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
  return (
      np.stack(
          [
              (box[:, 0] + gh / 2 - ref[:, 0] - h / 2) / h,
              (box[:, 1] + gw / 2 - ref[:, 1] - w / 2) / w,
              np.log(gh / h),
              np.log(gw / w),
          ],
          1,
      )
      / STD
  )


def _boxes(rng, n, lo=0.05, hi=0.4):
  yx = rng.uniform(0, 0.6, (n, 2))
  hw = rng.uniform(lo, hi, (n, 2))
  return np.concatenate([yx, yx + hw], 1).astype(np.float32)


def _release_rpn_match(anchors, gt):
  """build_rpn_targets before subsampling: 1 pos, -1 neg, 0 neutral."""
  ov = box_reference.iou(anchors, gt)
  match = np.zeros(len(anchors), np.int32)
  best = ov.max(1)
  match[best < 0.3] = -1
  match[np.argmax(ov, 0)] = 1
  match[best >= 0.7] = 1
  return match, np.argmax(ov, 1)


def test_rpn_targets_match_release_without_subsampling():
  rng = np.random.default_rng(0)
  anchors = _boxes(rng, 300, 0.05, 0.3)
  gt = np.concatenate([_boxes(rng, 4), np.zeros((2, 4), np.float32)])
  gt[1] = anchors[7] + 0.001  # guarantees an IoU >= 0.7 anchor
  valid = np.array([1, 1, 1, 1, 0, 0], bool)
  fn = jax.jit(
      lambda k, a, g, v: targets.rpn_targets(
          k, a, g, v, num_samples=10000, positive_fraction=0.5, bbox_std=STD
      )
  )
  labels, deltas = fn(jax.random.key(0), anchors, gt, valid)
  assert labels.dtype == jnp.int32 and deltas.shape == (300, 4)
  match, best = _release_rpn_match(anchors, gt[:4])
  want = np.where(match == 1, 1, np.where(match == -1, 0, -1))
  np.testing.assert_array_equal(np.asarray(labels), want)
  pos = want == 1
  assert pos.sum() >= 4
  np.testing.assert_allclose(
      np.asarray(deltas)[pos], _encode(gt[best[pos]], anchors[pos]), atol=1e-4
  )
  assert np.all(np.asarray(deltas)[~pos] == 0)


def test_rpn_targets_subsampling():
  rng = np.random.default_rng(1)
  anchors = _boxes(rng, 2000, 0.05, 0.3)
  gt = _boxes(rng, 8, 0.1, 0.3)
  valid = np.ones(8, bool)
  match, _ = _release_rpn_match(anchors, gt)
  kw = dict(num_samples=64, positive_fraction=0.25, bbox_std=STD)
  fn = jax.jit(lambda k: targets.rpn_targets(k, anchors, gt, valid, **kw))
  l0, _ = fn(jax.random.key(0))
  l1, _ = fn(jax.random.key(1))
  for labels in (np.asarray(l0), np.asarray(l1)):
    npos, nneg = (labels == 1).sum(), (labels == 0).sum()
    assert npos == min((match == 1).sum(), 16)
    assert nneg == min((match == -1).sum(), 64 - npos)
    assert np.all(match[labels == 1] == 1) and np.all(match[labels == 0] == -1)
  assert not np.array_equal(np.asarray(l0), np.asarray(l1))
  np.testing.assert_array_equal(np.asarray(fn(jax.random.key(0))[0]), np.asarray(l0))
  # No GT at all: only negatives, capped at num_samples.
  labels, deltas = jax.jit(lambda k, v: targets.rpn_targets(k, anchors, gt, v, **kw))(
      jax.random.key(2), np.zeros(8, bool)
  )
  assert (np.asarray(labels) == 0).sum() == 64
  assert not np.any(np.asarray(labels) == 1)
  assert np.all(np.isfinite(np.asarray(deltas)))


def test_negative_counts_table():
  table = targets.negative_counts(100, 0.7)
  assert len(table) == 71 and table[70] == 30 and table[0] == 0
  assert table[7] == int(7 / 0.7 - 7) == 3
  assert all(pc + n <= 100 for pc, n in enumerate(table))


def test_sample_rois():
  rng = np.random.default_rng(3)
  gt = np.concatenate([_boxes(rng, 3, 0.2, 0.4), np.zeros((2, 4), np.float32)])
  gt_cls = np.array([1, 2, 1, 0, 0], np.int32)
  gt_valid = np.array([1, 1, 1, 0, 0], bool)
  jitter = rng.normal(scale=0.02, size=(40, 4)).astype(np.float32)
  props = np.concatenate([gt[rng.integers(0, 3, 40)] + jitter, _boxes(rng, 60)])
  props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 0.01)
  pvalid = np.ones(100, bool)
  pvalid[-5:] = False
  ov = box_reference.iou(props, gt[:3])
  best = ov.max(1)
  pos_set = np.flatnonzero(pvalid & (best >= 0.5))
  neg_set = np.flatnonzero(pvalid & (best < 0.5))
  assert len(pos_set) > 5 and len(neg_set) > 10
  fn = jax.jit(
      lambda k, *a: targets.sample_rois(k, *a, num_rois=20, positive_ratio=0.5, bbox_std=STD)
  )
  out = {
      k: np.asarray(v)
      for k, v in fn(jax.random.key(0), props, pvalid, gt, gt_cls, gt_valid).items()
  }
  pc = min(len(pos_set), 10)
  nc = min(len(neg_set), targets.negative_counts(20, 0.5)[pc])
  assert out['positive'].sum() == pc and out['valid'].sum() == pc + nc
  np.testing.assert_array_equal(out['positive'], np.arange(20) < pc)
  np.testing.assert_array_equal(out['valid'], np.arange(20) < pc + nc)
  rows = [np.flatnonzero(np.all(props == r, 1))[0] for r in out['rois'][: pc + nc]]
  assert set(rows[:pc]) <= set(pos_set) and set(rows[pc:]) <= set(neg_set)
  assert len(set(rows)) == pc + nc
  m = np.argmax(ov[rows[:pc]], 1)
  np.testing.assert_array_equal(out['matched_gt'][:pc], m)
  np.testing.assert_array_equal(out['class_targets'][:pc], gt_cls[m])
  np.testing.assert_allclose(out['bbox_targets'][:pc], _encode(gt[m], props[rows[:pc]]), atol=1e-4)
  for key in ('class_targets', 'matched_gt', 'bbox_targets'):
    assert np.all(out[key][pc:] == 0)
  assert np.all(out['rois'][pc + nc :] == 0)


def test_sample_rois_without_gt_and_include_gt():
  rng = np.random.default_rng(4)
  props = _boxes(rng, 30)
  gt = _boxes(rng, 2, 0.3, 0.4)
  kw = dict(num_rois=10, positive_ratio=0.5, bbox_std=STD)
  sample = jax.jit(lambda *a: targets.sample_rois(*a, **kw))
  out = sample(
      jax.random.key(0), props, np.ones(30, bool), gt, np.ones(2, np.int32), np.zeros(2, bool)
  )
  assert not np.any(np.asarray(out['valid']))  # release: no positive, no ROI
  out = jax.jit(lambda *a: targets.sample_rois(*a, include_gt=True, **kw))(
      jax.random.key(0), props, np.zeros(30, bool), gt, np.ones(2, np.int32), np.ones(2, bool)
  )
  assert int(np.asarray(out['positive']).sum()) == 2
  np.testing.assert_allclose(np.asarray(out['bbox_targets'])[:2], 0, atol=1e-6)
  batched = jax.jit(lambda *a: targets.batched_sample_rois(*a, **kw))(
      jax.random.key(1),
      np.stack([props] * 2),
      np.ones((2, 30), bool),
      np.stack([gt] * 2),
      np.ones((2, 2), np.int32),
      np.ones((2, 2), bool),
  )
  assert batched['rois'].shape == (2, 10, 4)


def test_mask_targets():
  rng = np.random.default_rng(5)
  k, s, layers = 12, 8, 2
  gt_layers = (rng.uniform(size=(3, k, k, layers)) > 0.5).astype(np.float32)
  gt = _boxes(rng, 3, 0.2, 0.4)
  rois = gt[[0, 2, 1]] + rng.normal(scale=0.03, size=(3, 4)).astype(np.float32)
  matched = np.array([0, 2, 1], np.int32)
  got = np.asarray(jax.jit(targets.mask_targets, static_argnums=4)(gt_layers, gt, rois, matched, s))
  assert got.shape == (3, s, s, layers)
  g = gt[matched]
  gh, gw = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  rel = np.stack(
      [
          (rois[:, 0] - g[:, 0]) / gh,
          (rois[:, 1] - g[:, 1]) / gw,
          (rois[:, 2] - g[:, 0]) / gh,
          (rois[:, 3] - g[:, 1]) / gw,
      ],
      1,
  )
  want = np.round(tf.image.crop_and_resize(gt_layers, rel, matched, (s, s)).numpy())
  np.testing.assert_array_equal(got, want)
  # ROI == its GT box and S == K: the GT crop itself.
  fn = jax.jit(targets.mask_targets, static_argnums=4)
  same = np.asarray(fn(gt_layers, gt, gt, np.arange(3), k))
  np.testing.assert_array_equal(same, gt_layers)
  pos = np.array([True, False, True])
  masked = np.asarray(fn(gt_layers, gt, gt, np.arange(3), k, pos))
  assert np.all(masked[1] == 0)
  np.testing.assert_array_equal(masked[0], gt_layers[0])


def test_batched_rpn_targets_shapes():
  rng = np.random.default_rng(6)
  anchors = _boxes(rng, 50)
  labels, deltas = jax.jit(
      lambda k, g, v: targets.batched_rpn_targets(k, anchors, g, v, num_samples=16, bbox_std=STD)
  )(jax.random.key(0), np.stack([_boxes(rng, 3)] * 2), np.ones((2, 3), bool))
  assert labels.shape == (2, 50) and deltas.shape == (2, 50, 4)
  assert np.all((np.asarray(labels) >= 0).sum(1) <= 16)


# ------------------------------------------------------------ property

P, M, R = 24, 4, 12
_SAMPLE = jax.jit(
    lambda k, *a: targets.sample_rois(k, *a, num_rois=R, positive_ratio=0.5, bbox_std=STD)
)


@st.composite
def grid_boxes(draw, n):
  """(n, 4) float32 boxes with corners on a 1/16 grid in [0, 1], sides 1/16
  to 6/16: crowded, so duplicates and IoU ties are common."""
  corner = draw(hnp.arrays(np.int32, (n, 2), elements=st.integers(0, 10)))
  side = draw(hnp.arrays(np.int32, (n, 2), elements=st.integers(1, 6)))
  return (np.concatenate([corner, corner + side], 1) / 16).astype(np.float32)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    props=grid_boxes(P),
    gt=grid_boxes(M),
    p_valid=hnp.arrays(bool, (P,)),
    g_valid=hnp.arrays(bool, (M,)),
    seed=st.integers(0, 2**16),
)
def test_property_sample_rois_invariants(props, gt, p_valid, g_valid, seed):
  """On crowded 1/16 grids (duplicate proposals, GT ties): the counts of the
  release's rule, positives from the IoU >= 0.5 set matched to their first
  best valid GT, negatives from the rest, no proposal twice, zero padding."""
  cls = np.arange(1, M + 1, dtype=np.int32)
  out = {
      k: np.asarray(v)
      for k, v in _SAMPLE(jax.random.key(seed), props, p_valid, gt, cls, g_valid).items()
  }
  ov = np.where(
      g_valid[None], box_reference.iou(props.astype(np.float64), gt.astype(np.float64)), -1.0
  )
  best = ov.max(1) if g_valid.any() else np.full(P, -1.0)
  # Exact IoU 0.5 on a grid: float32 and float64 agree on which side it falls.
  pos_set = np.flatnonzero(p_valid & (best >= 0.5))
  neg_set = np.flatnonzero(p_valid & (best < 0.5))
  pc = min(len(pos_set), R // 2)
  nc = min(len(neg_set), targets.negative_counts(R, 0.5)[pc]) if pc else 0
  np.testing.assert_array_equal(out['positive'], np.arange(R) < pc)
  np.testing.assert_array_equal(out['valid'], np.arange(R) < pc + nc)
  chosen = []
  for slot in range(pc + nc):
    rows = np.flatnonzero(np.all(props == out['rois'][slot], 1))
    candidates = [r for r in rows if r in (pos_set if slot < pc else neg_set) and r not in chosen]
    assert candidates, slot
    chosen.append(candidates[0])
  for slot in range(pc):
    row = chosen[slot]
    m = int(np.argmax(ov[row]))  # first best valid GT
    assert out['matched_gt'][slot] == m and out['class_targets'][slot] == cls[m]
    np.testing.assert_allclose(
        out['bbox_targets'][slot], _encode(gt[m : m + 1], props[row : row + 1])[0], atol=1e-3
    )
  assert np.all(out['rois'][pc + nc :] == 0)
  assert np.all(out['class_targets'][pc:] == 0) and np.all(out['matched_gt'][pc:] == 0)


A = 40
_RPN = jax.jit(
    lambda k, a, g, v: targets.rpn_targets(
        k, a, g, v, num_samples=10000, positive_fraction=0.5, bbox_std=STD
    )
)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(anchors=grid_boxes(A), gt=grid_boxes(M), g_valid=hnp.arrays(bool, (M,)))
def test_property_rpn_targets_match_release_on_grids(anchors, gt, g_valid):
  """Crowded grids make ties: several anchors equally best for a GT, a GT
  with no overlap at all. Without subsampling the labels are the release's
  (build_rpn_targets: its np.argmax takes the first best anchor per GT),
  except the documented one: a GT that overlaps no anchor claims none (the
  release's argmax over a column of zeros makes anchor 0 positive)."""
  g_valid = g_valid.copy()
  g_valid[0] = True  # no valid GT: test_rpn_targets_subsampling
  labels, _ = _RPN(jax.random.key(0), anchors, gt, g_valid)
  a64, valid_gt = anchors.astype(np.float64), gt[g_valid].astype(np.float64)
  ov = box_reference.iou(a64, valid_gt)
  overlapping = ov.max(0) > 0
  # Positives: the release's, over the GTs that overlap some anchor (all of
  # them, usually); negatives: max IoU < 0.3 over every valid GT.
  match = (
      _release_rpn_match(a64, valid_gt[overlapping])[0]
      if overlapping.any()
      else np.zeros(A, np.int32)
  )
  match = np.where(match == 1, 1, np.where(ov.max(1) < 0.3, -1, 0))
  want = np.where(match == 1, 1, np.where(match == -1, 0, -1))
  np.testing.assert_array_equal(np.asarray(labels), want)


def test_rpn_targets_iou_bars_are_release_rules():
  """Exact IoUs at the bars: max IoU 0.7 is positive (>= 0.7), 0.3 is not
  negative (< 0.3). Integer boxes: 70 / 100 and 30 / 100."""
  anchors = np.array(
      [
          [0, 0, 10, 10],  # IoU 0.7 with GT 0
          [20, 0, 30, 10],  # IoU 0.3 with GT 1
          [40, 0, 50, 10],  # no overlap
          [0, 0, 10, 7],  # GT 0 itself (its best anchor)
          [20, 0, 30, 3],
      ],
      np.float32,
  )  # GT 1 itself
  gt = anchors[3:].copy()
  labels, _ = _RPN(jax.random.key(0), anchors, gt, np.ones(2, bool))
  match, _ = _release_rpn_match(anchors.astype(np.float64), gt.astype(np.float64))
  np.testing.assert_array_equal(match, [1, 0, -1, 1, 1])
  np.testing.assert_array_equal(np.asarray(labels), [1, -1, 0, 1, 1])


def test_rpn_targets_positive_cap_leaves_extras_neutral():
  """At most int(num_samples * positive_fraction) positives; a positive
  dropped by the cap becomes neutral (release: rpn_match[extra] = 0), even
  when its max IoU is below the negative bar."""
  anchors = np.array(
      [[0, 0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6], [0.8, 0.8, 0.9, 0.9], [0, 0.5, 0.1, 0.6]], np.float32
  )
  gt = np.array([[0, 0, 0.3, 0.3], [0.45, 0.45, 0.75, 0.75]], np.float32)
  # Each GT's best anchor (0, 1) overlaps it at IoU 1/9 < 0.3.
  fn = jax.jit(
      lambda k: targets.rpn_targets(
          k, anchors, gt, np.ones(2, bool), num_samples=100, positive_fraction=0.01, bbox_std=STD
      )
  )
  seen = set()
  for seed in range(6):
    labels = np.asarray(fn(jax.random.key(seed))[0])
    assert sorted(labels[:2]) == [-1, 1], labels
    np.testing.assert_array_equal(labels[2:], [0, 0])
    seen.add(int(np.argmax(labels[:2])))
  assert seen == {0, 1}  # a random one of the two is kept


def test_negative_counts_truncate():
  """int(), not round(): 10 ROIs at 0.7, pc / 0.7 - pc by hand."""
  assert targets.negative_counts(10, 0.7) == (0, 0, 0, 1, 1, 2, 2, 3)
  assert targets.negative_counts(100, 0.7)[2] == 0  # 0.857 truncates


def test_sample_rois_fg_iou_is_inclusive():
  """Release: positive_roi_bool = roi_iou_max >= 0.5; an exact 0.5 is a
  positive, 0.4 a negative (integer boxes)."""
  props = np.array([[0, 0, 10, 4], [0, 0, 10, 5]], np.float32)
  gt = np.array([[0, 0, 10, 10]], np.float32)
  out = jax.jit(
      lambda k: targets.sample_rois(
          k,
          props,
          np.ones(2, bool),
          gt,
          np.array([3], np.int32),
          np.ones(1, bool),
          num_rois=4,
          positive_ratio=0.5,
          bbox_std=STD,
      )
  )(jax.random.key(0))
  out = {k: np.asarray(v) for k, v in out.items()}
  np.testing.assert_array_equal(out['positive'], [1, 0, 0, 0])
  np.testing.assert_array_equal(out['valid'], [1, 1, 0, 0])
  np.testing.assert_array_equal(out['rois'][:2], props[[1, 0]])
  assert out['class_targets'][0] == 3
  np.testing.assert_allclose(out['bbox_targets'][0], [0, 5, 0, np.log(2) / 0.2], atol=1e-5)


def test_sample_rois_include_gt_skips_padded_gt():
  """include_gt appends only the valid GT boxes: a padded GT row (any box)
  is never sampled, not even as a negative."""
  gt = np.array([[0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9]], np.float32)
  props = np.zeros((4, 4), np.float32)
  out = jax.jit(
      lambda k: targets.sample_rois(
          k,
          props,
          np.zeros(4, bool),
          gt,
          np.array([1, 1], np.int32),
          np.array([True, False]),
          num_rois=4,
          positive_ratio=0.5,
          bbox_std=STD,
          include_gt=True,
      )
  )(jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out['valid']), [1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(out['positive']), [1, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(out['rois'])[0], gt[0])


def test_mask_targets_round_half_to_even():
  """Samples exactly halfway between 0 and 1 round to 0 (torch.round, half
  to even), as np.round of TF crop_and_resize."""
  gt_layers = np.array([[0, 1], [0, 1]], np.float32)[None, :, :, None]
  box = np.array([[0.2, 0.3, 0.6, 0.5]], np.float32)
  got = np.asarray(
      jax.jit(targets.mask_targets, static_argnums=4)(gt_layers, box, box, np.zeros(1, np.int32), 3)
  )
  want = np.round(tf.image.crop_and_resize(gt_layers, [[0, 0, 1, 1]], [0], (3, 3)).numpy())
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[0, :, :, 0], [[0, 0, 1]] * 3)
