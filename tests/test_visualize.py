"""scripts/visualize.py: ground truth beside predictions, on generated scenes."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from input_pipeline import readers, records, synthetic
from sln_jax import errors
from sln_jax.visualization import draw
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


def _panels(picture):
  """(left panel, right panel or None) of a picture: each SIZE * 12 square
  under its caption (scripts/visualize.py draws 768 pixels wide)."""
  width = SIZE * draw.scale_factor(SIZE, SIZE)
  bar = draw.caption_height(width, width)
  left = picture[bar : bar + width, :width]
  if picture.shape[1] < 2 * width:
    return left, None
  return left, picture[bar : bar + width, width + draw.GAP_PX : 2 * width + draw.GAP_PX]


def test_ground_truth_pictures(dataset, tmp_path):
  ann, images, gt = dataset
  assert vis.main(_args(dataset, tmp_path)) == 0
  assert len(os.listdir(tmp_path)) == 3
  occluded_seen = False
  factor = draw.scale_factor(SIZE, SIZE)
  for a in gt:
    picture = _png(tmp_path, a)
    assert picture.shape[1] == SIZE * factor >= 768
    raw = np.asarray(Image.open(os.path.join(images, a.file_name)).convert('RGB'))
    panel, none = _panels(picture)
    assert none is None
    panel = panel.astype(int)
    big = draw.enlarge(raw, factor).astype(int)
    # Every instance is drawn: its visible pixels are tinted, and so are the
    # hidden ones.
    for inst in a.instances:
      visible = draw.enlarge(records.decode_rle(inst.visible_rle), factor)
      if visible.sum() > 40 * factor**2:
        assert np.abs(panel - big)[visible].mean() > 5
      occluded = draw.enlarge(records.decode_rle(inst.amodal_rle), factor) & ~visible
      if occluded.sum() > 40 * factor**2:
        occluded_seen = True
        assert np.abs(panel - big)[occluded].mean() > 2
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
  left, right = _panels(_png(out, gt[0]))
  # Same masks in the same colours (matched pairs share one); the label
  # tags differ (the prediction's carry scores), so compare the mask pixels.
  amodal = np.zeros(left.shape[:2], bool)
  for inst in gt[0].instances:
    amodal |= draw.enlarge(records.decode_rle(inst.amodal_rle), draw.scale_factor(SIZE, SIZE))
  same = np.all(left == right, axis=-1)
  assert same[amodal].mean() > 0.9 and same[~amodal].mean() > 0.9
  # Above the threshold the extra detection is drawn over the whole image.
  assert vis.main(_args(dataset, out, '--results', dt, '--score', 0.1, '--max-images', 1)) == 0
  left, right = _panels(_png(out, gt[0]))
  assert np.all(left == right, axis=-1)[~amodal].mean() < 0.5


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
