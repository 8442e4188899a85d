"""The release's .npz layer files: hand-computed bit maps, the 64-pixel
cleanup (checked against a pure-Python flood fill), round trips, refusal."""

import collections
import io
import os

import numpy as np
import pytest

from input_pipeline import legacy_layers, records
from input_pipeline.records import AnnotationError

U = np.uint64


def rect(h, w, y1, x1, y2, x2):
  m = np.zeros((h, w), bool)
  m[y1:y2, x1:x2] = True
  return m


def inst(amodal, invisible=None, polygons=None, annotated=True):
  invisible = np.zeros_like(amodal) if invisible is None else invisible
  return records.InstanceAnnotation(
      amodal_rle=records.encode_mask(amodal),
      visible_rle=records.encode_mask(amodal & ~invisible),
      occluded_rle=records.encode_mask(invisible),
      depth_rank=0,
      occlude_rate=0.0,
      amodal_polygons=polygons,
      extra={'invisible_annotated': annotated},
  )


def image(h, w, instances):
  return records.ImageAnnotation(7, 'img_x.jpg', h, w, instances)


def test_bit_rule_hand_computed():
  h, w = 20, 20
  ann = image(
      h,
      w,
      [inst(rect(h, w, 0, 0, 10, 10)), inst(rect(h, w, 0, 10, 20, 20), rect(h, w, 0, 10, 10, 20))],
  )
  expected = np.zeros((h, w), U)
  expected[0:10, 0:10] = 1  # instance 0 visible
  expected[0:10, 10:20] = U(1) << U(33)  # instance 1 invisible only
  expected[10:20, 10:20] = 2  # instance 1 visible
  np.testing.assert_array_equal(legacy_layers.encode_legacy_layers(ann), expected)


def test_bits_follow_the_regions_list_not_the_depth_sort():
  """COCOA: the reader sorts instances by ``order``; the release numbers
  objects by their position in the file's ``regions`` list."""
  h, w = 20, 20
  front, back = inst(rect(h, w, 0, 0, 10, 10)), inst(rect(h, w, 10, 0, 20, 20))
  front.extra['region_index'], back.extra['region_index'] = 1, 0
  layer = legacy_layers.encode_legacy_layers(image(h, w, [front, back]))
  assert (layer[0:10, 0:10] == 2).all() and (layer[10:20] == 1).all()
  back.extra['region_index'] = 1
  with pytest.raises(AnnotationError, match='region indices'):
    legacy_layers.encode_legacy_layers(image(h, w, [front, back]))


def test_invisible_outside_amodal_gets_both_bits():
  h, w = 10, 20
  ann = image(h, w, [inst(rect(h, w, 0, 0, 10, 10), rect(h, w, 0, 0, 10, 20))])
  layer = legacy_layers.encode_legacy_layers(ann)
  assert (layer[:, :10] == U(1) << U(32)).all()
  assert (layer[:, 10:] == (U(1) << U(32)) | U(1)).all()


def test_unannotated_invisible_counts_as_visible():
  h, w = 10, 10
  ann = image(h, w, [inst(rect(h, w, 0, 0, 10, 10), rect(h, w, 0, 0, 5, 10), annotated=False)])
  assert (legacy_layers.encode_legacy_layers(ann) == 1).all()


def test_cleanup_63_vs_64_and_mixed_components():
  h, w = 30, 30
  small = rect(h, w, 0, 0, 7, 9)  # 63 px: cleared
  exact = rect(h, w, 10, 0, 18, 8)  # 64 px: kept
  big_and_tiny = rect(h, w, 20, 0, 28, 8) | rect(h, w, 20, 20, 22, 22)
  layer = legacy_layers.encode_legacy_layers(
      image(h, w, [inst(small), inst(exact), inst(big_and_tiny)])
  )
  assert small.sum() == 63 and exact.sum() == 64
  assert (layer[small] == 0).all()
  assert (layer[exact] == 2).all()
  assert (layer[big_and_tiny] == 4).all()  # tiny part kept too
  assert np.count_nonzero(layer) == 64 + 68


def test_cleanup_uses_four_connectivity():
  h, w = 8, 16
  diagonal = rect(h, w, 0, 0, 4, 8) | rect(h, w, 4, 8, 8, 16)  # 2 x 32 px
  layer = legacy_layers.encode_legacy_layers(image(h, w, [inst(diagonal)]))
  assert not layer.any()  # 8-connectivity would keep all 64


def _reference_cleanup(layer, min_size):
  """Pure-Python 4-connected flood fill version of the release's rule."""
  h, w = layer.shape
  keep = set()
  seen = np.zeros((h, w), bool)
  for y in range(h):
    for x in range(w):
      if seen[y, x]:
        continue
      value, size, queue = layer[y, x], 0, collections.deque([(y, x)])
      seen[y, x] = True
      while queue:
        cy, cx = queue.popleft()
        size += 1
        for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
          if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and layer[ny, nx] == value:
            seen[ny, nx] = True
            queue.append((ny, nx))
      if size >= min_size:
        keep.add(int(value))
  return np.where(np.isin(layer, np.array(sorted(keep), U)), layer, U(0))


def test_cleanup_matches_flood_fill_reference():
  rng = np.random.default_rng(0)
  for _ in range(4):
    coarse = rng.integers(0, 5, size=(6, 6)).astype(U) << U(30)
    layer = np.kron(coarse, np.ones((4, 4), U))  # 24x24, blocky
    layer[rng.random(layer.shape) < 0.05] = U(3)  # speckle
    np.testing.assert_array_equal(
        legacy_layers.remove_small_values(layer, 20), _reference_cleanup(layer, 20)
    )


def test_polygon_rasterised_with_pil_inclusive():
  h, w = 16, 16
  poly = [[2, 2, 11, 2, 11, 11, 2, 11]]
  wrong_rle_amodal = rect(h, w, 0, 0, 1, 1)  # the polygon must win
  ann = image(h, w, [inst(wrong_rle_amodal, polygons=poly)])
  layer = legacy_layers.encode_legacy_layers(ann)
  np.testing.assert_array_equal(layer, rect(h, w, 2, 2, 12, 12).astype(U))
  # Several polygons are drawn into one mask (union).
  mask = legacy_layers.rasterize_polygons(
      [[0, 0, 3, 0, 3, 3, 0, 3], [10, 10, 12, 10, 12, 12]], h, w
  )
  assert mask[:4, :4].all() and mask[10, 10] and mask.sum() > 16


def test_round_trip_and_byte_compatibility(tmp_path):
  h, w = 16, 24
  n = 32  # the most the format holds: bits 31 and 63 are used
  instances = [inst(np.zeros((h, w), bool))] * (n - 1) + [
      inst(rect(h, w, 0, 0, 16, 24), rect(h, w, 0, 0, 16, 8))
  ]
  instances[0] = inst(rect(h, w, 0, 8, 8, 24))
  ann = image(h, w, instances)
  path = str(tmp_path / 'img_x.npz')
  legacy_layers.write_legacy_layers(path, ann)
  expected = np.zeros((h, w), U)
  expected[:, 8:] = U(1) << U(31)
  expected[0:8, 8:24] |= U(1)
  expected[:, :8] = U(1) << U(63)
  with np.load(path) as data:
    assert data.files == ['layer']
    assert data['layer'].dtype == np.uint64
    np.testing.assert_array_equal(data['layer'], expected)
  ref = io.BytesIO()
  np.savez_compressed(ref, layer=expected)  # what the release called
  with open(path, 'rb') as f:
    assert f.read() == ref.getvalue()
  back = legacy_layers.read_legacy_layers(path)
  assert back['visible'].shape == (n, h, w)
  np.testing.assert_array_equal(back['visible'][0], rect(h, w, 0, 8, 8, 24))
  np.testing.assert_array_equal(back['visible'][31], rect(h, w, 0, 8, 16, 24))
  np.testing.assert_array_equal(back['invisible'][31], rect(h, w, 0, 0, 16, 8))
  np.testing.assert_array_equal(back['amodal'][31], np.ones((h, w), bool))
  assert not back['visible'][1:31].any() and not back['invisible'][:31].any()
  assert legacy_layers.read_legacy_layers(path, 2)['visible'].shape == (2, h, w)
  assert legacy_layers.legacy_path('/d/val2014', 'a/b.c.jpg') == '/d/val2014/a/b.c.npz'


def test_more_than_32_refused_and_bad_files(tmp_path):
  h, w = 8, 8
  ann = image(h, w, [inst(rect(h, w, 0, 0, 8, 8))] * 33)
  path = str(tmp_path / 'img_x.npz')
  with pytest.raises(AnnotationError, match='at most 32') as err:
    legacy_layers.write_legacy_layers(path, ann, source='gt.json')
  assert err.value.path == 'gt.json' and 'img_x.jpg' in err.value.field
  assert not os.listdir(tmp_path)
  with pytest.raises(AnnotationError, match='not found'):
    legacy_layers.read_legacy_layers(path)
  np.savez_compressed(path, labels=np.zeros((2, 2), U))
  with pytest.raises(AnnotationError, match='no array named') as err:
    legacy_layers.read_legacy_layers(path)
  assert err.value.field == 'layer'
