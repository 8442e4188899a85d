"""Tests for sln_jax/evaluation/results.py and render.py: mask pasting, results,
depth order, pictures."""

import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest
import torch

from input_pipeline import records
from sln_jax import semdist
from sln_jax.evaluation import metrics as metrics_lib
from sln_jax.evaluation import occlusion, render
from sln_jax.evaluation import results as results_lib
from sln_jax.visualization import draw
from tests import semdist_decode
from tests.test_semdist import scenes


def test_integer_box_rounds_half_up_and_clips():
  assert results_lib.integer_box((0.4, 0.6, 3.5, 4.49), 10, 10) == (0, 1, 4, 4)
  assert results_lib.integer_box((-3.0, 2.5, 12.2, 9.5), 10, 8) == (0, 3, 10, 8)


def test_paste_masks_hand_case():
  probs = np.zeros((1, 2, 2), np.float32)
  probs[0, 0, 0] = 1.0
  # 2x2 -> 4x4: per-axis weights of source cell 0 are [1, .75, .25, 0], so the
  # product is >= 0.5 exactly on the top-left 2x2 block of the box.
  got = results_lib.paste_masks(probs, np.array([[1.2, 0.8, 5.0, 4.6]]), 6, 7)
  want = np.zeros((1, 6, 7), bool)
  want[0, 1:3, 1:3] = True
  np.testing.assert_array_equal(got, want)
  # Empty box after rounding -> empty mask; threshold is inclusive.
  assert not results_lib.paste_masks(np.ones((1, 2, 2)), np.array([[2, 2, 2.2, 5]]), 6, 7).any()
  half = results_lib.paste_masks(np.full((1, 2, 2), 0.5), np.array([[0, 0, 6, 7]]), 6, 7)
  assert half.all()


def test_paste_masks_matches_torch_bilinear():
  rng = np.random.default_rng(0)
  m, h, w = 8, 40, 50
  probs = rng.random((6, m, m)).astype(np.float32)
  boxes = np.array(
      [
          [0, 0, 40, 50],
          [3.2, 5.7, 30.1, 22.4],
          [10, 10, 14, 13],
          [-5, -4, 20, 60],
          [35.6, 44.4, 39.9, 49.9],
          [1, 1, 9, 9],
      ]
  )
  got = results_lib.paste_masks(probs, boxes, h, w)
  for i, box in enumerate(boxes):
    y1, x1, y2, x2 = results_lib.integer_box(box, h, w)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(probs[i].astype(np.float64))[None, None],
        size=(y2 - y1, x2 - x1),
        mode='bilinear',
        align_corners=False,
    )[0, 0].numpy()
    np.testing.assert_allclose(
        results_lib.resize_bilinear(probs[i], y2 - y1, x2 - x1), ref, atol=1e-12
    )
    want = np.zeros((h, w), bool)
    want[y1:y2, x1:x2] = ref >= 0.5
    np.testing.assert_array_equal(got[i], want)


@pytest.mark.parametrize('align_corners', [False, True])
def test_resize_bilinear_with_channels_matches_torch(align_corners):
  """(m, n, C) maps, m != n, up and down: each channel as torch resizes it,
  with half-pixel centres or (align_corners) corner-aligned samples."""
  rng = np.random.default_rng(1)
  probs = rng.random((7, 5, 3))
  # One output row: torch's align_corners samples the first row, ours the middle.
  for size in ((31, 17), (3, 2), (7, 5), (2, 40) if align_corners else (1, 40)):
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(probs.transpose(2, 0, 1))[None],
            size=size,
            mode='bilinear',
            align_corners=align_corners,
        )[0]
        .numpy()
        .transpose(1, 2, 0)
    )
    got = results_lib.resize_bilinear(probs, *size, align_corners=align_corners)
    assert got.shape == size + (3,)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    alone = results_lib.resize_bilinear(probs[..., 1], *size, align_corners=align_corners)
    np.testing.assert_allclose(alone, ref[..., 1], atol=1e-12)
    np.testing.assert_array_equal(got[..., 1], alone)  # same numbers, stacked or not
  col = np.arange(7.0)[:, None]
  mid = results_lib.resize_bilinear(col, 1, 1, align_corners=align_corners)[0, 0]
  assert mid == 3.0


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.integers(1, 6), st.integers(0, 2**31), st.booleans())
def test_argmax_last_is_numpys_argmax(channels, seed, coarse):
  """First index of the largest channel, ties (coarse values) included."""
  rng = np.random.default_rng(seed)
  x = rng.random((5, 7, channels))
  if coarse:
    x = np.round(x * 2) / 2
  got = results_lib._argmax_last(x)  # pylint: disable=protected-access
  assert got.dtype == np.int8
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def _target_then_paste(mask, box, size, paste):
  """The training target of ``mask`` for its box (samples on the box's first
  .. last pixel rows/columns, as pipeline.crop_layers), pasted back."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel

  y1, x1, y2, x2 = box
  ys = y1 + np.arange(size) * (y2 - 1 - y1) / (size - 1)
  xs = x1 + np.arange(size) * (x2 - 1 - x1) / (size - 1)
  grid = np.meshgrid(ys, xs, indexing='ij')
  target = ndimage.map_coordinates(mask.astype(np.float64), grid, order=1) >= 0.5
  dets = {
      'boxes': np.array([box], np.float64),
      'scores': np.array([0.9]),
      'classes': np.array([1]),
      'valid': np.array([True]),
      'amodal_probs': target[None].astype(np.float32),
      'visible_probs': target[None].astype(np.float32),
  }
  r = results_lib.detections_to_results(1, dets, (1.0, 1.0), mask.shape, mask_paste=paste)
  return mask_utils.decode(r[0]['segmentation']).astype(bool)


def test_aligned_paste_inverts_the_training_target_geometry():
  """A perfect mask prediction pasted with 'aligned' gives the object back;
  half-pixel 'bilinear' (the release's geometry) shrinks it by about one
  cell around the box centre."""
  h = w = 400
  yy, xx = np.mgrid[:h, :w]
  ious = {'aligned': [], 'bilinear': []}
  for cy, cx, ry, rx in ((200, 200, 150, 120), (100, 300, 40, 70), (300, 90, 18, 25)):
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    ys, xs = np.nonzero(mask)
    box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    for paste in ious:
      got = _target_then_paste(mask, box, 32, paste)
      ious[paste].append((got & mask).sum() / (got | mask).sum())
  assert min(ious['aligned']) >= 0.96, ious  # 32x32 binary target: ~0.97
  assert all(a > b + 0.01 for a, b in zip(ious['aligned'], ious['bilinear'])), ious


def test_pairwise_order_crops_matches_semdist():
  rng = np.random.default_rng(1)
  h, w, n = 20, 24, 5
  full = np.full((n, h, w), -1, np.int32)
  boxes = []
  for i in range(n):
    y1, x1 = rng.integers(0, h - 6), rng.integers(0, w - 6)
    y2, x2 = rng.integers(y1 + 3, h + 1), rng.integers(x1 + 3, w + 1)
    crop = rng.integers(-1, 3, (y2 - y1, x2 - x1))
    full[i, y1:y2, x1:x2] = crop
    boxes.append((y1, x1, y2, x2))
  crops = [full[i, b[0] : b[2], b[1] : b[3]] for i, b in enumerate(boxes)]
  got = results_lib.pairwise_order_crops(crops, boxes)
  np.testing.assert_array_equal(got, np.asarray(semdist_decode.pairwise_order(full)))
  assert np.abs(got).sum() > 0


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.integers(1, 16), st.integers(1, 16), st.data())
def test_rle_of_crop_is_pycocotools_encoding_of_the_full_mask(h, w, data):
  """The same counts string as pycocotools' encode of the pasted mask, for
  boxes touching any edge, empty, full and single-pixel crops."""
  y1, y2 = sorted(data.draw(st.lists(st.integers(0, h), min_size=2, max_size=2)))
  x1, x2 = sorted(data.draw(st.lists(st.integers(0, w), min_size=2, max_size=2)))
  seed = data.draw(st.integers(0, 2**31))
  density = data.draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
  crop = np.random.default_rng(seed).random((y2 - y1, x2 - x1)) < density
  full = np.zeros((h, w), np.uint8, order='F')
  full[y1:y2, x1:x2] = crop
  want = mask_utils.encode(full)
  got = results_lib.rle_of_crop(crop, (y1, x1, y2, x2), h, w)
  assert got == {'size': [h, w], 'counts': want['counts'].decode('ascii')}


def test_pairwise_votes_crops_counts_only_pixels_both_cover():
  """Three crops: 0 and 1 overlap on a 2x2 block (0 in front on 3 pixels,
  behind on 1), 2 touches 1 only along an edge (no shared pixel)."""
  layers = [np.zeros((4, 4), int), np.ones((4, 4), int), np.zeros((2, 2), int)]
  layers[1][0, 0] = -1  # absent there: not a vote
  layers[0][3, 3] = 2  # behind 1's layer 1 here
  votes = results_lib.pairwise_votes_crops(layers, [(0, 0, 4, 4), (2, 2, 6, 6), (6, 0, 8, 2)])
  # Overlap rows/cols 2..3 of 0 = rows/cols 0..1 of 1: (0,0) of 1 absent.
  assert votes[0, 1] == 2 - 1 and votes[1, 0] == -1
  assert votes[0, 2] == votes[2, 0] == votes[1, 2] == votes[2, 1] == 0


def _votes_on_the_full_image(layers, boxes):
  """Reference for pairwise_votes_crops: every map pasted into one image
  (-1 elsewhere), sign(layer_j - layer_i) summed where both are present."""
  n = len(layers)
  h = max([b[2] for b in boxes], default=0)
  w = max([b[3] for b in boxes], default=0)
  full = np.full((n, h, w), -1, np.int64)
  for i, (y1, x1, y2, x2) in enumerate(boxes):
    full[i, y1:y2, x1:x2] = np.maximum(layers[i], -1)
  votes = np.zeros((n, n), np.int64)
  for i in range(n):
    for j in range(n):
      both = (full[i] >= 0) & (full[j] >= 0)
      votes[i, j] = np.sign(full[j] - full[i])[both].sum()
  return votes


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.integers(0, 6), st.sampled_from([3, 130, 400]), st.data())
def test_pairwise_votes_crops_equal_the_full_image_count(n, deepest, data):
  """Any boxes (empty, touching, nested) and layer values, including maps
  too deep for one byte and absent pixels coded below -1."""
  boxes, layers = [], []
  for _ in range(n):
    y1, y2 = sorted(data.draw(st.lists(st.integers(0, 12), min_size=2, max_size=2)))
    x1, x2 = sorted(data.draw(st.lists(st.integers(0, 12), min_size=2, max_size=2)))
    seed = data.draw(st.integers(0, 2**31))
    layer = np.random.default_rng(seed).integers(-1, deepest + 1, (y2 - y1, x2 - x1))
    if data.draw(st.booleans()):
      layer = np.where(layer < 0, -300, layer)
    boxes.append((y1, x1, y2, x2))
    layers.append(layer)
  got = results_lib.pairwise_votes_crops(layers, boxes)
  assert got.shape == (n, n) and got.dtype == np.int64
  np.testing.assert_array_equal(got, _votes_on_the_full_image(layers, boxes))


def test_depth_layers_longest_chain():
  # a in front of b, b in front of c; a and c do not overlap.
  order = np.array([[0, 1, 0], [-1, 0, 1], [0, -1, 0]], np.int8)
  np.testing.assert_array_equal(results_lib.depth_layers(order), [0, 1, 2])
  assert results_lib.depth_layers(np.zeros((0, 0), np.int8)).shape == (0,)


def test_depth_layers_strength_only_orders_relations():
  """A zero strength still keeps a relation of ``order`` (1 + |strength|)."""
  order = np.array([[0, 1, 0], [-1, 0, 1], [0, -1, 0]], np.int8)
  np.testing.assert_array_equal(
      results_lib.depth_layers(order, strength=np.zeros((3, 3))), [0, 1, 2]
  )


def test_depth_layers_break_a_cycle_at_its_weakest_margin():
  """0 before 1 (300 px), 1 before 2 (200), 2 before 0 (5): the 5-px relation
  goes (the longest-chain rule alone pushed all three to the last layer);
  3 is behind 0, 4 unrelated. Without margins, relations with higher-scored
  (earlier) detections come first: 0-1, 0-3, 1-2, so 2-0 goes again."""
  votes = np.zeros((5, 5), np.int64)
  for a, b, v in ((0, 1, 300), (1, 2, 200), (2, 0, 5), (0, 3, 40)):
    votes[a, b], votes[b, a] = v, -v
  np.testing.assert_array_equal(
      results_lib.depth_layers(np.sign(votes), strength=votes), [0, 1, 2, 1, 0]
  )
  votes[0, 1], votes[1, 0] = 3, -3  # now 0-1 is the weakest link
  np.testing.assert_array_equal(
      results_lib.depth_layers(np.sign(votes), strength=votes), [2, 0, 1, 3, 0]
  )
  np.testing.assert_array_equal(results_lib.depth_layers(np.sign(votes)), [0, 1, 2, 1, 0])


def _scene():
  """Two objects in a 24x32 image: `front` fully visible, `back` occluded.

  Returns GT and SLN.infer-style outputs for one image on a canvas at scale 2
  with 4x4 probability maps (boxes of 8 original pixels: exact 2x upsampling).
  """
  h, w = 24, 32
  front = np.zeros((h, w), bool)
  front[4:12, 4:12] = True
  back = np.zeros((h, w), bool)
  back[8:16, 8:16] = True
  back_visible = back & ~front
  gt = records.ImageAnnotation(
      7,
      '7.jpg',
      h,
      w,
      [
          records.InstanceAnnotation(
              records.encode_mask(front),
              records.encode_mask(front),
              records.encode_mask(np.zeros_like(front)),
              0,
              0.0,
          ),
          records.InstanceAnnotation(
              records.encode_mask(back),
              records.encode_mask(back_visible),
              records.encode_mask(back & front),
              1,
              16 / 64,
          ),
      ],
  )
  vis_back = np.ones((4, 4))
  vis_back[:2, :2] = 0.0  # the top-left quarter of `back` is hidden
  layer_back = np.zeros((4, 4, 2))
  layer_back[..., 0] = vis_back
  layer_back[..., 1] = 1 - vis_back
  dets = {
      'boxes': np.array([[16, 16, 32, 32], [8, 8, 24, 24], [0, 0, 40, 40]], np.float32),
      'scores': np.array([0.7, 0.9, 0.95], np.float32),
      'classes': np.array([1, 1, 1]),
      'valid': np.array([True, True, False]),
      'amodal_probs': np.ones((3, 4, 4), np.float32),
      'visible_probs': np.stack([vis_back, np.ones((4, 4)), np.ones((4, 4))]),
      'layer_probs': np.stack(
          [layer_back, np.stack([np.ones((4, 4)), np.zeros((4, 4))], -1), np.zeros((4, 4, 2))]
      ),
  }
  return gt, dets


def test_detections_to_results_round_trip_scores_perfectly():
  gt, dets = _scene()
  results = results_lib.detections_to_results(7, dets, (2.0, 2.0), (24, 32), category_map={1: 5})
  assert len(results) == 2  # the invalid one is dropped
  assert [r['score'] for r in results] == pytest.approx([0.9, 0.7])
  front, back = results
  assert front['bbox'] == [4.0, 4.0, 8.0, 8.0] and back['bbox'] == [8.0, 8.0, 8.0, 8.0]
  assert front['category_id'] == 5
  assert (front['depth_layer'], back['depth_layer']) == (0, 1)
  assert isinstance(front['segmentation']['counts'], str)
  results = json.loads(json.dumps(results))
  m = metrics_lib.evaluate([gt], results)
  assert m['amodal']['all']['both']['AP'] == pytest.approx(1.0)
  assert m['visible']['all']['both']['AP'] == pytest.approx(1.0)
  assert occlusion.depth_order_accuracy([gt], results)['accuracy'] == 1.0
  # Score threshold.
  kept = results_lib.detections_to_results(7, dets, (2.0, 2.0), (24, 32), score_threshold=0.8)
  assert len(kept) == 1 and kept[0]['depth_layer'] == 0


def _dets(boxes, amodal, visible=None, scores=None, layer_probs=None):
  """SLN.infer-style outputs for ``len(boxes)`` valid detections of class 1."""
  n = len(boxes)
  dets = {
      'boxes': np.array(boxes, np.float64),
      'scores': np.array(scores if scores is not None else [0.9] * n),
      'classes': np.ones(n, int),
      'valid': np.ones(n, bool),
      'amodal_probs': np.asarray(amodal, np.float64),
      'visible_probs': np.asarray(amodal if visible is None else visible, np.float64),
  }
  if layer_probs is not None:
    dets['layer_probs'] = np.asarray(layer_probs, np.float64)
  return dets


@pytest.mark.parametrize('paste', ['aligned', 'bilinear'])
def test_detections_to_results_thresholds_are_inclusive(paste):
  """score >= score_threshold is kept; probability >= mask_threshold is on
  (a constant 0.5 map resizes to exactly 0.5)."""
  dets = _dets([[2, 3, 6, 9]], np.full((1, 4, 4), 0.5), scores=[0.75])
  r = results_lib.detections_to_results(
      1, dets, (1.0, 1.0), (8, 10), score_threshold=0.75, mask_paste=paste
  )
  assert len(r) == 1
  want = np.zeros((8, 10), np.uint8)
  want[2:6, 3:9] = 1
  np.testing.assert_array_equal(mask_utils.decode(r[0]['segmentation']), want)
  np.testing.assert_array_equal(mask_utils.decode(r[0]['visible_mask']), want)


def test_detections_to_results_visible_mask_within_amodal():
  amodal = np.ones((1, 4, 4))
  amodal[0, :, 2:] = 0.0  # right half off (box = map: no resampling)
  dets = _dets([[0, 0, 4, 4]], amodal, visible=np.ones((1, 4, 4)))
  r = results_lib.detections_to_results(1, dets, (1.0, 1.0), (4, 6))[0]
  want = np.zeros((4, 6), np.uint8)
  want[:, :2] = 1
  np.testing.assert_array_equal(mask_utils.decode(r['segmentation']), want)
  np.testing.assert_array_equal(mask_utils.decode(r['visible_mask']), want)


def test_detections_to_results_anisotropic_scale_clip_and_empty_box():
  """Canvas boxes / (sy, sx, sy, sx); bbox [x, y, w, h] of the box clipped to
  the image; a box empty after rounding is dropped."""
  # y: 8..40 / 2 -> 4..20; x: 16..160 / 4 -> 4..40, clipped to 32.
  # The second box: y 10..10.6 / 2 -> 5..5.3, rounds to empty.
  dets = _dets([[8, 16, 40, 160], [10, 4, 10.6, 60]], np.ones((2, 4, 4)), scores=[0.9, 0.95])
  r = results_lib.detections_to_results(3, dets, (2.0, 4.0), (24, 32))
  assert len(r) == 1 and r[0]['image_id'] == 3 and r[0]['score'] == 0.9
  assert r[0]['bbox'] == [4.0, 4.0, 28.0, 16.0]
  want = np.zeros((24, 32), np.uint8)
  want[4:20, 4:32] = 1
  np.testing.assert_array_equal(mask_utils.decode(r[0]['segmentation']), want)


def test_detections_to_results_breaks_a_cycle_at_its_weakest_pixel_margin():
  """Three masks in one 8x8 box (identity resize), layer 0 where visible,
  1 where occluded: 0 over 1 on 8 pixels, 1 over 2 on 32, 2 over 0 on 24.
  The 8-pixel relation goes: 1 in front, then 2, then 0 (without margins
  the higher-scored pair 0-1 would be kept and 0 put in front)."""
  a = np.zeros((8, 8), bool)
  a[:, :4] = True  # 32 px
  b = np.zeros((8, 8), bool)
  b[:6, 4:] = True  # 24 px
  c = ~(a | b)  # 8 px
  amodal = np.stack([b | c, a | c, a | b])
  visible = np.stack([c, a, b])
  dets = _dets([[0, 0, 8, 8]] * 3, amodal, visible, scores=[0.9, 0.8, 0.7])
  r = results_lib.detections_to_results(1, dets, (1.0, 1.0), (8, 8))
  assert [x['score'] for x in r] == [0.9, 0.8, 0.7]
  assert [x['depth_layer'] for x in r] == [2, 0, 1]


def test_detections_to_results_pastes_layer_channels_like_masks():
  """Deeper layers (L = 4) are resized with the masks' geometry. Both
  detections are fully occluded over a 2x4 box; B's layer is 1 + argmax of
  channels 1..3 = (1 - t, 0, 0.4 t) at column t, C's is 2 everywhere.
  'aligned' samples t = 0, 1/3, 2/3, 1: B is on layer 1 in three columns
  (in front of C) and 3 in one. Half-pixel centres would give t = 0, 1/4,
  3/4, 1: two columns each way, no order."""
  t = np.array([0.0, 1.0])
  layer_b = np.zeros((2, 2, 4))
  layer_b[..., 1], layer_b[..., 3] = 1 - t, 0.4 * t
  layer_c = np.zeros((2, 2, 4))
  layer_c[..., 2] = 1.0
  dets = _dets(
      [[0, 0, 2, 4]] * 2,
      np.ones((2, 2, 2)),
      np.zeros((2, 2, 2)),
      scores=[0.9, 0.8],
      layer_probs=[layer_b, layer_c],
  )
  r = results_lib.detections_to_results(1, dets, (1.0, 1.0), (2, 4), mask_paste='aligned')
  assert [x['depth_layer'] for x in r] == [0, 1]
  r = results_lib.detections_to_results(1, dets, (1.0, 1.0), (2, 4), mask_paste='bilinear')
  assert [x['depth_layer'] for x in r] == [0, 0]


def test_draw_prediction_writes_png(tmp_path):
  gt, dets = _scene()
  results = results_lib.detections_to_results(7, dets, (2.0, 2.0), (24, 32))
  image = np.full((24, 32, 3), 128, np.uint8)
  path = tmp_path / 'pics' / 'p.png'
  render.draw_prediction(image, results, str(path))
  with Image.open(path) as pic:
    assert pic.format == 'PNG' and pic.size[0] == 32 * 24  # enlarged to >= 768 wide
    pixels = np.asarray(pic.convert('RGB'))
  # Deterministic: drawing again gives the same picture.
  np.testing.assert_array_equal(render.render_prediction(image, results), pixels)
  bar = draw.caption_height(32 * 24, 24 * 24)
  assert (pixels[bar + 14 * 24 + 12, 14 * 24 + 12] != 128).any()  # a mask is painted
  assert (pixels[bar + 12, 31 * 24 + 12] == 128).all()  # background untouched


# --------------------------------------------------------------- release paste
def _bytescale(p):
  """scipy 1.2 bytescale, by hand: min-max to 0..255, + 0.5, truncated."""
  p = np.asarray(p, np.float64)
  span = p.max() - p.min() or 1.0
  return np.floor(np.clip((p - p.min()) * 255.0 / span, 0, 255) + 0.5)


def test_release_paste_thresholds_between_the_masks_own_min_and_max():
  rng = np.random.default_rng(0)
  weak = 0.3 * rng.random((16, 16))  # every probability < 0.5
  box = (0, 0, 16, 16)  # same size: no resampling
  got = results_lib.release_paste(weak, box)
  np.testing.assert_array_equal(got, _bytescale(weak) >= 128)
  assert got.any() and not (results_lib.resize_bilinear(weak, 16, 16) >= 0.5).any()
  # A constant map byte-scales to 0 everywhere: no pixel, even at 0.9.
  assert not results_lib.release_paste(np.full((16, 16), 0.9), (2, 3, 40, 30)).any()
  assert results_lib.release_paste(weak, (5, 5, 5, 9)).shape == (0, 4)


def test_release_paste_keeps_the_half_byte():
  """Kept: bytes >= 0.5 * 255, i.e. 128 on, 127 off (same size: no resampling)."""
  prob = np.array([[0.0, 128 / 255], [1.0, 127 / 255]])
  np.testing.assert_array_equal(_bytescale(prob), [[0, 128], [255, 127]])
  np.testing.assert_array_equal(
      results_lib.release_paste(prob, (0, 0, 2, 2)), [[False, True], [True, False]]
  )


def test_release_paste_upsampling_is_bilinear_up_to_byte_quantisation():
  rng = np.random.default_rng(1)
  prob = rng.random((16, 16))
  prob[0, 0], prob[1, 1] = 0.0, 1.0  # min 0, max 1: no rescale
  box = (10, 20, 10 + 37, 20 + 50)
  got = results_lib.release_paste(prob, box)
  ref = results_lib.resize_bilinear(prob, 37, 50)
  clear = np.abs(ref - 0.5) > 3 / 255  # away from the threshold
  np.testing.assert_array_equal(got[clear], (ref >= 0.5)[clear])
  assert clear.mean() > 0.9


def test_release_box_truncates_after_scaling_back():
  # 480x640 squashed to 1024x1024: canvas pixels x 480/1024 and x 640/1024.
  scale = (1024 / 480, 1024 / 640)
  assert results_lib.release_box((100, 200, 301, 555), scale, 480, 640) == (46, 125, 141, 346)
  assert results_lib.integer_box(
      np.array([100, 200, 301, 555]) / np.array(scale * 2), 480, 640
  ) == (47, 125, 141, 347)


def test_detections_to_results_release_paste():
  dets = {
      'boxes': np.array([[100.0, 200.0, 301.0, 555.0]]),
      'scores': np.array([0.9]),
      'classes': np.array([1]),
      'valid': np.array([True]),
      'amodal_probs': np.full((1, 8, 8), 0.2),
      'visible_probs': np.full((1, 8, 8), 0.2),
  }
  dets['amodal_probs'][0, 2:6, 2:6] = 0.4  # weak, but its own maximum
  dets['visible_probs'] = dets['amodal_probs'].copy()
  scale = (1024 / 480, 1024 / 640)
  plain = results_lib.detections_to_results(1, dets, scale, (480, 640))
  release = results_lib.detections_to_results(1, dets, scale, (480, 640), mask_paste='release')
  assert mask_utils.area(plain[0]['segmentation']) == 0
  area = mask_utils.area(release[0]['segmentation'])
  assert 0 < area < (141 - 46) * (346 - 125)
  m = mask_utils.decode(release[0]['segmentation'])
  ys, xs = np.nonzero(m)
  assert ys.min() >= 46 and ys.max() < 141 and xs.min() >= 125 and xs.max() < 346
  with pytest.raises(ValueError, match='mask_paste'):
    results_lib.detections_to_results(1, dets, scale, (480, 640), mask_paste='nearest')


# ------------------------------------------------------------ property


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(scenes(max_n=5, size=12))
def test_property_exact_layers_give_the_true_depth_order(scene):
  """Layer maps encoded from a scene (semdist), cut to each object's box as
  detections_to_results sees them: every overlapping pair is ordered as its
  depth ranks say, and the depth layers respect every such pair."""
  amodal, _, occluded, rank = scene
  layer = semdist.layer_index_map(amodal, occluded, rank).astype(np.int32) - 1  # -1 absent
  boxes, crops = [], []
  for i in range(len(rank)):
    ys, xs = np.nonzero(amodal[i])
    b = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    boxes.append(b)
    crops.append(layer[i, b[0] : b[2], b[1] : b[3]])
  order = results_lib.pairwise_order_crops(crops, boxes)
  depth = results_lib.depth_layers(order)
  for i in range(len(rank)):
    for j in range(len(rank)):
      if i != j and (amodal[i] & amodal[j]).any():
        assert order[i, j] == (1 if rank[i] < rank[j] else -1), (i, j)
        if rank[i] < rank[j]:
          assert depth[i] < depth[j], (i, j, depth)
      elif i != j:
        assert order[i, j] == 0
  assert depth.min(initial=0) == 0
