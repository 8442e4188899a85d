"""sln_jax/visualization: the pictures' size, fills, hatching, outlines,
draw order, matched colours, false positives and misses."""

import numpy as np
import pytest

from input_pipeline import records
from sln_jax.visualization import draw, pictures

SIZE = 64
FACTOR = 12  # 64 -> 768
GREY = 100


def rect(y1, x1, y2, x2, h=SIZE, w=SIZE):
  m = np.zeros((h, w), bool)
  m[y1:y2, x1:x2] = True
  return m


# Object 0 in front; object 1 behind it, its top-left corner hidden by 0.
A = rect(20, 10, 40, 30)
B = rect(25, 25, 50, 55)


def _instance(amodal, visible, rank):
  return records.InstanceAnnotation(
      amodal_rle=records.encode_mask(amodal),
      visible_rle=records.encode_mask(visible),
      occluded_rle=records.encode_mask(amodal & ~visible),
      depth_rank=rank,
      occlude_rate=float((amodal & ~visible).sum() / amodal.sum()),
      is_stuff=False,
      category_id=1,
  )


def _scene():
  ann = records.ImageAnnotation(
      7, '7.png', SIZE, SIZE, [_instance(A, A, 0), _instance(B, B & ~A, 1)]
  )
  return ann, np.full((SIZE, SIZE, 3), GREY, np.uint8)


def _result(amodal, visible, score, layer):
  return {
      'image_id': 7,
      'score': score,
      'segmentation': records.encode_mask(amodal),
      'visible_mask': records.encode_mask(visible),
      'depth_layer': layer,
  }


def _mix(base, rgb, alpha):
  return (1 - alpha) * np.asarray(base, float) + alpha * np.asarray(rgb, float)


def _at(picture, y, x):
  """Pixel (y, x) of the (first) panel, under its caption."""
  bar = draw.caption_height(SIZE * FACTOR, SIZE * FACTOR)
  return picture[bar + y, x].astype(int)


def test_small_images_are_enlarged_and_large_ones_kept():
  assert draw.scale_factor(SIZE, SIZE) == FACTOR
  assert draw.scale_factor(128, 96) == 6
  assert draw.scale_factor(375, 1242) == 1
  ann, image = _scene()
  picture = pictures.ground_truth_picture(image, ann)
  bar = draw.caption_height(768, 768)
  assert picture.shape[1] == 768 and picture.shape[0] > bar + 768  # the legend underneath
  big = np.full((800, 900, 3), GREY, np.uint8)
  assert pictures.prediction_picture(big, []).shape[1] == 900


def test_labels_use_dejavu_sans():
  assert draw.font(14).path.endswith('DejaVuSans.ttf')


def test_visible_fill_hidden_hatch_outline_and_back_to_front_order():
  ann, image = _scene()
  picture = pictures.ground_truth_picture(image, ann)
  front, back = draw.colour(0), draw.colour(1)
  # Visible part of the front object: its colour at VISIBLE_ALPHA.
  want = _mix([GREY] * 3, front, draw.VISIBLE_ALPHA)
  np.testing.assert_array_equal(_at(picture, 30 * FACTOR + 5, 15 * FACTOR + 5), np.round(want))
  # Visible part of the back object.
  want = _mix([GREY] * 3, back, draw.VISIBLE_ALPHA)
  np.testing.assert_array_equal(_at(picture, 45 * FACTOR + 5, 45 * FACTOR + 5), np.round(want))
  # Hidden part of the back object (under the front one): a wash of its
  # lighter tone, hatched, then the front object's visible fill over it.
  light = draw.lighter(back)
  hatch = draw.hatch_pattern(SIZE * FACTOR, SIZE * FACTOR, 2 * FACTOR)
  seen = set()
  for y, x in [(32 * FACTOR + d, 27 * FACTOR + d) for d in range(0, 12, 3)] + [
      (30 * FACTOR + 2, 28 * FACTOR + 9)
  ]:
    value = _mix([GREY] * 3, light, draw.HIDDEN_TINT_ALPHA)
    if hatch[y, x]:
      value = _mix(value, light, draw.HIDDEN_HATCH_ALPHA)
    value = _mix(value, front, draw.VISIBLE_ALPHA)
    np.testing.assert_array_equal(_at(picture, y, x), np.round(value))
    seen.add(bool(hatch[y, x]))
  assert seen == {True, False}  # both stripes of the hatching checked
  # The amodal outline in the object's full colour, the background untouched.
  np.testing.assert_array_equal(_at(picture, 20 * FACTOR, 28 * FACTOR), front)
  np.testing.assert_array_equal(_at(picture, 5 * FACTOR, 60 * FACTOR), [GREY] * 3)


def test_comparison_matches_colours_and_marks_false_positives_and_misses():
  ann, _ = _scene()
  results = [
      _result(B, B & ~A, 0.9, 1),  # object 1, matched
      _result(rect(2, 2, 10, 10), rect(2, 2, 10, 10), 0.8, 0),  # nothing there
      _result(A, A, 0.3, 0),  # object 0, but below the threshold
  ]
  truth, preds, counts = pictures.comparison_shapes(ann, results, score_threshold=0.5)
  assert counts == {'matched': 1, 'false_positives': 1, 'missed': 1}
  assert [t.dashed for t in truth] == [True, False]
  assert truth[0].text == 'missed 0' and truth[1].text == '1'
  assert len(preds) == 2  # the 0.3 detection is not drawn
  assert preds[0].rgb == truth[1].rgb and not preds[0].dashed
  assert preds[0].text == '1 \u00b7 0.90'
  assert preds[1].dashed and preds[1].text.startswith('FP ')
  assert preds[1].rgb not in {t.rgb for t in truth}
  # At threshold 0.2 the third detection matches object 0 and takes its colour.
  truth, preds, counts = pictures.comparison_shapes(ann, results, score_threshold=0.2)
  assert counts == {'matched': 2, 'false_positives': 1, 'missed': 0}
  assert preds[2].rgb == truth[0].rgb


def test_perfect_prediction_panel_equals_the_ground_truth_panel():
  ann, image = _scene()
  results = [_result(A, A, 0.9, 0), _result(B, B & ~A, 0.8, 1)]
  picture = pictures.comparison_picture(image, ann, results)
  width = SIZE * FACTOR
  assert picture.shape[1] == 2 * width + draw.GAP_PX
  bar = draw.caption_height(width, width)
  left = picture[bar : bar + width, :width]
  right = picture[bar : bar + width, width + draw.GAP_PX :]
  # The same masks in the same colours; only the label tags differ (they sit
  # above each box's top-left corner, at most down to row 25 * 12 here).
  below_tags = slice(25 * FACTOR + 1, None)
  np.testing.assert_array_equal(left[below_tags], right[below_tags])
  assert (picture[: bar + width, width : width + draw.GAP_PX] == 255).all()


@pytest.mark.parametrize('threshold, drawn', [(0.5, False), (0.1, True)])
def test_prediction_picture_score_threshold(threshold, drawn):
  _, image = _scene()
  picture = pictures.prediction_picture(image, [_result(A, A, 0.3, 0)], threshold)
  inside = _at(picture, 30 * FACTOR + 5, 15 * FACTOR + 5)
  assert (inside != GREY).any() == drawn
