"""Tests for sln_jax/evaluation/metrics.py, results_check.py and scripts/evaluate.py.

Hand-computed cases pin the protocol (ignored GT, skipped images, subset
boundaries); random cases are compared with pycocotools' COCOeval run
directly on the same data.
"""

import contextlib
import copy
import importlib.util
import io
import json
import os
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from input_pipeline import readers, records
from sln_jax.cli import run_cli
from sln_jax.errors import UserError
from sln_jax.evaluation import metrics as metrics_lib
from sln_jax.evaluation import occlusion, results_check

H, W = 24, 32
ONE = pytest.approx(1.0)  # COCOeval's precision is tp / (tp + fp + eps)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rect(y1, x1, y2, x2, h=H, w=W):
  m = np.zeros((h, w), bool)
  m[y1:y2, x1:x2] = True
  return m


def inst(amodal, visible=None, rate=0.0, stuff=False, rank=0, cat=1):
  visible = amodal if visible is None else visible
  return records.InstanceAnnotation(
      amodal_rle=records.encode_mask(amodal),
      visible_rle=records.encode_mask(visible),
      occluded_rle=records.encode_mask(amodal & ~visible),
      depth_rank=rank,
      occlude_rate=rate,
      is_stuff=stuff,
      category_id=cat,
  )


def image(image_id, instances, h=H, w=W):
  return records.ImageAnnotation(image_id, f'{image_id}.jpg', h, w, instances)


def det(image_id, mask, score, **extra):
  return dict(image_id=image_id, score=score, segmentation=records.encode_mask(mask), **extra)


def cell(metrics, subset='all', part='both', branch='amodal'):
  return metrics[branch][subset][part]


A, B = rect(2, 3, 10, 12), rect(12, 14, 22, 30)


# --------------------------------------------------------------- hand cases
def test_perfect_detection_scores_one_and_schema():
  m = metrics_lib.evaluate([image(1, [inst(A)])], [det(1, A, 0.9)])
  assert set(m) == {'amodal'}
  assert set(m['amodal']) == {'all', 'none', 'partial', 'heavy'}
  for subset in m['amodal'].values():
    assert set(subset) == {'both', 'things', 'stuff'}
    for row in subset.values():
      assert list(row) == ['AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100']
  assert all(v == ONE for v in cell(m).values())
  # No stuff GT and no heavily occluded GT: undefined -> -1.
  assert all(v == -1 for v in cell(m, 'all', 'stuff').values())
  assert all(v == -1 for v in cell(m, 'heavy').values())


def test_miss_halves_recall():
  gt = [image(1, [inst(A), inst(B)])]
  m = cell(metrics_lib.evaluate(gt, [det(1, A, 0.9)]))
  # Recall 0.5 reached at precision 1: 51 of the 101 recall points.
  assert m['AP'] == pytest.approx(51 / 101)
  assert m['AR1'] == m['AR100'] == 0.5


def test_false_positive_above_true_positive():
  gt = [image(1, [inst(A)])]
  m = cell(metrics_lib.evaluate(gt, [det(1, A, 0.8), det(1, B, 0.9)]))
  assert m['AP'] == pytest.approx(0.5)  # precision 1/2 at every recall point
  assert m['AR1'] == 0.0  # the top-1 detection is the FP
  assert m['AR10'] == m['AR100'] == ONE


def test_image_without_detections_miss_vs_amodalapi_skip():
  gt = [image(1, [inst(A)]), image(2, [inst(B)])]
  results = [det(1, A, 0.9)]
  coco = cell(metrics_lib.evaluate(gt, results, protocol='coco'))
  api = cell(metrics_lib.evaluate(gt, results, protocol='amodalapi'))
  assert coco['AP'] == pytest.approx(51 / 101) and coco['AR100'] == 0.5
  assert api['AP'] == ONE and api['AR100'] == ONE


def test_detections_on_image_without_gt_fp_vs_amodalapi_skip():
  gt = [image(1, [inst(A)]), image(2, [])]
  results = [det(1, A, 0.5), det(2, B, 0.9)]
  assert cell(metrics_lib.evaluate(gt, results))['AP'] == pytest.approx(0.5)
  assert cell(metrics_lib.evaluate(gt, results, protocol='amodalapi'))['AP'] == ONE


def test_detection_on_ignored_gt_is_not_a_false_positive():
  heavy = inst(A, visible=rect(2, 3, 10, 6), rate=0.6)
  clear = inst(B, rate=0.0)
  gt = [image(1, [heavy, clear])]
  # The detection of the (non-heavy) clear object scores highest.
  results = [det(1, B, 0.9), det(1, A, 0.6)]
  m = metrics_lib.evaluate(gt, results)
  assert cell(m, 'heavy')['AP'] == ONE  # B's detection: ignored, not FP
  assert cell(m, 'none')['AP'] == ONE  # A's detection: ignored, not FP
  assert cell(m, 'partial')['AP'] == -1  # no GT in the subset
  # An unmatched detection is still a FP in the subset.
  fp = det(1, rect(0, 20, 5, 31), 0.95)
  assert cell(metrics_lib.evaluate(gt, results + [fp]), 'heavy')['AP'] == pytest.approx(0.5)


def test_things_stuff_parts():
  gt = [image(1, [inst(A), inst(B, stuff=True)])]
  m = metrics_lib.evaluate(gt, [det(1, B, 0.9), det(1, A, 0.8)])
  assert cell(m, 'all', 'things')['AP'] == ONE
  assert cell(m, 'all', 'stuff')['AP'] == ONE
  m = metrics_lib.evaluate(gt, [det(1, B, 0.9)])
  assert cell(m, 'all', 'things')['AR100'] == 0.0
  assert cell(m, 'all', 'stuff')['AR100'] == ONE


@pytest.mark.parametrize(
    'rate,inside',
    [
        (0.0, {'none'}),
        (5e-6, {'none'}),
        (1e-5, {'none', 'partial'}),
        (2e-5, {'partial'}),
        (0.1, {'partial'}),
        (0.25, {'partial', 'heavy'}),
        (0.3, {'heavy'}),
        (1.0, {'heavy'}),
    ],
)
def test_subset_boundaries_are_inclusive(rate, inside):
  m = metrics_lib.evaluate([image(1, [inst(A, rate=rate)])], [det(1, A, 0.9)])
  for subset in ('none', 'partial', 'heavy'):
    assert (cell(m, subset)['AP'] == ONE) == (subset in inside), subset
  assert cell(m, 'all')['AP'] == ONE


def test_visible_branch_uses_visible_masks():
  vis = rect(2, 3, 10, 7)
  gt = [image(1, [inst(A, visible=vis, rate=0.5)])]
  good = metrics_lib.evaluate(gt, [det(1, A, 0.9, visible_mask=records.encode_mask(vis))])
  assert cell(good, branch='visible')['AP'] == ONE
  bad = metrics_lib.evaluate(gt, [det(1, A, 0.9, visible_mask=records.encode_mask(A))])
  assert cell(bad, branch='amodal')['AP'] == ONE
  assert cell(bad, branch='visible')['AP50'] == 0.0  # IoU 32/72 < 0.5
  # amodal_mask takes precedence over segmentation for the amodal branch.
  m = metrics_lib.evaluate(gt, [dict(det(1, B, 0.9), amodal_mask=records.encode_mask(A))])
  assert cell(m)['AP'] == ONE


def test_single_cell_applies_its_ignore_rule():
  """A cell evaluated first (not only on a re-run) ignores GT outside it."""
  heavy = inst(A, visible=rect(2, 3, 10, 6), rate=0.6)
  gt = [image(1, [heavy, inst(B, rate=0.0, stuff=True)])]
  results = [det(1, A, 0.6)]
  full = metrics_lib.evaluate(gt, results)
  assert cell(full, 'heavy')['AP'] == ONE and cell(full, 'all', 'things')['AP'] == ONE
  for subset in metrics_lib.SUBSETS:
    for part in metrics_lib.PARTS:
      one = metrics_lib.evaluate(gt, results, subsets=(subset,), parts=(part,))
      assert cell(one, subset, part) == cell(full, subset, part), (subset, part)


def test_category_aware_cell_averages_only_categories_with_gt():
  """COCO's summary: a category without GT in the cell (-1) is left out of
  the mean, not averaged in."""
  heavy = inst(A, visible=rect(2, 3, 10, 6), rate=0.6, cat=1)
  gt = [image(1, [heavy, inst(B, rate=0.0, cat=2)])]
  results = [det(1, A, 0.9, category_id=1), det(1, B, 0.8, category_id=2)]
  m = metrics_lib.evaluate(gt, results, category_agnostic=False)
  for subset in ('all', 'none', 'heavy'):
    assert all(v == ONE for v in cell(m, subset).values()), subset
  assert all(v == -1 for v in cell(m, 'partial').values())


def test_max_dets_order_does_not_matter():
  gt = [image(1, [inst(A)])]
  m = cell(metrics_lib.evaluate(gt, [det(1, A, 0.8), det(1, B, 0.9)], max_dets=(10, 1)))
  assert list(m) == metrics_lib.metric_names((10, 1)) == ['AP', 'AP50', 'AP75', 'AR1', 'AR10']
  assert m['AR1'] == 0.0 and m['AR10'] == ONE  # the top-1 detection is the FP
  assert m['AP'] == pytest.approx(0.5)


# --------------------------------------------------------------- vs COCOeval
def same(want):
  """Equal to pycocotools' numbers up to float rounding: faster-coco-eval
  (C++) sums in another order, a last-bit difference; one match more or
  less moves a metric by 1e-4 or more."""
  return pytest.approx(want, rel=1e-12, abs=1e-15)


def _random_case(rng, n_images=6, category_agnostic=True):
  gt, results = [], []
  for image_id in range(1, n_images + 1):
    instances = []
    for _ in range(rng.integers(0, 5)):
      y1, x1 = rng.integers(0, H - 4), rng.integers(0, W - 4)
      m = rect(y1, x1, rng.integers(y1 + 2, H + 1), rng.integers(x1 + 2, W + 1))
      cut = m & (rng.random((H, W)) < 0.7)
      instances.append(
          inst(
              m,
              visible=cut,
              rate=float(rng.random()),
              stuff=bool(rng.random() < 0.3),
              cat=int(rng.integers(1, 4)),
          )
      )
      if rng.random() < 0.8:  # a noisy detection of this object
        noisy = m ^ (rng.random((H, W)) < 0.08)
        results.append(
            det(
                image_id,
                noisy,
                float(rng.random()),
                visible_mask=records.encode_mask(cut),
                category_id=int(rng.integers(1, 4)),
            )
        )
    for _ in range(rng.integers(0, 3)):  # false positives
      y1, x1 = rng.integers(0, H - 4), rng.integers(0, W - 4)
      m = rect(y1, x1, y1 + 4, x1 + 5)
      results.append(
          det(
              image_id,
              m,
              float(rng.random()),
              visible_mask=records.encode_mask(m),
              category_id=int(rng.integers(1, 4)),
          )
      )
    gt.append(image(image_id, instances))
  # Always one image with GT only and one with detections only.
  gt.append(image(n_images + 1, [inst(A, cat=1), inst(B, cat=2)]))
  gt.append(image(n_images + 2, []))
  results.append(det(n_images + 2, B, 0.5, visible_mask=records.encode_mask(B)))
  return gt, results


def _cocoeval_stats(gt, results, gt_key, dt_key, use_cats, img_ids=None):
  """pycocotools COCOeval run directly: stats [AP, AP50, AP75, AR1, AR10, AR100]."""
  anns, k = [], 0
  for a in gt:
    for i in a.instances:
      k += 1
      rle = getattr(i, gt_key)
      anns.append(
          dict(
              id=k,
              image_id=a.image_id,
              iscrowd=0,
              segmentation=rle,
              area=float(mask_utils.area(rle)),
              bbox=mask_utils.toBbox(rle).tolist(),
              category_id=i.category_id if use_cats else 1,
          )
      )
  dataset = dict(
      images=[dict(id=a.image_id, height=a.height, width=a.width) for a in gt],
      annotations=anns,
      categories=[dict(id=c) for c in (1, 2, 3)],
  )
  dts = []
  for r in copy.deepcopy(results):
    dts.append(
        dict(
            image_id=r['image_id'],
            score=r['score'],
            segmentation=r[dt_key],
            category_id=r.get('category_id', 1) if use_cats else 1,
        )
    )
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = dataset
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(dts)
    e = COCOeval(coco_gt, coco_dt, 'segm')
    e.params.useCats = int(use_cats)
    if img_ids is not None:
      e.params.imgIds = img_ids
    e.evaluate()
    e.accumulate()
    e.summarize()
  return [e.stats[i] for i in (0, 1, 2, 6, 7, 8)], e


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_cocoeval_on_random_cases(seed):
  gt, results = _random_case(np.random.default_rng(seed))
  # Other cells first: the IoUs are reused and the flags reset between cells.
  m = metrics_lib.evaluate(gt, results, subsets=('heavy', 'all'), parts=('things', 'both'))
  names = metrics_lib.metric_names()
  want, _ = _cocoeval_stats(gt, results, 'amodal_rle', 'segmentation', False)
  assert [m['amodal']['all']['both'][n] for n in names] == same(want)
  assert 0 < want[0] < 1  # a non-trivial case
  want, _ = _cocoeval_stats(gt, results, 'visible_rle', 'visible_mask', False)
  assert [m['visible']['all']['both'][n] for n in names] == same(want)
  # amodalapi == COCOeval restricted to images with both GT and detections.
  both = sorted({a.image_id for a in gt if a.instances} & {r['image_id'] for r in results})
  assert len(both) < len(gt)
  m = metrics_lib.evaluate(gt, results, protocol='amodalapi', subsets=('all',), parts=('both',))
  want, _ = _cocoeval_stats(gt, results, 'amodal_rle', 'segmentation', False, img_ids=both)
  assert [m['amodal']['all']['both'][n] for n in names] == same(want)


def test_category_aware_and_per_class_match_cocoeval():
  gt, results = _random_case(np.random.default_rng(7), n_images=8)
  m = metrics_lib.evaluate(gt, results, category_agnostic=False, subsets=('all',), parts=('both',))
  want, e = _cocoeval_stats(gt, results, 'amodal_rle', 'segmentation', True)
  assert [m['amodal']['all']['both'][n] for n in metrics_lib.metric_names()] == same(want)
  per_class = metrics_lib.per_class_ap(gt, results)
  gt_cats = sorted({i.category_id for a in gt for i in a.instances})
  assert sorted(per_class) == gt_cats
  for k, c in enumerate(e.params.catIds):
    if c in per_class:
      p = e.eval['precision'][:, :, k, 0, -1]
      assert per_class[c] == same(np.mean(p[p > -1]) if (p > -1).any() else -1)


def test_category_agnostic_erases_gt_categories():
  """Agnostic matching is COCOeval with every GT in category 1, also where
  the GT order decides a tie: d1 has IoU 80/120 with both g1 and g2."""
  g1, g2 = rect(0, 0, 10, 10), rect(0, 4, 10, 14)
  gt = [image(1, [inst(g1, cat=2), inst(g2, cat=1)])]
  results = [det(1, rect(0, 2, 10, 12), 0.9), det(1, g1, 0.8)]
  m = metrics_lib.evaluate(gt, results, subsets=('all',), parts=('both',))
  want, _ = _cocoeval_stats(gt, results, 'amodal_rle', 'segmentation', False)
  assert [cell(m)[n] for n in metrics_lib.metric_names()] == same(want)


def test_per_class_ap_amodalapi_skips_images_without_detections():
  gt = [image(1, [inst(A)]), image(2, [inst(B)])]
  results = [det(1, A, 0.9)]
  assert metrics_lib.per_class_ap(gt, results) == {1: pytest.approx(51 / 101)}
  assert metrics_lib.per_class_ap(gt, results, protocol='amodalapi') == {1: ONE}


# --------------------------------------------------------------- depth order
def test_amodalapi_skips_per_category_when_categories_are_used():
  """Image 1 has GT of categories 1 and 2 but detections of category 1 only:
  amodalapi drops the (image 1, category 2) pair, coco counts its GT as a
  miss; image 2 (category 2 GT and detection) is scored by both."""
  gt = [image(1, [inst(A, cat=1), inst(B, cat=2)]), image(2, [inst(B, cat=2)])]
  results = [det(1, A, 0.9, category_id=1), det(2, B, 0.8, category_id=2)]
  assert metrics_lib.per_class_ap(gt, results) == {1: ONE, 2: pytest.approx(51 / 101)}
  assert metrics_lib.per_class_ap(gt, results, protocol='amodalapi') == {1: ONE, 2: ONE}
  m = metrics_lib.evaluate(
      gt, results, protocol='amodalapi', category_agnostic=False, subsets=('all',), parts=('both',)
  )
  assert cell(m)['AP'] == ONE
  m = metrics_lib.evaluate(gt, results, category_agnostic=False, subsets=('all',), parts=('both',))
  assert cell(m)['AP'] == pytest.approx((1 + 51 / 101) / 2)


def test_depth_order_accuracy():
  front, back = rect(2, 2, 12, 14), rect(6, 8, 18, 24)
  far = rect(19, 0, 24, 6)  # overlaps nobody
  gt = [
      image(1, [inst(front, rank=0), inst(back, visible=back & ~front, rank=1), inst(far, rank=2)])
  ]
  right = [
      det(1, front, 0.9, depth_layer=0),
      det(1, back, 0.8, depth_layer=1),
      det(1, far, 0.7, depth_layer=0),
  ]
  r = occlusion.depth_order_accuracy(gt, right)
  assert r == {
      'accuracy': 1.0,
      'correct': 1,
      'wrong': 0,
      'undecided': 0,
      'pairs': 1,
      'things': {'accuracy': 1.0, 'correct': 1, 'pairs': 1},
  }
  assert occlusion.format_depth_order(r) == (
      'depth order: 1/1 pairs of matched, overlapping objects '
      'ordered right, 0 wrong, 0 undecided (accuracy 1.000)'
  )
  wrong = [dict(d, depth_layer=1 - d['depth_layer']) for d in right]
  assert occlusion.depth_order_accuracy(gt, wrong) == {
      'accuracy': 0.0,
      'correct': 0,
      'wrong': 1,
      'undecided': 0,
      'pairs': 1,
      'things': {'accuracy': 0.0, 'correct': 0, 'pairs': 1},
  }
  tie = [dict(d, depth_layer=0) for d in right]
  assert occlusion.depth_order_accuracy(gt, tie) == {
      'accuracy': 0.0,
      'correct': 0,
      'wrong': 0,
      'undecided': 1,
      'pairs': 1,
      'things': {'accuracy': 0.0, 'correct': 0, 'pairs': 1},
  }
  # Below the score threshold: no matched pair.
  low = [dict(d, score=0.3) for d in right]
  assert occlusion.depth_order_accuracy(gt, low)['pairs'] == 0
  assert occlusion.depth_order_accuracy(gt, low)['accuracy'] == -1
  assert occlusion.format_depth_order(occlusion.depth_order_accuracy(gt, low)) == (
      'depth order: no matched pair of overlapping objects to score'
  )
  # A per-pair order (results order of the image) overrides depth_layer.
  pw = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 0]])
  assert occlusion.depth_order_accuracy(gt, wrong, pairwise={1: pw})['accuracy'] == ONE
  assert occlusion.depth_order_accuracy(gt, right, pairwise={1: -pw})['accuracy'] == 0.0


def test_depth_order_counts_the_pairs_of_two_things_apart():
  """A stuff region behind two overlapping things: three pairs, one of two
  things; the line names the things' share when stuff pairs are in."""
  front, back = rect(2, 2, 12, 14), rect(6, 8, 18, 24)
  ground = rect(0, 0, 24, 32)
  gt = [
      image(
          1,
          [
              inst(front, rank=0),
              inst(back, visible=back & ~front, rank=1),
              inst(ground, visible=ground & ~(front | back), rank=2, stuff=True),
          ],
      )
  ]
  results = [
      det(1, front, 0.9, depth_layer=1),  # the things' pair wrong
      det(1, back, 0.8, depth_layer=0),
      det(1, ground, 0.7, depth_layer=2),  # both stuff pairs right
  ]
  r = occlusion.depth_order_accuracy(gt, results)
  assert (r['correct'], r['pairs']) == (2, 3)
  assert r['things'] == {'accuracy': 0.0, 'correct': 0, 'pairs': 1}
  assert occlusion.format_depth_order(r).endswith('; pairs of two things 0/1 (0.000)')


def test_depth_order_thresholds_are_inclusive():
  """score >= score_threshold and IoU >= iou_threshold are matched."""
  front, back = rect(2, 2, 12, 14), rect(6, 8, 18, 24)
  gt = [image(1, [inst(front, rank=0), inst(back, visible=back & ~front, rank=1)])]
  half = rect(2, 2, 12, 8)  # IoU 60/120 = 0.5 with front, 0 with back
  results = [det(1, half, 0.5, depth_layer=0), det(1, back, 0.9, depth_layer=1)]
  assert occlusion.depth_order_accuracy(gt, results)['correct'] == 1
  assert occlusion.depth_order_accuracy(gt, results, score_threshold=0.51)['pairs'] == 0
  assert occlusion.depth_order_accuracy(gt, results, iou_threshold=0.51)['pairs'] == 0


def test_depth_order_matching_is_greedy_by_score_and_best_iou():
  left, right = rect(0, 0, 10, 10), rect(0, 2, 10, 12)  # IoU 80/120
  gt = [image(1, [inst(left, rank=0), inst(right, visible=right & ~left, rank=1)])]
  # Each detection takes the GT it overlaps best, not any one >= 0.5.
  results = [det(1, left, 0.9, depth_layer=0), det(1, right, 0.8, depth_layer=1)]
  assert occlusion.depth_order_accuracy(gt, results)['correct'] == 1
  # The higher-scored of two detections of `right` takes it, whatever the
  # results order.
  results.insert(0, det(1, right, 0.6, depth_layer=0))
  assert occlusion.depth_order_accuracy(gt, results) == {
      'accuracy': 1.0,
      'correct': 1,
      'wrong': 0,
      'undecided': 0,
      'pairs': 1,
      'things': {'accuracy': 1.0, 'correct': 1, 'pairs': 1},
  }
  # Overlapping GT of equal depth rank is not a pair.
  tied = [image(1, [inst(left, rank=0), inst(right, rank=0)])]
  assert occlusion.depth_order_accuracy(tied, results)['pairs'] == 0


def test_depth_order_pairwise_indexes_each_images_own_detections():
  front, back = rect(2, 2, 12, 14), rect(6, 8, 18, 24)
  gt = [
      image(1, [inst(A)]),
      image(2, [inst(front, rank=0), inst(back, visible=back & ~front, rank=1)]),
  ]
  results = [det(1, A, 0.9), det(2, back, 0.8), det(2, front, 0.9)]
  # Image 2's detections in results order: [back, front].
  pw = {1: np.zeros((1, 1)), 2: np.array([[0, -1], [1, 0]])}
  assert occlusion.depth_order_accuracy(gt, results, pairwise=pw)['correct'] == 1
  assert occlusion.depth_order_accuracy(gt, results, pairwise={1: pw[1], 2: -pw[2]})['wrong'] == 1


# --------------------------------------------------------------- errors, table
@pytest.mark.parametrize(
    'results,field',
    [
        ({'image_id': 1}, ''),
        ([{'score': 1.0, 'segmentation': records.encode_mask(A)}], '[0].image_id'),
        ([det(5, A, 0.9)], '[0].image_id'),
        ([{'image_id': 1, 'score': 0.5}], '[0].segmentation'),
        ([{'image_id': 1, 'segmentation': records.encode_mask(A)}], '[0].score'),
        ([det(1, np.zeros((5, 5), bool), 0.9)], '[0].segmentation'),
        ([det(1, A, 0.9, visible_mask=records.encode_mask(A)), det(1, B, 0.8)], '[1].visible_mask'),
    ],
)
def test_bad_results_raise_user_error(results, field):
  with pytest.raises(UserError) as err:
    metrics_lib.evaluate([image(1, [inst(A)])], results, results_path='dt.json')
  assert err.value.path == 'dt.json' and err.value.field == field


def test_rle_counts_decodes_pycocotools_strings():
  rng = np.random.default_rng(3)
  for t in range(40):
    h, w = (int(v) for v in rng.integers(1, 40, 2))
    m = rng.random((h, w)) < rng.random()
    if t % 4 == 0:
      m = np.ones((h, w), bool)
    counts = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))['counts']
    runs = results_check.rle_counts(counts)
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)  # column-major
    np.testing.assert_array_equal(flat.reshape(w, h).T, m)
  for bad in ('0\x7f', 'a'):  # out of alphabet; truncated group
    with pytest.raises(ValueError):
      results_check.rle_counts(bad)


def _counts_or_none(counts):
  """(sum of runs, none negative) by the readers' loop decoder (an
  independent transcription of pycocotools' rleFrString), or None when
  malformed."""
  text = counts.decode('latin-1') if isinstance(counts, bytes) else counts
  try:
    runs = readers._compressed_counts(text)  # pylint: disable=protected-access
  except ValueError:
    return None
  return sum(runs), all(r >= 0 for r in runs)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    st.lists(
        st.one_of(
            st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31)),  # a mask
            st.binary(max_size=12),  # any bytes
            st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=130), max_size=8),
        ),
        max_size=12,
    )
)
# Found while exploring: 'O' is one run of -1, a well-formed string whose
# sum is -1 (once the malformed strings' marker).
@hypothesis.example(items=['O'])
def test_rle_totals_agree_with_a_loop_decoder_string_by_string(items):
  """The batched decoder gives each string what a plain loop decoder gives
  it alone, whatever its neighbours: pycocotools strings, garbage, truncated
  values, non-ASCII text (flagged as malformed); rle_counts, one string
  through the same decoder, agrees and raises on the malformed."""
  strings = []
  for item in items:
    if isinstance(item, tuple):
      h, w, seed = item
      rng = np.random.default_rng(seed)
      m = rng.random((h, w)) < rng.random()
      strings.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))['counts'])
    else:
      strings.append(item)
  total, nonneg, good = results_check.rle_totals(strings)
  for s, t, ok, g in zip(strings, total.tolist(), nonneg.tolist(), good.tolist()):
    want = _counts_or_none(s)
    assert ((t, ok) if g else None) == want, s
    if want is None:
      with pytest.raises((ValueError, UnicodeEncodeError)):
        results_check.rle_counts(s)
    else:
      runs = results_check.rle_counts(s)
      assert (int(runs.sum()), bool((runs >= 0).all())) == want


def test_rle_totals_of_masks_cover_their_images():
  rng = np.random.default_rng(5)
  sizes = [(int(h), int(w)) for h, w in rng.integers(1, 50, (30, 2))]
  strings = [
      mask_utils.encode(np.asfortranarray((rng.random(hw) < 0.5).astype(np.uint8)))['counts']
      for hw in sizes
  ]
  total, nonneg, good = results_check.rle_totals(strings)
  assert total.tolist() == [h * w for h, w in sizes] and nonneg.all() and good.all()
  assert results_check.rle_totals([])[0].shape == (0,)


def test_string_rle_totals_do_not_depend_on_the_chunks():
  _, results = _random_case(np.random.default_rng(6))
  results[1] = dict(results[1], segmentation={'size': [H, W], 'counts': 'a'})  # truncated
  whole = results_check._string_rle_totals(results, chunk_chars=1 << 30)
  assert len(whole) == 2 * len(results) - 1 and (1, 'segmentation') not in whole
  assert all(t == H * W and ok for key, (t, ok) in whole.items())
  for chunk in (1, 7, 100):
    assert results_check._string_rle_totals(results, chunk_chars=chunk) == whole


def test_checked_results_are_scored_without_a_second_check():
  gt, results = _random_case(np.random.default_rng(4))
  checked = results_check.check_results(results, gt)
  assert metrics_lib.evaluate(gt, checked) == metrics_lib.evaluate(gt, results)
  assert occlusion.depth_order_accuracy(gt, checked) == occlusion.depth_order_accuracy(gt, results)
  assert results_check.check_results(checked, gt) is not None
  # Against other images: only those that hold every detection's image.
  with pytest.raises(UserError) as err:
    metrics_lib.evaluate(gt[:2], checked, results_path='dt.json')
  assert err.value.path == 'dt.json' and err.value.field.endswith('.image_id')


def test_check_counts_false_skips_only_the_run_check():
  short = dict(records.encode_mask(A), counts=records.encode_mask(A[:, :-1])['counts'])
  results = [{'image_id': 1, 'score': 0.5, 'segmentation': short}]
  with pytest.raises(UserError, match='do not cover'):
    results_check.check_results(results, [image(1, [inst(A)])])
  (d,) = results_check.check_results(results, [image(1, [inst(A)])], check_counts=False)
  assert d['amodal'] == {'size': [H, W], 'counts': short['counts']}
  with pytest.raises(UserError, match='image id 2'):  # the structure is still checked
    results_check.check_results(
        [dict(results[0], image_id=2)], [image(1, [inst(A)])], check_counts=False
    )


def test_matches_cocoeval_past_max_dets_and_with_tied_scores():
  """More detections than maxDets, scores with ties (C++ and pycocotools
  must keep the same ones and order them the same way)."""
  rng = np.random.default_rng(11)
  gt, results = [], []
  for image_id in (1, 2, 3):
    instances = []
    for _ in range(6):
      y1, x1 = rng.integers(0, H - 6), rng.integers(0, W - 6)
      m = rect(y1, x1, y1 + 6, x1 + 6)
      instances.append(inst(m, rate=float(rng.random())))
    for _ in range(120):
      y1, x1 = rng.integers(0, H - 6), rng.integers(0, W - 6)
      results.append(
          det(
              image_id,
              rect(y1, x1, y1 + int(rng.integers(4, 8)), x1 + int(rng.integers(4, 8))),
              float(rng.integers(1, 6)) / 5,
          )
      )
    gt.append(image(image_id, instances))
  m = metrics_lib.evaluate(gt, results, subsets=('all',), parts=('both',))
  want, _ = _cocoeval_stats(gt, results, 'amodal_rle', 'segmentation', False)
  assert [cell(m)[n] for n in metrics_lib.metric_names()] == same(want)
  assert 0 < want[0] < 1 and want[3] < want[5]


@pytest.mark.parametrize('counts', ['abc', 'P', [10, 5], [800]])
def test_malformed_rle_is_a_user_error(counts):
  bad = {'size': [H, W], 'counts': counts}
  with pytest.raises(UserError) as err:
    metrics_lib.evaluate(
        [image(1, [inst(A)])], [{'image_id': 1, 'score': 0.5, 'segmentation': bad}]
    )
  assert err.value.field == '[0].segmentation'


@pytest.mark.parametrize('size', [None, ['40', 'x'], [40.7, 30], [H], 7])
def test_malformed_rle_size_is_a_user_error(size):
  good = records.encode_mask(A)
  with pytest.raises(UserError, match=r'\[height, width\] integers') as err:
    metrics_lib.evaluate(
        [image(1, [inst(A)])],
        [{'image_id': 1, 'score': 0.5, 'segmentation': dict(good, size=size)}],
    )
  assert err.value.field == '[0].segmentation.size'


def test_format_table():
  m = metrics_lib.evaluate([image(1, [inst(A), inst(B)])], [det(1, A, 0.9)])
  text = metrics_lib.format_table(m)
  lines = text.splitlines()
  assert lines[0].startswith('amodal')
  assert lines[1].split() == ['subset', 'part', 'AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100']
  row = next(l for l in lines if l.split()[:2] == ['all', 'both'])
  assert row.split()[2:] == ['50.5', '50.5', '50.5', '50.0', '50.0', '50.0']
  assert next(l for l in lines if l.split()[:2] == ['heavy', 'both']).split()[2] == '-'


# --------------------------------------------------------------- CLI
def _cocoa_file(tmp_path):
  """A two-image COCOA-style annotation file (polygons, one occluded region)."""
  poly = lambda y1, x1, y2, x2: [x1, y1, x2, y1, x2, y2, x1, y2]
  occl = records.encode_mask(rect(6, 8, 10, 12))
  vis = records.encode_mask(rect(6, 8, 16, 20) & ~rect(6, 8, 10, 12))
  data = {
      'images': [
          {'id': 1, 'file_name': '1.jpg', 'height': H, 'width': W},
          {'id': 2, 'file_name': '2.jpg', 'height': H, 'width': W},
      ],
      'annotations': [
          {
              'id': 1,
              'image_id': 1,
              'size': 2,
              'depth_constraint': '1-2',
              'regions': [
                  {
                      'segmentation': poly(2, 3, 10, 12),
                      'name': 'a',
                      'area': 72.0,
                      'isStuff': 0,
                      'occlude_rate': 0.0,
                      'order': 1,
                  },
                  {
                      'segmentation': poly(6, 8, 16, 20),
                      'name': 'b',
                      'area': 120.0,
                      'isStuff': 0,
                      'occlude_rate': 16 / 120,
                      'order': 2,
                      'visible_mask': vis,
                      'invisible_mask': occl,
                  },
              ],
          },
          {
              'id': 2,
              'image_id': 2,
              'size': 1,
              'depth_constraint': '',
              'regions': [
                  {
                      'segmentation': poly(4, 4, 20, 28),
                      'name': 'c',
                      'area': 384.0,
                      'isStuff': 1,
                      'occlude_rate': 0.0,
                      'order': 1,
                  }
              ],
          },
      ],
  }
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(data))
  return path


def _run_cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'evaluate.py'), *map(str, args)],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=120,
  )


def _load_script():
  spec = importlib.util.spec_from_file_location(
      'evaluate_script', os.path.join(ROOT, 'scripts', 'evaluate.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli_writes_metrics_and_rejects_bad_input(tmp_path, capsys):
  pytest.importorskip('input_pipeline.readers')
  gt_path = _cocoa_file(tmp_path)
  from input_pipeline import readers

  gt = readers.load_annotations('cocoa', str(gt_path))
  # Perfect amodal predictions from the reader's own masks.
  results = [
      det(a.image_id, records.decode_rle(i.amodal_rle), 0.9 - 0.1 * k)
      for a in gt
      for k, i in enumerate(a.instances)
  ]
  dt_path, out = tmp_path / 'dt.json', tmp_path / 'out' / 'm.json'
  dt_path.write_text(json.dumps(results))
  base = ['--format', 'cocoa', '--annotations', gt_path, '--output', out]
  proc = _run_cli(*base, '--results', dt_path)
  assert proc.returncode == 0, proc.stderr
  metrics = json.loads(out.read_text())
  assert set(metrics) == {'amodal'}
  assert set(metrics['amodal']) == {'all', 'none', 'partial', 'heavy'}
  assert metrics['amodal']['all']['both']['AP'] == ONE
  assert 'AR100' in proc.stdout
  assert 'depth order' not in proc.stdout  # results carry no depth_layer
  # With depth layers in file order (front first) every overlapping pair is right.
  layered = [
      dict(r, depth_layer=k)
      for a in gt
      for k, r in enumerate(x for x in results if x['image_id'] == a.image_id)
  ]
  dt_path.write_text(json.dumps(layered))
  proc = _run_cli(*base, '--results', dt_path)
  assert proc.returncode == 0, proc.stderr
  assert 'depth order: 1/1 pairs' in proc.stdout and 'accuracy 1.000' in proc.stdout
  # The amodalapi protocol skips image 2 when its detection is removed.
  dt_path.write_text(json.dumps([r for r in results if r['image_id'] == 1]))
  proc = _run_cli(*base, '--results', dt_path, '--protocol', 'amodalapi')
  assert proc.returncode == 0, proc.stderr
  assert json.loads(out.read_text())['amodal']['all']['both']['AP'] == ONE

  bad_cases = {
      'missing.json': None,
      'notlist.json': {'image_id': 1},
      'noid.json': [{'score': 1.0, 'segmentation': results[0]['segmentation']}],
      'noseg.json': [{'image_id': 1, 'score': 1.0}],
      'unknown.json': [dict(results[0], image_id=99)],
      'nullsize.json': [dict(results[0], segmentation=dict(results[0]['segmentation'], size=None))],
  }
  # One bad input through a real process; the rest in-process (same run_cli).
  proc = _run_cli(
      '--format',
      'cocoa',
      '--annotations',
      tmp_path / 'nope.json',
      '--results',
      dt_path,
      '--output',
      tmp_path / 'x.json',
  )
  assert proc.returncode == 2 and 'nope.json' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  script = _load_script()
  capsys.readouterr()
  for name, content in bad_cases.items():
    path = tmp_path / name
    if content is not None:
      path.write_text(json.dumps(content))
    out2 = tmp_path / f'{name}.metrics.json'
    argv = [
        '--format',
        'cocoa',
        '--annotations',
        str(gt_path),
        '--results',
        str(path),
        '--output',
        str(out2),
    ]
    with pytest.raises(SystemExit) as exit_info:
      run_cli(lambda: script.main(argv))
    assert exit_info.value.code == 2, name
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and name in err, err
    assert not out2.exists()
  # --output naming a folder: one line, exit 2, no temporary file left.
  folder = tmp_path / 'metrics_dir'
  folder.mkdir()
  argv = [
      '--format',
      'cocoa',
      '--annotations',
      str(gt_path),
      '--results',
      str(dt_path),
      '--output',
      str(folder),
  ]
  with pytest.raises(SystemExit) as exit_info:
    run_cli(lambda: script.main(argv))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert 'is a directory' in err and len(err.strip().splitlines()) == 1, err
  assert os.listdir(folder) == []
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.metrics_dir')]


def test_cli_counts_detections_on_images_without_objects(tmp_path):
  """COCO's rule: an image listed in the annotation file without objects is
  still evaluated, so a detection on it is a false positive (it used to be
  refused as an unknown image id)."""
  pytest.importorskip('input_pipeline.readers')
  gt_path = _cocoa_file(tmp_path)
  data = json.loads(gt_path.read_text())
  data['images'].append({'id': 3, 'file_name': '3.jpg', 'height': H, 'width': W})
  gt_path.write_text(json.dumps(data))
  from input_pipeline import readers

  gt = readers.load_annotations('cocoa', str(gt_path))
  assert [a.image_id for a in gt] == [1, 2]
  results = [
      det(a.image_id, records.decode_rle(i.amodal_rle), 0.9 - 0.1 * k)
      for a in gt
      for k, i in enumerate(a.instances)
  ]
  results.append(det(3, A, 0.95))  # ranks first, matches nothing
  dt_path, out = tmp_path / 'dt.json', tmp_path / 'm.json'
  dt_path.write_text(json.dumps(results))
  base = ['--format', 'cocoa', '--annotations', gt_path, '--results', dt_path, '--output', out]
  proc = _run_cli(*base)
  assert proc.returncode == 0, proc.stderr
  # Ranked FP, TP, TP, TP over 3 objects: interpolated precision 3/4 at
  # every recall level.
  ap = json.loads(out.read_text())['amodal']['all']['both']
  assert ap['AP'] == pytest.approx(0.75) and ap['AR100'] == pytest.approx(1.0)
  # amodalapi drops images without ground truth, so the detection is not counted.
  proc = _run_cli(*base, '--protocol', 'amodalapi')
  assert proc.returncode == 0, proc.stderr
  assert json.loads(out.read_text())['amodal']['all']['both']['AP'] == ONE


# --------------------------------------------------------------- occlusion
def _layered_scene():
  """A front object over the left half of a back one, and a third apart."""
  front, back, far = rect(2, 2, 12, 14), rect(6, 8, 18, 24), rect(19, 0, 24, 6)
  gt = [
      image(1, [inst(front, rank=0), inst(back, visible=back & ~front, rank=1), inst(far, rank=2)])
  ]
  return gt, front, back, far


def test_pairwise_votes_count_visible_over_hidden_pixels():
  gt, front, back, far = _layered_scene()
  hidden = back & front  # 36 pixels of back under front
  results = [
      det(1, back, 0.8, visible_mask=records.encode_mask(back & ~front)),
      det(1, front, 0.9, visible_mask=records.encode_mask(front)),
      det(1, far, 0.7, visible_mask=records.encode_mask(far)),
  ]
  checked = results_check.check_results(results, gt)
  votes = occlusion.pairwise_votes(checked)[1]
  n = int(hidden.sum())
  np.testing.assert_array_equal(votes, [[0, -n, 0], [n, 0, 0], [0, 0, 0]])
  # Both visible where they overlap: no vote either way.
  both = [dict(r, visible_mask=r['segmentation']) for r in results]
  np.testing.assert_array_equal(
      occlusion.pairwise_votes(results_check.check_results(both, gt))[1], np.zeros((3, 3))
  )


def test_occlusion_metrics_score_layers_votes_and_occluded_parts():
  gt, front, back, far = _layered_scene()
  hidden = back & front
  # back's predicted visible mask takes 8 of its 36 hidden pixels: its
  # occluded part is 28 of the true 36 pixels (IoU 7/9).
  miss = rect(6, 8, 8, 12) & hidden
  results = [
      det(1, front, 0.9, visible_mask=records.encode_mask(front), depth_layer=1),
      det(1, back, 0.8, visible_mask=records.encode_mask((back & ~front) | miss), depth_layer=0),
      det(1, far, 0.7, visible_mask=records.encode_mask(far), depth_layer=0),
  ]
  report = occlusion.occlusion_metrics(gt, results)
  assert report['depth_order']['wrong'] == 1  # the layers say back is in front
  assert report['depth_order_votes'] == {
      'accuracy': 1.0,
      'correct': 1,
      'wrong': 0,
      'undecided': 0,
      'pairs': 1,
      'things': {'accuracy': 1.0, 'correct': 1, 'pairs': 1},
  }
  masks = report['masks']
  assert masks['matched'] == 3 and masks['amodal_miou'] == 1.0
  assert masks['occluded'] == 1  # only back hides >= 20 pixels
  assert (
      masks['occluded_miou'] == pytest.approx((hidden & ~miss).sum() / hidden.sum())
      and miss.sum() == 8
  )
  visible_back = ((back & ~front) & ((back & ~front) | miss)).sum() / ((back & ~front) | miss).sum()
  assert masks['visible_miou'] == pytest.approx((1 + visible_back + 1) / 3)
  # back's 36 hidden pixels: 8 predicted visible, 28 occluded, none absent.
  assert masks['hidden_pixels'] == pytest.approx(
      {'visible': 8 / 36, 'occluded': 28 / 36, 'absent': 0.0}
  )
  lines = occlusion.format_occlusion(report).splitlines()
  assert lines[1].startswith('depth order (pixel votes): 1/1 pairs')
  assert 'occluded-part mIoU 0.778 (1 objects hiding >= 20 pixels)' in lines[2]
  assert lines[3] == (
      'hidden pixels of matched objects predicted visible 0.222, occluded 0.778, absent 0.000'
  )


def test_mask_quality_without_visible_masks_or_matches_is_minus_one():
  gt, front, back, far = _layered_scene()
  amodal_only = [det(1, front, 0.9), det(1, back, 0.8)]
  masks = occlusion.mask_quality(gt, amodal_only)
  assert masks['matched'] == 2 and masks['amodal_miou'] == 1.0
  assert masks['visible_miou'] == -1 and masks['occluded_miou'] == -1 and masks['occluded'] == 0
  assert masks['hidden_pixels'] == {'visible': -1.0, 'occluded': -1.0, 'absent': -1.0}
  assert occlusion.mask_quality(gt, [det(1, far, 0.2)])['amodal_miou'] == -1


@pytest.mark.parametrize('use_cats', [False, True])
def test_precision_curves_are_cocoevals_precision_array(use_cats):
  """The report's precision-recall curves: COCOeval's own precision array
  (area all, maxDets 100), averaged over the categories that define it."""
  gt, results = _random_case(np.random.default_rng(7), n_images=8)
  curves = {}
  m = metrics_lib.evaluate(gt, results, category_agnostic=not use_cats, curves=curves)
  _, e = _cocoeval_stats(gt, results, 'amodal_rle', 'segmentation', use_cats)
  prec = e.eval['precision'][:, :, :, 0, -1]  # (T, R, K)
  got = np.asarray(curves['amodal']['all']['precision'])
  assert got.shape == (10, 101)
  masked = np.ma.masked_less(prec, 0)
  want = np.ma.filled(masked.mean(axis=-1), -1.0)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  assert (got > 0).any() and (got < 1).any()
  if not use_cats:  # one category: the curve's mean is the table's AP
    assert np.mean(got) == pytest.approx(m['amodal']['all']['both']['AP'], abs=1e-12)
  assert curves['amodal']['all']['recall'][:3] == pytest.approx([0.0, 0.01, 0.02])
  assert set(curves) == {'amodal', 'visible'} and set(curves['amodal']) == set(metrics_lib.SUBSETS)
