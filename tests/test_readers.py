"""Annotation readers on small fixtures in the real COCOA, COCOA-cls, D2SA and KINS
(2020 and original release) schemas.

Masks are checked against independent references: hand-made rectangles and
pycocotools' own polygon rasteriser.
"""

import copy
import json
import os
import shutil

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from input_pipeline import legacy_layers, readers, records
from input_pipeline.records import AnnotationError

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'annotations')
H, W = 40, 60


def rect(y1, x1, y2, x2):
  m = np.zeros((H, W), bool)
  m[y1:y2, x1:x2] = True
  return m


def poly_mask(polys):
  return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, H, W))).astype(bool)


def rle_json(m):
  """(H, W) bool -> COCO compressed RLE as it appears in the json files."""
  out = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
  return {'size': [int(v) for v in out['size']], 'counts': out['counts'].decode('ascii')}


def fixture(name):
  with open(os.path.join(FIXTURES, name)) as f:
    return json.load(f)


def write_images(images_dir, data, size=(W, H)):
  os.makedirs(images_dir, exist_ok=True)
  for img in data['images']:
    Image.new('RGB', size, (90, 120, 30)).save(os.path.join(images_dir, img['file_name']))


def dump(tmp_path, data, name='ann.json'):
  path = tmp_path / name
  path.write_text(json.dumps(data))
  return str(path)


def masks(inst):
  return (
      records.decode_rle(inst.amodal_rle),
      records.decode_rle(inst.visible_rle),
      records.decode_rle(inst.occluded_rle),
  )


# ------------------------------------------------------------------ COCOA
def test_cocoa_first_annotation_order_masks_and_constraints(tmp_path):
  data = fixture('cocoa_tiny.json')
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  stats = readers.ReadStats()
  anns = readers.load_cocoa(os.path.join(FIXTURES, 'cocoa_tiny.json'), images_dir, stats=stats)
  assert [a.image_id for a in anns] == [1, 3]
  assert (stats.num_images, stats.num_instances, stats.skipped_empty) == (2, 4, 1)
  a = anns[0]
  assert (a.file_name, a.height, a.width) == ('img_a.png', H, W)
  # File lists regions as order 2, 1, 3: they come back sorted by order.
  assert [i.name for i in a.instances] == ['person', 'dog', 'wall']
  assert [i.extra['region_index'] for i in a.instances] == [1, 0, 2]
  assert [i.depth_rank for i in a.instances] == [0, 1, 2]
  assert a.depth_pairs == [(0, 1), (1, 2)]  # "1-2,2-3" in order numbers
  assert [i.category_id for i in a.instances] == [1, 1, 1]
  assert [i.is_stuff for i in a.instances] == [False, False, True]
  person, dog, wall = a.instances
  # Flat polygon: pycocotools raster (a 20x20 square), raw polygon kept.
  amodal, visible, occluded = masks(person)
  np.testing.assert_array_equal(amodal, poly_mask([[10, 5, 30, 5, 30, 25, 10, 25]]))
  assert amodal.sum() == 400 and not occluded.any()
  np.testing.assert_array_equal(visible, amodal)
  assert person.amodal_polygons == [[10.0, 5.0, 30.0, 5.0, 30.0, 25.0, 10.0, 25.0]]
  # Compressed-RLE amodal with visible and invisible masks.
  amodal, visible, occluded = masks(dog)
  np.testing.assert_array_equal(amodal, rect(10, 20, 35, 45))
  np.testing.assert_array_equal(occluded, rect(10, 20, 26, 31))
  np.testing.assert_array_equal(visible, rect(10, 20, 35, 45) & ~rect(10, 20, 26, 31))
  assert dog.amodal_polygons is None
  assert dog.occlude_rate == pytest.approx(176 / 625)
  # Uncompressed-RLE amodal, invisible only: visible = amodal - invisible.
  amodal, visible, occluded = masks(wall)
  np.testing.assert_array_equal(amodal, rect(20, 40, 36, 56))
  np.testing.assert_array_equal(occluded, rect(20, 40, 35, 45))
  np.testing.assert_array_equal(visible, rect(20, 40, 36, 56) & ~rect(20, 40, 35, 45))
  assert visible.sum() == 256 - 75
  # Image 3: the first annotator pass (1 region), not the second (2 regions).
  c = anns[1]
  assert [i.name for i in c.instances] == ['cup'] and c.depth_pairs == []
  assert c.instances[0].extra['annotation_id'] == 11
  assert c.instances[0].amodal_polygons == [[2.0, 2.0, 20.0, 2.0, 20.0, 18.0, 2.0, 18.0]]
  assert isinstance(c.instances[0].amodal_rle['counts'], str)
  # The dense record decodes consistently.
  rec = records.to_record(a, images_dir)
  assert rec.amodal.shape == (3, H, W)
  np.testing.assert_array_equal(rec.depth_rank, [0, 1, 2])
  np.testing.assert_array_equal(rec.depth_pairs, [[0, 1], [1, 2]])


def test_cocoa_no_instance_cap_and_constraint_errors(tmp_path):
  data = fixture('cocoa_tiny.json')
  regions = [
      {
          'segmentation': [x, 0, x + 1, 0, x + 1, 1],
          'order': 40 - x,
          'name': f'r{x}',
          'isStuff': 0,
          'occlude_rate': 0.0,
      }
      for x in range(40)
  ]
  data['annotations'][0]['regions'] = regions
  data['annotations'][0]['depth_constraint'] = '1-40, 3-2'
  anns = readers.load_cocoa(dump(tmp_path, data))
  assert anns[0].num_instances == 40
  assert [i.extra['order'] for i in anns[0].instances] == list(range(1, 41))
  assert anns[0].depth_pairs == [(0, 39), (2, 1)]
  data['annotations'][0]['depth_constraint'] = '1-41'
  with pytest.raises(AnnotationError) as err:
    readers.load_cocoa(dump(tmp_path, data))
  assert err.value.field == 'annotations[0].depth_constraint'
  assert 'order 41' in str(err.value)


def test_cocoa_occlude_rate_computed_when_absent(tmp_path):
  data = fixture('cocoa_tiny.json')
  del data['annotations'][0]['regions'][0]['occlude_rate']  # the dog
  anns = readers.load_cocoa(dump(tmp_path, data))
  assert anns[0].instances[1].occlude_rate == pytest.approx(176 / 625)


def test_cocoa_visible_mask_is_read_and_rate_counts_hidden_object_pixels(tmp_path):
  """An annotated visible_mask is taken as is (not amodal - invisible); an
  invisible_mask spilling outside the amodal mask is kept as the occluded
  mask, but only its pixels on the object count in the computed rate."""
  data = fixture('cocoa_tiny.json')
  dog = data['annotations'][0]['regions'][0]  # amodal rect(10, 20, 35, 45)
  invisible = rect(4, 20, 26, 31)  # rows 4..9 lie above the dog
  visible = rect(12, 31, 35, 45)  # annotator's own visible part
  dog['invisible_mask'] = rle_json(invisible)
  dog['visible_mask'] = rle_json(visible)
  del dog['occlude_rate']
  anns = readers.load_cocoa(dump(tmp_path, data))
  amodal, got_visible, occluded = masks(anns[0].instances[1])
  np.testing.assert_array_equal(amodal, rect(10, 20, 35, 45))
  np.testing.assert_array_equal(got_visible, visible)
  np.testing.assert_array_equal(occluded, invisible)
  assert anns[0].instances[1].occlude_rate == pytest.approx(16 * 11 / 625)


# ------------------------------------------------------------------- D2SA
def test_d2sa_groups_sorts_and_derives(tmp_path):
  data = fixture('d2sa_tiny.json')
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  stats = readers.ReadStats()
  anns = readers.load_d2sa(os.path.join(FIXTURES, 'd2sa_tiny.json'), images_dir, stats=stats)
  assert [a.image_id for a in anns] == [1, 2]
  assert stats.skipped_empty == 1 and stats.num_instances == 4
  a = anns[0]
  assert [i.extra['annotation_id'] for i in a.instances] == [102, 103, 100]
  assert [i.depth_rank for i in a.instances] == [0, 1, 2]
  assert [i.category_id for i in a.instances] == [7, 5, 5]
  assert [i.name for i in a.instances] == ['banana', 'apple', 'apple']
  assert a.instances[0].extra['order'] == 1  # from amodal_region
  assert a.depth_pairs == [(0, 1), (0, 2), (1, 2)]  # overlapping pairs
  # No invisible_mask: occluded = amodal & ~visible; rate computed.
  amodal, visible, occluded = masks(a.instances[1])
  np.testing.assert_array_equal(amodal, rect(10, 10, 30, 30))
  np.testing.assert_array_equal(occluded, rect(10, 10, 12, 12))
  assert a.instances[1].occlude_rate == pytest.approx(4 / 400)
  assert not a.instances[1].extra['invisible_annotated']
  # With invisible_mask.
  _, visible, occluded = masks(a.instances[2])
  np.testing.assert_array_equal(occluded, rect(5, 5, 15, 15))
  assert a.instances[2].occlude_rate == 0.25
  # Polygon amodal (list of lists) on image 2.
  amodal, _, _ = masks(anns[1].instances[0])
  np.testing.assert_array_equal(amodal, poly_mask([[10, 10, 30, 10, 30, 30, 10, 30]]))
  assert anns[1].instances[0].amodal_polygons == [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]


def test_d2sa_equal_depths_keep_file_order(tmp_path):
  data = fixture('d2sa_tiny.json')
  for ann in data['annotations']:
    ann['occl_depth'] = 3
  anns = readers.load_d2sa(dump(tmp_path, data))
  assert [i.extra['annotation_id'] for i in anns[0].instances] == [100, 102, 103]
  assert [i.depth_rank for i in anns[0].instances] == [0, 0, 0]
  assert anns[0].depth_pairs == []


def test_d2sa_depth_pairs_need_overlap_and_region_name_wins(tmp_path):
  """A pair needs different occl_depth AND overlapping amodal masks; the
  amodal_region's name is preferred over the category's."""
  data = fixture('d2sa_tiny.json')
  apart = rect(30, 45, 38, 55)  # touches no other object
  data['annotations'].append(
      {
          'id': 104,
          'image_id': 1,
          'category_id': 5,
          'iscrowd': 0,
          'area': 80,
          'segmentation': rle_json(apart),
          'visible_mask': rle_json(apart),
          'occl_depth': 1,
          'amodal_region': {'name': 'pear', 'order': 3},
      }
  )
  a = readers.load_d2sa(dump(tmp_path, data))[0]
  # Depths 0, 1, 1 (file order kept), 2.
  assert [i.extra['annotation_id'] for i in a.instances] == [102, 103, 104, 100]
  assert [i.depth_rank for i in a.instances] == [0, 1, 1, 2]
  amodal = [masks(i)[0] for i in a.instances]
  np.testing.assert_array_equal(amodal[2], apart)
  depth = [0, 1, 1, 2]
  expected = [
      (p, q)
      for p in range(4)
      for q in range(4)
      if depth[p] < depth[q] and (amodal[p] & amodal[q]).any()
  ]
  assert expected == [(0, 1), (0, 3), (1, 3)]
  assert a.depth_pairs == expected
  assert [i.name for i in a.instances] == ['banana', 'apple', 'pear', 'apple']


# -------------------------------------------------------------- COCOA-cls
# The fixture's geometry, rebuilt here from rectangles and polygons.
PERSON_POLY = [[5, 5, 25, 5, 25, 25, 5, 25]]
CHAIR_POLY = [[40, 25, 58, 25, 58, 38, 40, 38]]
BRUSH_POLY = [[2, 2, 20, 2, 20, 12, 2, 12]]


def test_cocoa_cls_classes_masks_and_derived_depth(tmp_path):
  data = fixture('cocoa_cls_tiny.json')
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  path = os.path.join(FIXTURES, 'cocoa_cls_tiny.json')
  stats = readers.ReadStats()
  anns = readers.load_cocoa_cls(path, images_dir, stats=stats)
  assert [a.image_id for a in anns] == [139, 285]
  assert (stats.num_images, stats.num_instances, stats.skipped_empty) == (2, 5, 1)
  a = anns[0]
  # File order (chair, person, dog) is kept; COCO's sparse ids and names.
  assert [i.category_id for i in a.instances] == [62, 1, 18]
  assert [i.name for i in a.instances] == ['chair', 'person', 'dog']
  assert [i.extra['annotation_id'] for i in a.instances] == [3, 1, 2]
  assert not any(i.is_stuff for i in a.instances)
  person, dog, chair = poly_mask(PERSON_POLY), rect(15, 15, 35, 45), poly_mask(CHAIR_POLY)
  expected = [  # (amodal, visible, occluded)
      (chair, chair & ~dog, chair & dog),
      (person, person, np.zeros((H, W), bool)),
      (dog, dog & ~person, dog & person),
  ]
  for inst, (amodal, visible, occluded) in zip(a.instances, expected):
    got = masks(inst)
    np.testing.assert_array_equal(got[0], amodal)
    np.testing.assert_array_equal(got[1], visible)
    np.testing.assert_array_equal(got[2], occluded)
    assert inst.occlude_rate == pytest.approx(occluded.sum() / amodal.sum())
  assert (chair & dog).any() and (dog & person).any() and not (chair & person).any()
  assert a.instances[0].amodal_polygons == [[float(v) for v in CHAIR_POLY[0]]]
  assert a.instances[2].amodal_polygons is None  # an RLE in the file
  # No depth in the file: derived from the masks (person > dog > chair).
  assert [i.depth_rank for i in a.instances] == [2, 0, 1]
  assert a.depth_pairs == [(1, 2), (2, 0)]
  # Image 285: a polygon visible_mask; a cup with only an invisible_mask and
  # no occlude_rate (visible = amodal - invisible, rate computed).
  b = anns[1]
  assert [i.category_id for i in b.instances] == [90, 47]
  brush, cup, hidden = poly_mask(BRUSH_POLY), rect(20, 30, 36, 50), rect(20, 30, 26, 40)
  np.testing.assert_array_equal(masks(b.instances[0])[1], brush)
  got = masks(b.instances[1])
  np.testing.assert_array_equal(got[1], cup & ~hidden)
  np.testing.assert_array_equal(got[2], hidden)
  assert b.instances[1].occlude_rate == pytest.approx(60 / 320)
  assert [i.depth_rank for i in b.instances] == [0, 0] and b.depth_pairs == []
  assert readers.load_annotations('cocoa_cls', path, images_dir) == anns


def test_cocoa_cls_occl_depth_when_present_orders_like_d2sa(tmp_path):
  data = fixture('cocoa_cls_tiny.json')
  for ann, depth in zip(data['annotations'][:3], [2, 0, 1]):  # chair, person, dog
    ann['occl_depth'] = depth
  a = readers.load_cocoa_cls(dump(tmp_path, data))[0]
  assert [i.name for i in a.instances] == ['person', 'dog', 'chair']
  assert [i.extra['occl_depth'] for i in a.instances] == [0, 1, 2]
  assert [i.depth_rank for i in a.instances] == [0, 1, 2]
  assert a.depth_pairs == [(0, 1), (1, 2)]  # person and chair do not overlap
  del data['annotations'][2]['occl_depth']
  with pytest.raises(AnnotationError, match='other annotations of image') as err:
    readers.load_cocoa_cls(dump(tmp_path, data))
  assert err.value.field == 'annotations[2].occl_depth'


# ------------------------------------------------------------------- KINS
def test_kins_derives_order_for_three_objects(tmp_path):
  data = fixture('kins_tiny.json')
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  stats = readers.ReadStats()
  anns = readers.load_kins(os.path.join(FIXTURES, 'kins_tiny.json'), images_dir, stats=stats)
  assert len(anns) == 1 and stats.skipped_empty == 1
  a = anns[0]
  # File order C (back), A (front), B (middle) is kept; order is derived.
  assert [i.extra['id'] for i in a.instances] == [1, 2, 3]
  assert [i.depth_rank for i in a.instances] == [2, 0, 1]
  assert a.depth_pairs == [(1, 2), (2, 0)]
  # The derived order agrees with the file's own relative occlusion order.
  assert [i.depth_rank + 1 for i in a.instances] == [i.extra['ico_id'] for i in a.instances]
  assert [i.name for i in a.instances] == ['van', 'car', 'car']
  assert [i.category_id for i in a.instances] == [7, 4, 4]
  for inst, ann in zip(a.instances, data['annotations']):
    amodal, visible, occluded = masks(inst)
    np.testing.assert_array_equal(amodal, poly_mask(ann['a_segm']))
    np.testing.assert_array_equal(visible, poly_mask(ann['i_segm']))
    np.testing.assert_array_equal(occluded, amodal & ~visible)
    assert inst.occlude_rate == pytest.approx(occluded.sum() / amodal.sum())
  assert a.instances[1].occlude_rate == 0.0


def test_kins_2019_keys_read_like_2020_ones(tmp_path):
  """The 2019 files name the masks segmentation (amodal) / inmodal_seg."""
  data = fixture('kins_tiny.json')
  for ann in data['annotations']:
    ann['segmentation'] = ann.pop('a_segm')
    ann['inmodal_seg'] = ann.pop('i_segm')
  old = readers.load_kins(dump(tmp_path, data))
  new = readers.load_kins(os.path.join(FIXTURES, 'kins_tiny.json'))
  for inst, ann in zip(old[0].instances, data['annotations']):
    amodal, visible, _ = masks(inst)
    np.testing.assert_array_equal(amodal, poly_mask(ann['segmentation']))
    np.testing.assert_array_equal(visible, poly_mask(ann['inmodal_seg']))
  assert old == new


def test_derive_depth_order_breaks_cycles_by_overlap():
  def masks_from(pix, n):
    out = np.zeros((n, 1, 64), bool)
    for i, cols in pix.items():
      out[i, 0, cols] = True
    return out

  # A covers 10 px of B's hidden part; B covers 3 px of A's: A wins.
  vis = masks_from({0: list(range(10)), 1: list(range(20, 23))}, 2)
  occ = masks_from({1: list(range(10)), 0: list(range(20, 23))}, 2)
  pairs, rank = readers.derive_depth_order(vis, occ)
  assert pairs == [(0, 1)] and rank.tolist() == [0, 1]
  # Three-cycle A>B (10), B>C (8), C>A (5): the weakest edge C>A is dropped.
  vis = masks_from({0: list(range(0, 10)), 1: list(range(10, 18)), 2: list(range(18, 23))}, 4)
  occ = masks_from({1: list(range(0, 10)), 2: list(range(10, 18)), 0: list(range(18, 23))}, 4)
  pairs, rank = readers.derive_depth_order(vis, occ)
  assert pairs == [(0, 1), (1, 2)]
  assert rank.tolist() == [0, 1, 2, 0]  # instance 3 overlaps nothing
  pairs, rank = readers.derive_depth_order(np.zeros((0, 2, 2), bool), np.zeros((0, 2, 2), bool))
  assert pairs == [] and rank.shape == (0,)


def test_kins_2020_release_eight_classes(tmp_path):
  """update_{train,test}_2020.json: a_segm / i_segm polygons, oco_id / ico_id,
  eight categories (3 = rider)."""
  data = fixture('kins_update_2020_tiny.json')
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  path = os.path.join(FIXTURES, 'kins_update_2020_tiny.json')
  stats = readers.ReadStats()
  anns = readers.load_annotations('kins', path, images_dir, stats=stats)
  assert [a.image_id for a in anns] == [1, 2] and stats.skipped_empty == 1
  a = anns[0]
  assert [i.category_id for i in a.instances] == [7, 3, 4]
  assert [i.name for i in a.instances] == ['van', 'rider', 'car']
  for inst, ann in zip(a.instances, data['annotations']):
    amodal, visible, occluded = masks(inst)
    np.testing.assert_array_equal(amodal, poly_mask(ann['a_segm']))
    np.testing.assert_array_equal(visible, poly_mask(ann['i_segm']))
    np.testing.assert_array_equal(occluded, amodal & ~visible)
  assert [i.depth_rank for i in a.instances] == [2, 0, 1]
  assert a.depth_pairs == [(1, 2), (2, 0)]
  # Within the cluster, the derived ranks follow the file's ico_id.
  assert [i.extra['ico_id'] - 1 for i in a.instances] == [2, 0, 1]
  (lone,) = anns[1].instances
  assert (lone.category_id, lone.depth_rank, lone.extra['ico_id']) == (8, 0, 0)
  cats = readers.load_categories('kins', path)
  assert [c['id'] for c in cats] == list(range(1, 9))
  assert cats[2] == {'id': 3, 'name': 'rider'}


def test_kins_original_release_seven_classes(tmp_path):
  """instances_{train,val}.json: segmentation (amodal polygons), inmodal_seg
  (visible RLE), bbox / inmodal_bbox, seven categories (no 3); the same
  scene as the 2020 fixture reads to the same masks and order."""
  data = fixture('kins_instances_tiny.json')
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  path = os.path.join(FIXTURES, 'kins_instances_tiny.json')
  anns = readers.load_annotations('kins', path, images_dir)
  assert [a.image_id for a in anns] == [1, 2]
  a = anns[0]
  assert [i.category_id for i in a.instances] == [7, 2, 4]
  assert [i.name for i in a.instances] == ['van', 'pedestrian', 'car']
  assert all(isinstance(ann['inmodal_seg'], dict) for ann in data['annotations'])
  same_scene = fixture('kins_update_2020_tiny.json')['annotations']
  for inst, ann, new in zip(a.instances, data['annotations'], same_scene):
    amodal, visible, occluded = masks(inst)
    np.testing.assert_array_equal(amodal, poly_mask(ann['segmentation']))
    np.testing.assert_array_equal(visible, poly_mask(new['i_segm']))
    np.testing.assert_array_equal(occluded, amodal & ~visible)
    assert inst.amodal_polygons == [[float(v) for v in ann['segmentation'][0]]]
    assert 'ico_id' not in inst.extra
  assert [i.depth_rank for i in a.instances] == [2, 0, 1]
  assert a.depth_pairs == [(1, 2), (2, 0)]
  cats = readers.load_categories('kins', path)
  assert [c['id'] for c in cats] == [1, 2, 4, 5, 6, 7, 8]
  assert {c['name'] for c in cats} == {
      'cyclist',
      'pedestrian',
      'car',
      'tram',
      'truck',
      'van',
      'misc',
  }


# ------------------------------------------------------------- categories
def test_load_categories_sorted_by_id_and_classless_formats(tmp_path):
  cats = readers.load_categories('cocoa_cls', os.path.join(FIXTURES, 'cocoa_cls_tiny.json'))
  assert cats == [
      {'id': 1, 'name': 'person'},
      {'id': 18, 'name': 'dog'},
      {'id': 47, 'name': 'cup'},
      {'id': 62, 'name': 'chair'},
      {'id': 90, 'name': 'toothbrush'},
  ]
  assert readers.load_categories('d2sa', os.path.join(FIXTURES, 'd2sa_tiny.json')) == [
      {'id': 5, 'name': 'apple'},
      {'id': 7, 'name': 'banana'},
  ]
  for fmt in ('cocoa', 'release'):
    cats = readers.load_categories(fmt, os.path.join(FIXTURES, 'cocoa_tiny.json'))
    assert cats == [{'id': 1, 'name': 'object'}]
  # The COCOA records carry that one id.
  cocoa = readers.load_cocoa(os.path.join(FIXTURES, 'cocoa_tiny.json'))
  assert {i.category_id for a in cocoa for i in a.instances} == {1}
  with pytest.raises(AnnotationError, match='unknown annotation format'):
    readers.load_categories('lvis', os.path.join(FIXTURES, 'd2sa_tiny.json'))


def _bad_categories():
  def with_cats(fn):
    data = fixture('cocoa_cls_tiny.json')
    fn(data['categories'])
    return data

  def drop(data):
    del data['categories']
    return data

  return {
      'not_object': (with_cats(lambda c: c.__setitem__(1, 'person')), 'categories[1]', 'object'),
      'no_id': (with_cats(lambda c: c[0].pop('id')), 'categories[0].id', 'missing'),
      'str_id': (with_cats(lambda c: c[2].update(id='90')), 'categories[2].id', 'integer'),
      'bool_id': (with_cats(lambda c: c[2].update(id=True)), 'categories[2].id', 'integer'),
      'no_name': (with_cats(lambda c: c[3].pop('name')), 'categories[3].name', 'missing'),
      'dup_id': (with_cats(lambda c: c[4].update(id=62)), 'categories[4].id', 'duplicate'),
      'missing': (drop(fixture('cocoa_cls_tiny.json')), 'categories', 'missing'),
      'not_list': (
          {**fixture('cocoa_cls_tiny.json'), 'categories': {'1': 'person'}},
          'categories',
          'expected a list',
      ),
  }


@pytest.mark.parametrize('case', sorted(_bad_categories()))
def test_load_categories_malformed_names_file_and_field(tmp_path, case):
  data, field, words = _bad_categories()[case]
  path = dump(tmp_path, data)
  with pytest.raises(AnnotationError) as err:
    readers.load_categories('cocoa_cls', path)
  assert err.value.path == path and err.value.field == field
  assert words in err.value.message and '\n' not in str(err.value)


# ---------------------------------------------------------------- release
def test_release_folder_and_legacy_layers(tmp_path):
  data = fixture('cocoa_tiny.json')
  root = tmp_path / 'COCO'
  os.makedirs(root / 'annotations')
  shutil.copy(
      os.path.join(FIXTURES, 'cocoa_tiny.json'), root / 'annotations' / 'COCO_amodal_val2014.json'
  )
  images_dir = str(root / 'val2014')
  write_images(images_dir, data)
  direct = readers.load_cocoa(os.path.join(FIXTURES, 'cocoa_tiny.json'))
  for ann in direct:
    legacy_layers.write_legacy_layers(legacy_layers.legacy_path(images_dir, ann.file_name), ann)
  stats = readers.ReadStats()
  anns = readers.load_release(str(root), 'val', stats=stats)
  assert stats.skipped_empty == 1
  assert [a.image_id for a in anns] == [1, 3]
  assert [[i.amodal_rle for i in a.instances] for a in anns] == [
      [i.amodal_rle for i in a.instances] for a in direct
  ]
  via_fmt = readers.load_annotations(
      'release', str(root / 'annotations' / 'COCO_amodal_val2014.json')
  )
  assert [a.depth_pairs for a in via_fmt] == [a.depth_pairs for a in anns]
  json_path, found_dir = readers.release_paths(str(root), 'val')
  assert found_dir == images_dir and json_path.endswith('COCO_amodal_val2014.json')
  layers = legacy_layers.read_legacy_layers(
      legacy_layers.legacy_path(images_dir, anns[0].file_name), anns[0].num_instances
  )
  dog = anns[0].instances[1]
  assert dog.extra['region_index'] == 0  # first in the regions list
  np.testing.assert_array_equal(layers['invisible'][0], records.decode_rle(dog.occluded_rle))
  with pytest.raises(AnnotationError):
    readers.load_release(str(root), 'train')
  # A missing image of the release folder is reported by name.
  os.remove(os.path.join(images_dir, 'img_c.jpg'))
  with pytest.raises(AnnotationError, match='img_c.jpg'):
    readers.load_release(str(root), 'val')


# ----------------------------------------------------------------- errors
def _bad_cases():
  def cocoa(fn):
    data = fixture('cocoa_tiny.json')
    fn(data)
    return 'cocoa', data

  def region(data, j=0):
    return data['annotations'][0]['regions'][j]

  def set_size(data):
    region(data)['invisible_mask']['size'] = [41, 60]

  def short_poly(data):
    region(data, 1)['segmentation'] = [10, 5, 30, 5]

  def no_order(data):
    del region(data, 2)['order']

  def no_height(data):
    del data['images'][1]['height']

  def zero_height(data):
    data['images'][0]['height'] = 0

  def bad_counts(data):
    region(data, 2)['segmentation']['counts'][0] += 1

  def unknown_image(data):
    data['annotations'][1]['image_id'] = 99

  def kins_no_visible():
    data = fixture('kins_tiny.json')
    del data['annotations'][2]['i_segm']
    return 'kins', data

  def cocoa_cls_no_category():
    data = fixture('cocoa_cls_tiny.json')
    del data['annotations'][1]['category_id']
    return 'cocoa_cls', data

  def cocoa_cls_visible_size():
    data = fixture('cocoa_cls_tiny.json')
    data['annotations'][2]['visible_mask']['size'] = [40, 61]
    return 'cocoa_cls', data

  def d2sa_no_depth():
    data = fixture('d2sa_tiny.json')
    del data['annotations'][3]['occl_depth']
    return 'd2sa', data

  return {
      'rle_size': (cocoa(set_size), 'annotations[0].regions[0].invisible_mask.size', 'disagrees'),
      'short_polygon': (
          cocoa(short_poly),
          'annotations[0].regions[1].segmentation',
          'fewer than 3 points',
      ),
      'no_order': (cocoa(no_order), 'annotations[0].regions[2].order', 'missing'),
      'no_height': (cocoa(no_height), 'images[1].height', 'missing'),
      'zero_height': (cocoa(zero_height), 'images[0].height', 'non-positive size'),
      'bad_counts': (cocoa(bad_counts), 'annotations[0].regions[2].segmentation.counts', 'sum'),
      'unknown_image': (cocoa(unknown_image), 'annotations[1].image_id', '99'),
      'kins_no_visible': (kins_no_visible(), 'annotations[2].i_segm', 'missing'),
      'd2sa_no_depth': (d2sa_no_depth(), 'annotations[3].occl_depth', 'missing'),
      'cocoa_cls_no_category': (
          cocoa_cls_no_category(),
          'annotations[1].category_id',
          'missing',
      ),
      'cocoa_cls_visible_size': (
          cocoa_cls_visible_size(),
          'annotations[2].visible_mask.size',
          'disagrees',
      ),
  }


@pytest.mark.parametrize('case', sorted(_bad_cases()))
def test_bad_input_names_file_and_field(tmp_path, case):
  (fmt, data), field, words = _bad_cases()[case]
  path = dump(tmp_path, data)
  with pytest.raises(AnnotationError) as err:
    readers.load_annotations(fmt, path)
  assert err.value.path == path and err.value.field == field
  assert words in err.value.message and '\n' not in str(err.value)


def test_malformed_json_and_missing_files(tmp_path):
  path = tmp_path / 'bad.json'
  path.write_text('{"images": [\n  {"id": 1,,}]}')
  with pytest.raises(AnnotationError, match='line 2 column 12') as err:
    readers.load_cocoa(str(path))
  assert err.value.field == 'json'
  with pytest.raises(AnnotationError, match='not found'):
    readers.load_kins(str(tmp_path / 'absent.json'))
  with pytest.raises(AnnotationError, match='unknown annotation format'):
    readers.load_annotations('lvis', str(path))
  # An image missing from images_dir is named; a wrong-size image too.
  data = fixture('d2sa_tiny.json')
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  os.remove(os.path.join(images_dir, 'img_b.png'))
  with pytest.raises(AnnotationError, match='img_b.png') as err:
    readers.load_d2sa(dump(tmp_path, data), images_dir)
  assert err.value.field == 'images[1].file_name'
  write_images(images_dir, data, size=(W, H + 1))
  with pytest.raises(AnnotationError, match='disagrees with image file img_a.png'):
    readers.load_d2sa(dump(tmp_path, data), images_dir)


def test_corrupt_compressed_rle_is_refused(tmp_path):
  data = copy.deepcopy(fixture('cocoa_tiny.json'))
  region = data['annotations'][0]['regions'][0]
  region['segmentation']['counts'] = region['segmentation']['counts'] + '!'
  with pytest.raises(AnnotationError, match='invalid RLE') as err:
    readers.load_cocoa(dump(tmp_path, data))
  assert err.value.field == 'annotations[0].regions[0].segmentation.counts'


@pytest.mark.parametrize('fmt', ['cocoa', 'cocoa_cls', 'd2sa', 'kins'])
def test_keep_empty_keeps_every_image_in_file_order(tmp_path, fmt):
  """Evaluation ground truth: images without objects stay, with no instances
  and their size, so detections on them can count as false positives."""
  name = f'{fmt}_tiny.json'
  data = fixture(name)
  images_dir = str(tmp_path / 'images')
  write_images(images_dir, data)
  path = os.path.join(FIXTURES, name)
  stats = readers.ReadStats()
  kept = readers.load_annotations(fmt, path, images_dir, stats=stats, keep_empty=True)
  default = readers.load_annotations(fmt, path, images_dir)
  assert [a.image_id for a in kept] == [img['id'] for img in data['images']]
  by_id = {a.image_id: a for a in default}
  empty = [a for a in kept if a.image_id not in by_id]
  assert len(empty) == stats.skipped_empty == 1
  img = next(i for i in data['images'] if i['id'] == empty[0].image_id)
  assert (empty[0].height, empty[0].width, empty[0].file_name) == (
      img['height'],
      img['width'],
      img['file_name'],
  )
  assert empty[0].instances == [] and list(empty[0].depth_pairs) == []
  for a in kept:
    if a.image_id in by_id:
      assert a == by_id[a.image_id]
  os.remove(os.path.join(images_dir, img['file_name']))
  with pytest.raises(AnnotationError, match=img['file_name']):
    readers.load_annotations(fmt, path, images_dir, keep_empty=True)
