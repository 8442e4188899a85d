"""Tests of input_pipeline/tfds_builders.py on tiny files in the real schemas."""

import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import cocoa_cls, default
from input_pipeline import pipeline, readers, records, tfds_builders
from sln_jax import errors, semdist

H, W = 24, 32


def _rect(y1, x1, y2, x2):
  m = np.zeros((H, W), bool)
  m[y1:y2, x1:x2] = True
  return m


def _poly(y1, x1, y2, x2):
  """Polygon of the rectangle's outline (pycocotools rasterises it to about
  the same pixels; the test compares against the reader's own masks)."""
  return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _write_image(path, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def _images(names):
  return [{'id': i + 1, 'file_name': n, 'height': H, 'width': W} for i, n in enumerate(names)]


def _write_cocoa(root, split='val'):
  """Image 1: two regions (2 occludes... 1 in front of 2); image 2: none."""
  names = [f'COCO_{split}2014_000001.jpg', f'COCO_{split}2014_000002.jpg']
  for k, n in enumerate(names):
    _write_image(os.path.join(root, f'{split}2014', n), k)
  front, back = _rect(2, 2, 14, 16), _rect(8, 10, 22, 30)
  invis = back & front
  regions = [
      {
          'segmentation': _poly(8, 10, 22, 30)[0],
          'name': 'b',
          'area': 280.0,
          'isStuff': 1,
          'occlude_rate': float(invis.sum() / back.sum()),
          'order': 2,
          'visible_mask': records.encode_mask(back & ~front),
          'invisible_mask': records.encode_mask(invis),
      },
      {
          'segmentation': _poly(2, 2, 14, 16)[0],
          'name': 'a',
          'area': 168.0,
          'isStuff': 0,
          'occlude_rate': 0.0,
          'order': 1,
      },
  ]
  data = {
      'images': _images(names),
      'annotations': [
          {'id': 1, 'image_id': 1, 'size': 2, 'depth_constraint': '1-2', 'regions': regions}
      ],
  }
  path = os.path.join(root, 'annotations', f'COCO_amodal_{split}2014.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)
  return path


def _write_d2sa(root):
  names = ['D2S_000100.jpg', 'D2S_000200.jpg']
  for k, n in enumerate(names):
    _write_image(os.path.join(root, 'images', n), k)
  a, b = _rect(3, 3, 15, 20), _rect(10, 12, 20, 28)
  anns = []
  for i, (img, m, vis, depth, cat) in enumerate(
      [(1, b, b & ~a, 2, 7), (1, a, a, 1, 5), (2, b, b, 1, 9)]
  ):
    ann = {
        'id': i + 1,
        'image_id': img,
        'category_id': cat,
        'iscrowd': 0,
        'segmentation': records.encode_mask(m),
        'area': float(m.sum()),
        'bbox': [0, 0, 1, 1],
        'visible_mask': records.encode_mask(vis),
        'occlude_rate': float(1 - vis.sum() / m.sum()),
        'occl_depth': depth,
    }
    if (m & ~vis).any():
      ann['invisible_mask'] = records.encode_mask(m & ~vis)
    anns.append(ann)
  data = {
      'images': _images(names),
      'annotations': anns,
      'categories': [{'id': c, 'name': f'c{c}'} for c in (5, 7, 9)],
  }
  path = os.path.join(root, 'annotations', 'D2S_amodal_validation.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)
  return path


def _write_kins(root):
  names = ['000001.png']
  _write_image(os.path.join(root, 'testing', 'image_2', names[0]), 3)
  anns = [
      {
          'id': 1,
          'image_id': 1,
          'category_id': 1,
          'iscrowd': 0,
          'a_segm': _poly(2, 2, 14, 16),
          'i_segm': _poly(2, 2, 14, 16),
          'a_bbox': [2, 2, 14, 12],
          'i_bbox': [2, 2, 14, 12],
          'a_area': 168,
          'i_area': 168,
          'oco_id': 0,
          'ico_id': 0,
      },
      {
          'id': 2,
          'image_id': 1,
          'category_id': 2,
          'iscrowd': 0,
          'a_segm': _poly(8, 10, 22, 30),
          'i_segm': [[16, 8, 30, 8, 30, 22, 10, 22, 10, 14, 16, 14]],
          'a_bbox': [10, 8, 20, 14],
          'i_bbox': [10, 8, 20, 14],
          'a_area': 280,
          'i_area': 244,
          'oco_id': 0,
          'ico_id': 0,
      },
  ]
  data = {
      'images': _images(names),
      'annotations': anns,
      'categories': [{'id': 1, 'name': 'car'}, {'id': 2, 'name': 'ped'}],
  }
  path = os.path.join(root, 'annotations', 'update_test_2020.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)
  return path


def _write_cocoa_cls(root, split='val'):
  """COCOA-cls layout: image 1 holds a dog (18) hidden behind a person (1)
  and a toothbrush (90) apart; image 2 has none. The file lists the dog
  first and gives no depth order."""
  names = [f'COCO_{split}2014_000011.jpg', f'COCO_{split}2014_000012.jpg']
  for k, n in enumerate(names):
    _write_image(os.path.join(root, f'{split}2014', n), k + 5)
  person, dog, brush = _rect(2, 2, 14, 16), _rect(8, 10, 22, 24), _rect(16, 26, 23, 31)
  hidden = dog & person

  def ann(i, cat, m, segm, visible, invisible=None):
    out = {
        'id': i,
        'image_id': 1,
        'category_id': cat,
        'iscrowd': 0,
        'segmentation': segm,
        'bbox': [0, 0, 1, 1],
        'area': float(m.sum()),
        'visible_mask': records.encode_mask(visible),
        'occlude_rate': float(0 if invisible is None else invisible.sum() / m.sum()),
    }
    if invisible is not None:
      out['invisible_mask'] = records.encode_mask(invisible)
    return out

  data = {
      'images': _images(names),
      'annotations': [
          ann(7, 18, dog, records.encode_mask(dog), dog & ~person, hidden),
          ann(8, 1, person, records.encode_mask(person), person),
          ann(9, 90, brush, records.encode_mask(brush), brush),
      ],
      'categories': [
          {'supercategory': 'person', 'id': 1, 'name': 'person'},
          {'supercategory': 'animal', 'id': 18, 'name': 'dog'},
          {'supercategory': 'indoor', 'id': 90, 'name': 'toothbrush'},
      ],
  }
  path = os.path.join(root, 'annotations', f'COCO_amodal_{split}2014_with_classes.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)
  return path


def _config(name, tmp_path, manual):
  c = default.get_config()
  c.dataset.name = name
  c.dataset.data_dir = str(tmp_path / 'tfds')
  c.dataset.manual_dir = str(manual)
  return c


def _check_examples(builder, split, ann_path, images_dir, fmt):
  """Every stored example equals what the reader + semdist give directly."""
  expected = {a.image_id: a for a in readers.load_annotations(fmt, ann_path, images_dir)}
  got = list(tfds.as_numpy(builder.as_dataset(split=split)))
  assert len(got) == len(expected)
  for ex in got:
    ann = expected[int(ex['image_id'])]
    rec = records.to_record(ann, images_dir)
    index = semdist.layer_index_map(rec.amodal, rec.occluded, rec.depth_rank)
    inst = ex['instances']
    np.testing.assert_array_equal(inst['layer_index'], index)
    np.testing.assert_array_equal(inst['layer_index'] > 0, rec.amodal)
    np.testing.assert_array_equal(
        inst['layer_index'] == 1, rec.amodal & ~(rec.occluded & rec.amodal)
    )
    for i, m in enumerate(rec.amodal):
      ys, xs = np.nonzero(m)
      np.testing.assert_array_equal(
          inst['bbox'][i], [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
      )
    np.testing.assert_array_equal(inst['depth_rank'], rec.depth_rank)
    np.testing.assert_allclose(inst['occlude_rate'], rec.occlude_rate)
    np.testing.assert_array_equal(inst['is_stuff'], rec.is_stuff)
    np.testing.assert_array_equal(inst['category_id'], rec.category_id)
    assert ex['file_name'].decode() == ann.file_name
    assert (ex['height'], ex['width']) == (H, W)
    with Image.open(os.path.join(images_dir, ann.file_name)) as im:
      pixels = np.asarray(im.convert('RGB'))
    if ann.file_name.endswith('.png'):
      np.testing.assert_array_equal(ex['image'], pixels)
    else:  # JPEG: decoders may differ by a little
      assert np.abs(ex['image'].astype(int) - pixels).mean() < 2
  return got


def test_cocoa_builder(tmp_path, capsys):
  manual = tmp_path / 'cocoa'
  ann = _write_cocoa(str(manual), 'val')
  builder = tfds_builders.build_dataset(_config('cocoa', tmp_path, manual))
  out = capsys.readouterr().out
  assert f'preparing dataset cocoa into {builder.data_dir}' in out
  assert 'dataset cocoa prepared: val 1 examples' in out and 'Unknown size' not in out
  assert set(builder.info.splits) == {'val'}  # train/test files absent
  got = _check_examples(builder, 'val', ann, str(manual / 'val2014'), 'cocoa')
  assert len(got) == 1  # image 2 has no instances: skipped
  # Regions sorted by order: 'a' (front) first, 'b' hidden behind it.
  inst = got[0]['instances']
  np.testing.assert_array_equal(inst['depth_rank'], [0, 1])
  np.testing.assert_array_equal(inst['is_stuff'], [False, True])
  assert (inst['layer_index'][1] == 2).sum() > 0
  assert builder.info.metadata['num_instances'] == {'val': [2]}
  # A second call reuses the prepared dataset.
  again = tfds_builders.build_dataset(_config('cocoa', tmp_path, manual))
  assert again is not builder and again.info.splits['val'].num_examples == 1
  assert again.info.metadata['num_instances'] == {'val': [2]}  # persisted


def test_prepared_dataset_refuses_changed_annotations(tmp_path):
  """A dataset prepared from one annotation file is not reused once that file
  changes or a split file is added (training would read the old examples and
  evaluation the new ground truth); a copy with a new mtime but the same
  bytes, or a manual_dir that is gone, is fine."""
  manual = tmp_path / 'cocoa'
  ann = _write_cocoa(str(manual), 'val')
  config = _config('cocoa', tmp_path, manual)
  builder = tfds_builders.build_dataset(config)
  recorded = builder.info.metadata['sources']['val']
  assert recorded['file'] == 'COCO_amodal_val2014.json'
  assert recorded['size'] == os.path.getsize(ann)
  text = open(ann).read()
  os.utime(ann, ns=(1, 1))  # same bytes, other mtime: hashed, accepted
  tfds_builders.build_dataset(config)
  with open(ann, 'w') as f:
    f.write(text.replace('"name": "b"', '"name": "c"'))
  with pytest.raises(errors.UserError) as err:
    tfds_builders.build_dataset(config)
  message = str(err.value)
  assert message.startswith(f'{manual}: dataset.manual_dir: the dataset prepared in ')
  assert 'val: COCO_amodal_val2014.json has changed' in message
  assert f'remove {builder.data_dir} to rebuild it' in message
  with open(ann, 'w') as f:
    f.write(text)
  _write_cocoa(str(manual), 'train')
  with pytest.raises(errors.UserError, match='train: COCO_amodal_train2014.json is new'):
    tfds_builders.build_dataset(config)
  config.dataset.manual_dir = str(tmp_path / 'moved')
  assert tfds_builders.build_dataset(config).info.splits['val'].num_examples == 1


def test_d2sa_builder(tmp_path):
  manual = tmp_path / 'd2sa'
  ann = _write_d2sa(str(manual))
  builder = tfds_builders.build_dataset(_config('d2sa', tmp_path, manual))
  got = _check_examples(builder, 'val', ann, str(manual / 'images'), 'd2sa')
  by_id = {int(e['image_id']): e['instances'] for e in got}
  np.testing.assert_array_equal(by_id[1]['category_id'], [5, 7])  # by occl_depth
  np.testing.assert_array_equal(by_id[2]['category_id'], [9])


def test_kins_builder(tmp_path):
  manual = tmp_path / 'kins'
  ann = _write_kins(str(manual))
  builder = tfds_builders.build_dataset(_config('kins', tmp_path, manual))
  assert set(builder.info.splits) == {'test'}
  got = _check_examples(builder, 'test', ann, str(manual / 'testing/image_2'), 'kins')
  assert (got[0]['instances']['layer_index'][1] == 2).any()  # 2 hidden by 1


def test_cocoa_cls_builder_and_class_aware_batches(tmp_path):
  """configs/cocoa_cls.py prepares COCOA-cls from its manual_dir and its
  batches carry the COCO category ids as classes, front-most first."""
  manual = tmp_path / 'cocoa'
  ann = _write_cocoa_cls(str(manual))
  _write_cocoa(str(manual), 'val')  # COCOA beside it: not read by cocoa_cls
  c = cocoa_cls.get_config()
  c.dataset.data_dir, c.dataset.manual_dir = str(tmp_path / 'tfds'), str(manual)
  c.input.image_size, c.input.max_instances, c.input.gt_mask_size = 64, 4, 16
  c.model.glm.image_size = 33
  builder = tfds_builders.build_dataset(c)
  assert builder.name == 'cocoa_cls' and set(builder.info.splits) == {'val'}
  assert builder.info.metadata['sources']['val']['file'] == os.path.basename(ann)
  got = _check_examples(builder, 'val', ann, str(manual / 'val2014'), 'cocoa_cls')
  assert len(got) == 1  # image 2 has no instances
  inst = got[0]['instances']
  np.testing.assert_array_equal(inst['category_id'], [18, 1, 90])  # file order
  np.testing.assert_array_equal(inst['depth_rank'], [1, 0, 0])  # derived
  assert (inst['layer_index'][0] == 2).any()  # the dog's hidden part
  batch = next(
      pipeline.create_split(
          c, 'val', train=False, num_local_devices=1, per_device_batch=1, builder=builder
      )
  )
  valid = batch['gt_valid'][0, 0]
  np.testing.assert_array_equal(batch['gt_classes'][0, 0][valid], [1, 90, 18])  # by depth
  assert c.model.num_classes > max(batch['gt_classes'][0, 0])


def test_missing_manual_files_raise_user_error(tmp_path):
  manual = tmp_path / 'empty'
  manual.mkdir()
  with pytest.raises(errors.UserError) as err:
    tfds_builders.build_dataset(_config('cocoa', tmp_path, manual))
  assert str(manual) in str(err.value)
  assert 'COCO_amodal_train2014.json' in str(err.value)
  with pytest.raises(errors.UserError, match='unknown dataset'):
    tfds_builders.make_builder(_config('nope', tmp_path, manual))


def test_image_size_mismatch_names_the_file(tmp_path):
  manual = tmp_path / 'cocoa'
  ann = _write_cocoa(str(manual), 'val')
  img = manual / 'val2014' / 'COCO_val2014_000001.jpg'
  Image.new('RGB', (W + 1, H)).save(img)
  with pytest.raises(errors.UserError) as err:
    tfds_builders.build_dataset(_config('cocoa', tmp_path, manual))
  assert ann in str(err.value) or str(img.name) in str(err.value)


def test_boxes_from_masks():
  masks = np.zeros((3, 5, 6), bool)
  masks[0, 1:3, 2:5] = True
  masks[1, 4, 0] = True
  np.testing.assert_array_equal(
      tfds_builders.boxes_from_masks(masks), [[1, 2, 3, 5], [4, 0, 5, 1], [0, 0, 0, 0]]
  )
