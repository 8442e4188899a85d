"""scripts/visualize.py: ground truth beside predictions, on generated scenes."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from input_pipeline import readers, records, synthetic
from sln_jax import errors
from sln_scripts import visualize as vis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('syn'))
  synthetic.generate_split(root, 'val', 3, image_size=SIZE, seed=3)
  ann = synthetic.annotation_path(root, 'val')
  return ann, synthetic.images_dir(root, 'val'), readers.load_annotations('cocoa', ann)


def _args(dataset, out, *extra):
  ann, images, _ = dataset
  return [
      '--format',
      'cocoa',
      '--annotations',
      ann,
      '--images',
      images,
      '--out',
      str(out),
      *map(str, extra),
  ]


def _perfect_results(gt, score=0.9):
  return [
      {
          'image_id': a.image_id,
          'category_id': i.category_id,
          'score': score,
          'segmentation': i.amodal_rle,
          'visible_mask': i.visible_rle,
          'depth_layer': int(i.depth_rank),
      }
      for a in gt
      for i in a.instances
  ]


def _png(out, annotation):
  stem = os.path.splitext(os.path.basename(annotation.file_name))[0]
  return np.asarray(Image.open(os.path.join(out, stem + '.png')))


def test_ground_truth_pictures(dataset, tmp_path):
  ann, images, gt = dataset
  assert vis.main(_args(dataset, tmp_path)) == 0
  assert len(os.listdir(tmp_path)) == 3
  occluded_seen = False
  for a in gt:
    picture = _png(tmp_path, a)
    assert picture.shape == (SIZE + vis.HEADER, SIZE, 3)
    raw = np.asarray(Image.open(os.path.join(images, a.file_name)).convert('RGB'))
    panel = picture[vis.HEADER :].astype(int)
    # Every instance is drawn: its visible pixels are tinted (away from the
    # box outlines and labels, which cover the borders).
    for inst in a.instances:
      visible = records.decode_rle(inst.visible_rle)
      if visible.sum() > 40:
        assert np.abs(panel - raw)[visible].mean() > 5
      occluded = records.decode_rle(inst.amodal_rle) & ~visible
      if occluded.sum() > 40:
        occluded_seen = True
        assert np.abs(panel - raw)[occluded].mean() > 2  # the hidden part is shown too
  assert occluded_seen


def test_perfect_predictions_look_like_the_ground_truth(dataset, tmp_path):
  _, _, gt = dataset
  results = _perfect_results(gt)
  # A low-score detection over the whole first image is below the threshold.
  whole = records.encode_mask(np.ones((SIZE, SIZE), bool))
  results.append(
      {
          'image_id': gt[0].image_id,
          'score': 0.2,
          'segmentation': whole,
          'visible_mask': whole,
          'depth_layer': 0,
      }
  )
  dt = tmp_path / 'dt.json'
  dt.write_text(json.dumps(results))
  out = tmp_path / 'vis'
  assert (
      vis.main(
          _args(dataset, out, '--results', dt, '--image-ids', f'{gt[0].image_id},{gt[2].image_id}')
      )
      == 0
  )
  assert len(os.listdir(out)) == 2
  picture = _png(out, gt[0])
  assert picture.shape == (SIZE + vis.HEADER, 2 * SIZE + vis.GAP, 3)
  left = picture[vis.HEADER :, :SIZE]
  right = picture[vis.HEADER :, SIZE + vis.GAP :]
  np.testing.assert_array_equal(left, right)  # same masks, colours, layers; no 0.2 detection
  assert (picture[:, SIZE : SIZE + vis.GAP] == 255).all()
  # Above the threshold the extra detection is drawn.
  assert (
      vis.main(_args(dataset, out, '--results', dt, '--score-threshold', 0.1, '--max-images', 1))
      == 0
  )
  picture = _png(out, gt[0])
  assert not np.array_equal(picture[vis.HEADER :, :SIZE], picture[vis.HEADER :, SIZE + vis.GAP :])


def test_bad_input_names_the_file_and_writes_nothing(dataset, tmp_path):
  ann, images, gt = dataset
  out = tmp_path / 'vis'
  bad = tmp_path / 'dt.json'
  bad.write_text(
      json.dumps([{'image_id': 999, 'score': 0.9, 'segmentation': gt[0].instances[0].amodal_rle}])
  )
  with pytest.raises(errors.UserError, match=r'dt\.json: \[0\]\.image_id'):
    vis.main(_args(dataset, out, '--results', bad))
  bad.write_text('[{"image_id": ')
  with pytest.raises(errors.UserError, match=r'dt\.json: not readable JSON'):
    vis.main(_args(dataset, out, '--results', bad))
  with pytest.raises(errors.UserError, match=r'--image-ids: image ids \[12345\]'):
    vis.main(_args(dataset, out, '--image-ids', 12345))
  with pytest.raises(errors.UserError, match=r'nothere\.json: annotation file not found'):
    vis.main(
        [
            '--format',
            'cocoa',
            '--annotations',
            str(tmp_path / 'nothere.json'),
            '--images',
            images,
            '--out',
            str(out),
        ]
    )
  assert not out.exists()

  # A missing image file: exit code 2, one line naming the annotation file.
  data = json.loads(open(ann).read())
  data['images'][1]['file_name'] = 'missing.png'
  broken = tmp_path / 'gt.json'
  broken.write_text(json.dumps(data))
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, 'scripts', 'visualize.py'),
          '--format',
          'cocoa',
          '--annotations',
          str(broken),
          '--images',
          images,
          '--out',
          str(out),
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.count('\n') == 1 and 'gt.json' in proc.stderr
  assert 'images[1].file_name' in proc.stderr and 'missing.png' in proc.stderr
  assert not out.exists()


def test_occlusion_picture_panels_and_matched_colours():
  """tools/occlusion_picture.py: image, ground truth and prediction panels,
  each scaled by the factor; a prediction identical to the ground truth
  (listed in another order, with other scores) draws the same panel, since a
  matched prediction takes its object's colour."""
  from tools import occlusion_picture  # pylint: disable=import-outside-toplevel

  h, w = 20, 30
  front = np.zeros((h, w), bool)
  front[2:10, 3:15] = True
  back = np.zeros((h, w), bool)
  back[6:16, 8:26] = True
  instances = [
      records.InstanceAnnotation(
          amodal_rle=records.encode_mask(m),
          visible_rle=records.encode_mask(v),
          occluded_rle=records.encode_mask(m & ~v),
          depth_rank=rank,
          occlude_rate=0.0,
          is_stuff=False,
          category_id=1,
      )
      for m, v, rank in ((front, front, 0), (back, back & ~front, 1))
  ]
  ann = records.ImageAnnotation(1, '1.png', h, w, instances)
  image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
  results = [
      {
          'image_id': 1,
          'score': score,
          'bbox': list(map(float, mask_utils.toBbox(records.encode_mask(m)))),
          'segmentation': records.encode_mask(m),
          'visible_mask': records.encode_mask(v),
          'depth_layer': layer,
      }
      for m, v, layer, score in ((back, back & ~front, 1, 0.9), (front, front, 0, 0.6))
  ]
  pic = occlusion_picture.picture(ann, image, results, factor=3)
  assert pic.shape == (3 * h, 3 * (3 * w) + 16, 3)
  panel = 3 * w
  np.testing.assert_array_equal(pic[:, :panel], np.kron(image, np.ones((3, 3, 1), np.uint8)))
  truth, pred = pic[:, panel + 8 : 2 * panel + 8], pic[:, 2 * panel + 16 :]
  np.testing.assert_array_equal(pred, truth)
  assert not np.array_equal(truth, pic[:, :panel])  # something is drawn
