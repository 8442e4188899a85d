"""Detection refinement against a numpy transcription of refine_detections."""

import jax
import numpy as np
import tensorflow as tf

from sln_jax.ops import postprocess

STD = np.array([0.1, 0.1, 0.2, 0.2], np.float32)
WINDOW = np.array([0.0, 0.0, 0.75, 1.0], np.float32)


def _inputs(rng, r=40, c=3):
  yx = rng.uniform(0, 0.6, (r, 2))
  rois = np.concatenate([yx, yx + rng.uniform(0.05, 0.3, (r, 2))], 1)
  logits = rng.normal(size=(r, c))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  deltas = rng.normal(scale=0.5, size=(r, c, 4))
  return (rois.astype(np.float32), probs.astype(np.float32), deltas.astype(np.float32))


def _reference(rois, probs, deltas, roi_valid, d_max, min_conf, nms_thr):
  cls = probs.argmax(1)
  score = probs[np.arange(len(cls)), cls]
  d = deltas[np.arange(len(cls)), cls] * STD
  h, w = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
  cy = rois[:, 0] + 0.5 * h + d[:, 0] * h
  cx = rois[:, 1] + 0.5 * w + d[:, 1] * w
  h, w = h * np.exp(d[:, 2]), w * np.exp(d[:, 3])
  y1, x1 = cy - 0.5 * h, cx - 0.5 * w
  boxes = np.stack([y1, x1, y1 + h, x1 + w], 1)
  boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], WINDOW[0], WINDOW[2])
  boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], WINDOW[1], WINDOW[3])
  keep = np.flatnonzero((cls > 0) & roi_valid & (score >= min_conf))
  if nms_thr >= 0:
    kept = []
    for c in np.unique(cls[keep]):
      ix = keep[cls[keep] == c]
      sel = tf.image.non_max_suppression(
          boxes[ix].astype(np.float32), score[ix], len(ix), nms_thr
      ).numpy()
      kept.extend(ix[sel])
    keep = np.asarray(kept, np.int64)
  keep = keep[np.lexsort((keep, -score[keep]))][:d_max]
  return boxes[keep], score[keep], cls[keep], keep


def _check(out, ref):
  boxes, scores, classes, keep = ref
  n = len(keep)
  valid = np.asarray(out['valid'])
  assert valid.sum() == n and np.all(valid[:n])
  np.testing.assert_array_equal(np.asarray(out['roi_index'])[:n], keep)
  np.testing.assert_array_equal(np.asarray(out['classes'])[:n], classes)
  np.testing.assert_allclose(np.asarray(out['scores'])[:n], scores, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out['boxes'])[:n], boxes, atol=1e-5)
  assert np.all(np.asarray(out['boxes'])[n:] == 0)
  assert np.all(np.asarray(out['classes'])[n:] == 0)


def test_no_nms_matches_reference():
  rng = np.random.default_rng(0)
  rois, probs, deltas = _inputs(rng)
  roi_valid = np.ones(40, bool)
  roi_valid[-6:] = False
  for d_max, conf in ((10, 0.0), (50, 0.0), (50, 0.6)):
    fn = jax.jit(
        lambda a, b, c, v: postprocess.detect(
            a, b, c, WINDOW, bbox_std=STD, max_detections=d_max, min_confidence=conf, roi_valid=v
        )
    )
    out = fn(rois, probs, deltas, roi_valid)
    assert out['boxes'].shape == (d_max, 4)
    _check(out, _reference(rois, probs, deltas, roi_valid, d_max, conf, -1))


def test_per_class_nms_matches_reference():
  rng = np.random.default_rng(1)
  rois, probs, deltas = _inputs(rng, 60, 4)
  deltas *= 0.1
  valid = np.ones(60, bool)
  fn = jax.jit(
      lambda a, b, c: postprocess.detect(
          a, b, c, WINDOW, bbox_std=STD, max_detections=20, nms_threshold=0.3
      )
  )
  _check(fn(rois, probs, deltas), _reference(rois, probs, deltas, valid, 20, 0.0, 0.3))


def test_batched():
  rng = np.random.default_rng(2)
  a, b = _inputs(rng), _inputs(rng)
  stack = [np.stack([x, y]) for x, y in zip(a, b)]
  out = jax.jit(
      lambda r, p, d, w: postprocess.batched_detect(r, p, d, w, bbox_std=STD, max_detections=8)
  )(*stack, np.stack([WINDOW] * 2))
  assert out['scores'].shape == (2, 8)
  ones = np.ones(40, bool)
  for i, inp in enumerate((a, b)):
    _check({k: v[i] for k, v in out.items()}, _reference(*inp, ones, 8, 0.0, -1))


def test_min_confidence_is_inclusive():
  """Matterport keeps class_scores >= DETECTION_MIN_CONFIDENCE: scores equal
  to the bar stay (exact binary fractions), lower ones and background go."""
  rng = np.random.default_rng(3)
  rois, _, deltas = _inputs(rng, 4, 3)
  probs = np.array(
      [[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.3125, 0.4375, 0.25], [0.125, 0.375, 0.5]],
      np.float32,
  )
  out = jax.jit(
      lambda a, b, c: postprocess.detect(
          a, b, c, WINDOW, bbox_std=STD, max_detections=4, min_confidence=0.5
      )
  )(rois, probs, deltas)
  assert list(np.asarray(out['roi_index'])[:2]) == [0, 3]
  _check(out, _reference(rois, probs, deltas, np.ones(4, bool), 4, 0.5, -1))


def test_zero_nms_threshold_runs_nms():
  """nms_threshold 0 is a threshold (suppress any overlap), not "no NMS"."""
  rng = np.random.default_rng(4)
  rois, probs, deltas = _inputs(rng, 40, 3)
  out = jax.jit(
      lambda a, b, c: postprocess.detect(
          a, b, c, WINDOW, bbox_std=STD, max_detections=40, nms_threshold=0.0
      )
  )(rois, probs, deltas)
  ref = _reference(rois, probs, deltas, np.ones(40, bool), 40, 0.0, 0.0)
  assert len(ref[3]) < len(_reference(rois, probs, deltas, np.ones(40, bool), 40, 0.0, -1)[3])
  _check(out, ref)


def test_unused_slots_are_zero():
  """Slots past the detections: every output zero / False, both paths."""
  rng = np.random.default_rng(5)
  rois, probs, deltas = _inputs(rng, 30, 3)
  roi_valid = np.arange(30) % 3 == 0
  for nms in (-1.0, 0.3):
    out = jax.jit(
        lambda a, b, c, v: postprocess.detect(
            a, b, c, WINDOW, bbox_std=STD, max_detections=40, nms_threshold=nms, roi_valid=v
        )
    )(rois, probs, deltas, roi_valid)
    out = {k: np.asarray(v) for k, v in out.items()}
    n = int(out['valid'].sum())
    assert 0 < n <= 10 and np.all(out['valid'][:n])
    for key in ('valid', 'scores', 'classes', 'roi_index', 'boxes'):
      assert np.all(out[key][n:] == 0), key
