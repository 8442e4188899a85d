"""Synthetic COCOA-schema generator: determinism, schema, self-consistency,
statistics, the CLI, and reading it back with the COCOA reader."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from input_pipeline import synthetic, synthetic_shapes
from sln_jax import semdist
from tests import semdist_decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
REGION_KEYS = {'segmentation', 'name', 'area', 'isStuff', 'occlude_rate', 'order'}


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _load(root, split):
  with open(synthetic.annotation_path(root, split)) as f:
    return json.load(f)


def _poly_mask(flat, h, w):
  return mask_utils.decode(mask_utils.frPyObjects([flat], h, w))[..., 0] > 0


def _rle_mask(rle):
  return mask_utils.decode(rle) > 0


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('synthetic'))
  stats = synthetic.generate_dataset(root, {'train': 10, 'val': 3}, image_size=SIZE, seed=7)
  return root, stats


def test_layout_and_determinism(dataset, tmp_path):
  root, stats = dataset
  files = _files(root)
  assert set(files) == (
      {f'annotations/COCO_amodal_{s}2014.json' for s in ('train', 'val')}
      | {f'train2014/COCO_train2014_{i:012d}.png' for i in range(1, 11)}
      | {f'val2014/COCO_val2014_{i:012d}.png' for i in range(1, 4)}
  )
  again = synthetic.generate_dataset(
      str(tmp_path / 'a'), {'train': 10, 'val': 3}, image_size=SIZE, seed=7
  )
  assert _files(str(tmp_path / 'a')) == files
  assert again == stats
  # Each image depends only on (seed, split, index): a shorter run is a prefix.
  synthetic.generate_split(str(tmp_path / 'b'), 'train', 4, SIZE, seed=7)
  short = _files(str(tmp_path / 'b'))
  for i in range(1, 5):
    name = f'train2014/COCO_train2014_{i:012d}.png'
    assert short[name] == files[name]
  synthetic.generate_split(str(tmp_path / 'c'), 'train', 4, SIZE, seed=8)
  other = _files(str(tmp_path / 'c'))
  assert (
      other['train2014/COCO_train2014_000000000001.png']
      != short['train2014/COCO_train2014_000000000001.png']
  )


def test_schema(dataset):
  root, _ = dataset
  for split in ('train', 'val'):
    data = _load(root, split)
    assert set(data) >= {'images', 'annotations'}
    assert len(data['images']) == len(data['annotations'])
    for img, ann in zip(data['images'], data['annotations']):
      assert set(img) == {'id', 'file_name', 'width', 'height'}
      assert (img['width'], img['height']) == (SIZE, SIZE)
      with Image.open(os.path.join(root, f'{split}2014', img['file_name'])) as im:
        assert im.size == (SIZE, SIZE) and im.mode == 'RGB'
      assert set(ann) == {'id', 'image_id', 'size', 'depth_constraint', 'regions'}
      assert ann['image_id'] == img['id']
      regions = ann['regions']
      assert ann['size'] == len(regions) >= 1
      assert [r['order'] for r in regions] == list(range(1, len(regions) + 1))
      for r in regions:
        occluded = r['occlude_rate'] > 0
        expected = REGION_KEYS | ({'visible_mask', 'invisible_mask'} if occluded else set())
        assert set(r) == expected
        seg = r['segmentation']
        assert isinstance(seg, list) and len(seg) % 2 == 0 and len(seg) >= 6
        assert all(isinstance(v, (int, float)) for v in seg)
        xs, ys = np.asarray(seg[0::2]), np.asarray(seg[1::2])
        assert xs.min() >= 0 and xs.max() <= SIZE
        assert ys.min() >= 0 and ys.max() <= SIZE
        assert r['isStuff'] in (0, 1) and isinstance(r['name'], str)
        assert isinstance(r['occlude_rate'], float)
        for key in ('visible_mask', 'invisible_mask'):
          if key in r:
            assert r[key]['size'] == [SIZE, SIZE]
            assert isinstance(r[key]['counts'], str)


def test_masks_self_consistent(dataset):
  root, _ = dataset
  n_occluded = 0
  for split in ('train', 'val'):
    for ann in _load(root, split)['annotations']:
      regions = ann['regions']
      amodal = [_poly_mask(r['segmentation'], SIZE, SIZE) for r in regions]
      covered = np.zeros((SIZE, SIZE), bool)
      pairs = set()
      for k, (r, am) in enumerate(zip(regions, amodal)):
        assert r['area'] == am.sum() > 0
        if 'visible_mask' in r:
          n_occluded += 1
          vis, inv = _rle_mask(r['visible_mask']), _rle_mask(r['invisible_mask'])
        else:
          vis, inv = am, np.zeros_like(am)
        assert not (vis & inv).any()
        np.testing.assert_array_equal(vis | inv, am)
        # Never visible where a region in front covers it; hidden exactly there.
        assert not (vis & covered).any()
        np.testing.assert_array_equal(inv, am & covered)
        assert abs(r['occlude_rate'] - inv.sum() / am.sum()) < 1e-6
        assert vis.sum() > 0
        for j in range(k):
          if (amodal[j] & am).any():
            pairs.add(f'{j + 1}-{k + 1}')
        covered |= am
      got = set(ann['depth_constraint'].split(',')) - {''}
      assert got == pairs
  assert n_occluded > 0


def test_statistics_and_variety(tmp_path):
  stats = synthetic.generate_dataset(str(tmp_path), {'train': 40}, image_size=96, seed=1)
  s = stats['train']
  assert stats['all']['num_instances'] == s['num_instances']
  hist = s['histogram']
  assert sum(hist.values()) == s['num_instances']
  assert 3 * 40 <= s['num_instances'] <= 6 * 40
  assert 0.3 <= s['occluded_share'] <= 0.7
  assert 0.12 <= s['mean_occlude_rate_occluded'] <= 0.45
  assert hist['partial'] > 0 and hist['heavy'] > 0
  data = _load(str(tmp_path), 'train')
  regions = [r for a in data['annotations'] for r in a['regions']]
  names = {r['name'] for r in regions}
  assert set(synthetic.THING_KINDS) <= names
  assert any(r['isStuff'] for r in regions)
  assert all(3 <= a['size'] <= 6 for a in data['annotations'])
  # Things are saturated, the background is muted: a learnable contrast.
  sat_fg, sat_bg = [], []
  for img, ann in zip(data['images'], data['annotations']):
    rgb = np.asarray(Image.open(os.path.join(tmp_path, 'train2014', img['file_name'])))
    hi, lo = rgb.max(-1).astype(float), rgb.min(-1).astype(float)
    sat = (hi - lo) / np.maximum(hi, 1)  # HSV saturation
    any_region = np.zeros(rgb.shape[:2], bool)
    for r in ann['regions']:
      am = _poly_mask(r['segmentation'], 96, 96)
      any_region |= am
      if not r['isStuff']:
        vis = _rle_mask(r['visible_mask']) if 'visible_mask' in r else am
        sat_fg.append(sat[vis].mean())
    sat_bg.append(sat[~any_region].mean())
  assert np.median(sat_fg) > np.median(sat_bg) + 0.25


def test_clip_polygon_area():
  square = np.array([[-5.0, -5.0], [5.0, -5.0], [5.0, 5.0], [-5.0, 5.0]])
  clipped = synthetic_shapes.clip_polygon(square, 20, 3)
  x, y = clipped[:, 0], clipped[:, 1]
  area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
  assert area == pytest.approx(15.0)  # [0, 5] x [0, 3]
  assert len(synthetic_shapes.clip_polygon(square + 100, 20, 3)) == 0


def test_bad_arguments():
  with pytest.raises(synthetic.errors.UserError, match='image_size'):
    synthetic.generate_split('/nonexistent', 'train', 1, image_size=8)
  with pytest.raises(synthetic.errors.UserError, match='max_objects'):
    synthetic.SceneParams(min_objects=4, max_objects=2).validate()


def _script(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'make_synthetic.py'), *args],
      capture_output=True,
      text=True,
      env=env,
      cwd='/',
  )


def test_script(tmp_path):
  out = tmp_path / 'data'
  res = _script(
      '--out', str(out), '--num-train', '3', '--num-val', '2', '--image-size', '48', '--seed', '5'
  )
  assert res.returncode == 0, res.stderr
  lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith('{')]
  assert [l['split'] for l in lines] == ['train', 'val', 'all']
  assert lines[2]['num_images'] == 5
  for split, n in (('train', 3), ('val', 2)):
    data = _load(str(out), split)
    assert len(data['images']) == n
    assert data['images'][0]['width'] == 48
    assert len(os.listdir(out / f'{split}2014')) == n
  # Bad arguments: exit 2, one line, nothing written.
  bad = tmp_path / 'bad'
  for args in (
      ('--num-train', '-1'),
      ('--image-size', '16'),
      ('--min-objects', '5', '--max-objects', '2'),
  ):
    res = _script('--out', str(bad), *args)
    assert res.returncode == 2
    assert res.stderr.strip().startswith('error:')
    assert len(res.stderr.strip().splitlines()) == 1
  assert os.listdir(tmp_path) == ['data']
  # Its own earlier output is replaced; a folder holding anything else is not.
  assert synthetic.looks_generated(str(out))
  res = _script('--out', str(out), '--num-train', '1', '--num-val', '0', '--image-size', '48')
  assert res.returncode == 0, res.stderr
  assert sorted(os.listdir(out)) == ['annotations', 'train2014']
  (out / 'thesis.tex').write_text('mine')
  assert not synthetic.looks_generated(str(out))
  res = _script('--out', str(out), '--num-train', '1', '--image-size', '48')
  assert res.returncode == 2 and 'did not write' in res.stderr, res.stderr
  assert sorted(os.listdir(out)) == ['annotations', 'thesis.tex', 'train2014']
  assert os.listdir(tmp_path) == ['data']


def test_cocoa_reader_recovers_masks(dataset):
  readers = pytest.importorskip('input_pipeline.readers')
  from input_pipeline import records  # pylint: disable=g-import-not-at-top

  root, _ = dataset
  anns = readers.load_cocoa(
      synthetic.annotation_path(root, 'train'), synthetic.images_dir(root, 'train')
  )
  data = _load(root, 'train')
  assert len(anns) == len(data['images'])
  for got, img, ann in zip(anns, data['images'], data['annotations']):
    assert got.image_id == img['id'] and got.file_name == img['file_name']
    assert (got.height, got.width) == (SIZE, SIZE)
    rec = records.to_record(got, synthetic.images_dir(root, 'train'))
    covered = np.zeros((SIZE, SIZE), bool)
    for k, r in enumerate(ann['regions']):
      am = _poly_mask(r['segmentation'], SIZE, SIZE)
      np.testing.assert_array_equal(rec.amodal[k], am)
      np.testing.assert_array_equal(rec.visible[k], am & ~covered)
      np.testing.assert_array_equal(rec.occluded[k], am & covered)
      assert rec.depth_rank[k] == k
      assert rec.is_stuff[k] == bool(r['isStuff'])
      assert abs(rec.occlude_rate[k] - r['occlude_rate']) < 1e-6
      covered |= am
    expected = {
        tuple(map(lambda v: int(v) - 1, p.split('-')))
        for p in ann['depth_constraint'].split(',')
        if p
    }
    assert {tuple(p) for p in rec.depth_pairs.tolist()} == expected
    # The sem-dist encoder round-trips the record's masks (L = N channels).
    n = len(ann['regions'])
    index = semdist.layer_index_map(rec.amodal, rec.occluded, rec.depth_rank)
    dec = semdist_decode.decode(semdist.layer_channels(index, max(n, 2)))
    np.testing.assert_array_equal(dec['visible'], rec.visible)
    np.testing.assert_array_equal(dec['amodal'], rec.amodal)
