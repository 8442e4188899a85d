"""Proposal layer against a numpy + tf.image.non_max_suppression reference."""

import jax
import numpy as np
import tensorflow as tf

from sln_jax.ops import anchors as anchor_ops
from sln_jax.ops import proposals

STD = (0.1, 0.1, 0.2, 0.2)


def _release_nms(boxes, scores, thr, k):
  """The release's NMS (nms/pth_nms.py, nms_kernel.cu devIoU), float32 pixel
  boxes: areas (x2 - x1 + 1) * (y2 - y1 + 1), intersection sides
  max(right - left + 1, 0), suppress when IoU > thr, first k kept."""
  one, zero = np.float32(1), np.float32(0)
  areas = (boxes[:, 3] - boxes[:, 1] + one) * (boxes[:, 2] - boxes[:, 0] + one)
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for i in np.argsort(-scores, kind='stable'):
    if not suppressed[i]:
      keep.append(i)
      lo = np.maximum(boxes[i, :2], boxes[:, :2])
      hi = np.minimum(boxes[i, 2:], boxes[:, 2:])
      inter = np.prod(np.maximum(hi - lo + one, zero), axis=1)
      suppressed |= inter / (areas[i] + areas - inter) > np.float32(thr)
  return np.asarray(keep[:k], np.int64)


def _reference(probs, deltas, anchors, pre, thr, post, canvas=None):
  """canvas: None, TF NMS on normalised boxes; the canvas side, the
  release's +1 NMS on the boxes in canvas pixels."""
  order = np.argsort(-probs, kind='stable')[:pre]
  a, d = anchors[order].astype(np.float64), deltas[order] * np.array(STD)
  h, w = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  cy, cx = a[:, 0] + 0.5 * h + d[:, 0] * h, a[:, 1] + 0.5 * w + d[:, 1] * w
  h, w = h * np.exp(d[:, 2]), w * np.exp(d[:, 3])
  y1, x1 = cy - 0.5 * h, cx - 0.5 * w
  boxes = np.clip(np.stack([y1, x1, y1 + h, x1 + w], 1), 0, 1).astype(np.float32)
  if canvas is None:
    keep = tf.image.non_max_suppression(boxes, probs[order], post, thr).numpy()
  else:
    keep = _release_nms(boxes * np.float32(canvas), probs[order], thr, post)
  return boxes[keep]


def test_matches_reference():
  size = 64
  anchors = anchor_ops.generate_anchors((size, size), (8, 16, 32, 64, 128), (0.5, 1.0, 2.0)) / size
  a = len(anchors)
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(2, a)).astype(np.float32)
  deltas = rng.normal(scale=0.5, size=(2, a, 4)).astype(np.float32)
  fn = jax.jit(
      lambda p, d: proposals.generate_proposals(
          p, d, anchors, pre_nms_topk=200, nms_threshold=0.7, post_nms_topk=60, bbox_std=STD
      )
  )
  rois, valid = fn(probs, deltas)
  assert rois.shape == (2, 60, 4) and valid.shape == (2, 60)
  for b in range(2):
    want = _reference(probs[b], deltas[b], anchors, 200, 0.7, 60)
    n = int(np.asarray(valid[b]).sum())
    assert n == len(want)
    np.testing.assert_allclose(np.asarray(rois[b])[:n], want, atol=1e-5)
    assert np.all(np.asarray(rois[b])[n:] == 0)
    r = np.asarray(rois[b])[:n]
    assert r.min() >= 0 and r.max() <= 1


def test_few_proposals_are_padded():
  anchors = np.array([[0.1, 0.1, 0.3, 0.3]] * 5, np.float32)
  probs = np.linspace(0.1, 0.5, 5, dtype=np.float32)[None]
  rois, valid = jax.jit(
      lambda p, d: proposals.generate_proposals(
          p, d, anchors, pre_nms_topk=6000, nms_threshold=0.7, post_nms_topk=4, bbox_std=STD
      )
  )(probs, np.zeros((1, 5, 4), np.float32))
  assert list(np.asarray(valid[0])) == [True, False, False, False]
  np.testing.assert_allclose(np.asarray(rois[0, 0]), anchors[0], atol=1e-6)
  assert np.all(np.asarray(rois[0, 1:]) == 0)


def test_release_plus_one_nms():
  """nms_pixel_scale (model.rpn.legacy_nms_plus_one): NMS as the release's,
  on the clipped boxes in canvas pixels with +1 widths; fewer proposals than
  the default's (the +1 suppresses more)."""
  size = 64
  anchors = anchor_ops.generate_anchors((size, size), (8, 16, 32, 64, 128), (0.5, 1.0, 2.0)) / size
  rng = np.random.default_rng(1)
  probs = rng.uniform(size=(2, len(anchors))).astype(np.float32)
  deltas = rng.normal(scale=0.5, size=(2, len(anchors), 4)).astype(np.float32)
  fn = jax.jit(
      lambda p, d, scale: proposals.generate_proposals(
          p,
          d,
          anchors,
          pre_nms_topk=300,
          nms_threshold=0.7,
          post_nms_topk=300,
          bbox_std=STD,
          nms_pixel_scale=scale,
      ),
      static_argnums=2,
  )
  rois, valid = fn(probs, deltas, float(size))
  _, plain_valid = fn(probs, deltas, None)
  for b in range(2):
    want = _reference(probs[b], deltas[b], anchors, 300, 0.7, 300, canvas=size)
    n = int(np.asarray(valid[b]).sum())
    assert n == len(want)
    np.testing.assert_allclose(np.asarray(rois[b])[:n], want, atol=1e-5)
    assert np.all(np.asarray(rois[b])[n:] == 0)
    assert n < int(np.asarray(plain_valid[b]).sum())  # +1 suppresses more


def test_window_clips_proposals():
  """A given normalised window, not the whole canvas, bounds the rois."""
  anchors = np.array([[0.2, 0.1, 0.6, 0.9], [0.0, 0.0, 0.1, 0.1]], np.float32)
  rois, valid = jax.jit(
      lambda p, d: proposals.generate_proposals(
          p,
          d,
          anchors,
          pre_nms_topk=10,
          nms_threshold=0.7,
          post_nms_topk=2,
          bbox_std=STD,
          window=(0.0, 0.25, 0.5, 0.75),
      )
  )(np.array([[0.9, 0.1]], np.float32), np.zeros((1, 2, 4), np.float32))
  assert list(np.asarray(valid[0])) == [True, True]
  np.testing.assert_allclose(
      np.asarray(rois[0]), [[0.2, 0.25, 0.5, 0.75], [0.0, 0.25, 0.1, 0.25]], atol=1e-6
  )
