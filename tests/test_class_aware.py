"""Class-aware AP (metrics.evaluate with the annotation file's categories,
scripts/evaluate.py --classes) against pycocotools' COCOeval with useCats=1,
on fixtures in the KINS (7- and 8-category releases), D2SA, COCOA-cls and
COCOA schemas."""

import contextlib
import io
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from input_pipeline import readers, records
from sln_jax.errors import UserError
from sln_jax.evaluation import metrics as metrics_lib
from sln_scripts import evaluate as evaluate_script

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'annotations')
SCHEMAS = [
    ('kins', 'kins_instances_tiny.json'),  # the original release: 7 categories, no id 3
    ('kins', 'kins_update_2020_tiny.json'),  # the 2020 release: 8 categories
    ('d2sa', 'd2sa_tiny.json'),
    ('cocoa_cls', 'cocoa_cls_tiny.json'),
    ('cocoa', 'cocoa_tiny.json'),  # no classes: one category, id 1
]


def _results(gt, cat_ids, seed):
  """Per object three noisy detections (its category, mostly), plus false
  positives in random categories; deterministic for ``seed``."""
  rng = np.random.default_rng(seed)
  out = []
  for a in gt:
    for inst in a.instances:
      amodal = records.decode_rle(inst.amodal_rle)
      visible = records.decode_rle(inst.visible_rle)
      for _ in range(3):
        noise = rng.random(amodal.shape) < rng.uniform(0.0, 0.3)
        cat = inst.category_id if rng.random() < 0.8 else int(rng.choice(cat_ids))
        out.append(
            {
                'image_id': a.image_id,
                'category_id': int(cat),
                'score': float(rng.random()),
                'segmentation': records.encode_mask(amodal ^ (noise & (rng.random() < 0.7))),
                'visible_mask': records.encode_mask(visible ^ noise),
            }
        )
    y, x = int(rng.integers(0, a.height - 8)), int(rng.integers(0, a.width - 8))
    box = np.zeros((a.height, a.width), bool)
    box[y : y + 8, x : x + 8] = True
    out.append(
        {
            'image_id': a.image_id,
            'category_id': int(rng.choice(cat_ids)),
            'score': float(rng.random()),
            'segmentation': records.encode_mask(box),
            'visible_mask': records.encode_mask(box),
        }
    )
  return out


def _cocoeval(gt, categories, results, gt_key, dt_key):
  """pycocotools' COCOeval, useCats=1, on the same masks."""
  anns = []
  for a in gt:
    for inst in a.instances:
      rle = dict(getattr(inst, gt_key))
      anns.append(
          {
              'id': len(anns) + 1,
              'image_id': a.image_id,
              'category_id': inst.category_id,
              'segmentation': rle,
              'area': float(mask_utils.area(rle)),
              'bbox': list(mask_utils.toBbox(rle)),
              'iscrowd': 0,
          }
      )
  dataset = {
      'images': [{'id': a.image_id, 'height': a.height, 'width': a.width} for a in gt],
      'annotations': anns,
      'categories': [{'id': c['id'], 'name': c['name']} for c in categories],
  }
  dts = [
      {
          'image_id': r['image_id'],
          'category_id': r['category_id'],
          'score': r['score'],
          'segmentation': dict(r[dt_key]),
      }
      for r in results
  ]
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = dataset
    coco_gt.createIndex()
    e = COCOeval(coco_gt, coco_gt.loadRes(dts), 'segm')
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e


def _mean_defined(x):
  x = x[x > -1]
  return float(np.mean(x)) if x.size else -1.0


@pytest.mark.parametrize('fmt, name', SCHEMAS)
def test_class_aware_ap_equals_cocoeval_use_cats(fmt, name):
  path = os.path.join(FIXTURES, name)
  gt = readers.load_annotations(fmt, path, keep_empty=True)
  categories = readers.load_categories(fmt, path)
  cat_ids = [c['id'] for c in categories]
  results = _results(gt, cat_ids, seed=len(name))
  per_category = {}
  m = metrics_lib.evaluate(
      gt,
      results,
      category_agnostic=False,
      categories=categories,
      per_category=per_category,
      subsets=('all', 'heavy'),
      parts=('both',),
  )
  names = metrics_lib.metric_names()
  for branch, gt_key, dt_key in (
      ('amodal', 'amodal_rle', 'segmentation'),
      ('visible', 'visible_rle', 'visible_mask'),
  ):
    e = _cocoeval(gt, categories, results, gt_key, dt_key)
    want = [e.stats[i] for i in (0, 1, 2, 6, 7, 8)]
    got = [m[branch]['all']['both'][n] for n in names]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert list(e.params.catIds) == cat_ids
    rows = per_category[branch]
    assert list(rows) == [str(c) for c in cat_ids]
    for k, c in enumerate(cat_ids):
      row = rows[str(c)]
      assert row['name'] == categories[k]['name']
      prec = e.eval['precision'][:, :, k, 0, -1]
      assert row['AP'] == pytest.approx(_mean_defined(prec), abs=1e-9)
      t50 = e.eval['precision'][0, :, k, 0, -1]
      assert row['AP50'] == pytest.approx(_mean_defined(t50), abs=1e-9)
      assert row['AR100'] == pytest.approx(_mean_defined(e.eval['recall'][:, k, 0, -1]), abs=1e-9)
    # A category without ground truth is -1 and left out of the mean.
    with_gt = {i.category_id for a in gt for i in a.instances}
    for c in cat_ids:
      assert (rows[str(c)]['AP'] == -1) == (c not in with_gt)
    defined = [rows[str(c)]['AP'] for c in cat_ids if c in with_gt]
    assert m[branch]['all']['both']['AP'] == pytest.approx(np.mean(defined), abs=1e-9)
  assert 0 < m['amodal']['all']['both']['AP'] < 1
  if fmt == 'kins':  # the fixtures leave some of KINS' categories without objects
    assert any(r['AP'] == -1 for r in per_category['amodal'].values())


def test_unknown_category_id_is_one_error_naming_file_index_and_id():
  path = os.path.join(FIXTURES, 'kins_instances_tiny.json')
  gt = readers.load_annotations('kins', path, keep_empty=True)
  categories = readers.load_categories('kins', path)
  results = _results(gt, [c['id'] for c in categories], seed=0)
  results[4] = dict(results[4], category_id=3)  # 'rider': only in the 2020 release
  with pytest.raises(UserError, match=r'dt\.json: \[4\]\.category_id: category_id 3 is not'):
    metrics_lib.evaluate(
        gt, results, category_agnostic=False, categories=categories, results_path='dt.json'
    )


def test_evaluate_script_classes(tmp_path, capsys):
  path = os.path.join(FIXTURES, 'cocoa_cls_tiny.json')
  gt = readers.load_annotations('cocoa_cls', path, keep_empty=True)
  categories = readers.load_categories('cocoa_cls', path)
  results = _results(gt, [c['id'] for c in categories], seed=3)
  dt = tmp_path / 'dt.json'
  dt.write_text(json.dumps(results))
  out = tmp_path / 'm.json'
  args = ['--format', 'cocoa_cls', '--annotations', path, '--results', str(dt)]
  images = tmp_path / 'images'
  images.mkdir()
  for a in gt:  # plain grey images of the annotated sizes, for the report's pictures
    Image.fromarray(np.full((a.height, a.width, 3), 128, np.uint8)).save(images / a.file_name)
  report_dir = tmp_path / 'report'
  extra = ['--output', str(out), '--classes', '--images', str(images), '--report', str(report_dir)]
  assert evaluate_script.main(args + extra) == 0
  per_category = {}
  want = metrics_lib.evaluate(
      gt, results, category_agnostic=False, categories=categories, per_category=per_category
  )
  assert json.loads(out.read_text()) == want
  assert json.loads((tmp_path / 'm_per_category.json').read_text()) == per_category
  page = (report_dir / 'index.html').read_text()
  for cid, row in per_category['amodal'].items():  # the report's per-category table
    assert f'data-metric="amodal/category/{cid}/AP" data-value="{float(row["AP"])!r}"' in page
  printed = capsys.readouterr().out
  assert 'amodal masks per category (%)' in printed and categories[-1]['name'] in printed
  # Without --classes: every object one class, no per-category file.
  plain = tmp_path / 'plain.json'
  assert evaluate_script.main(args + ['--output', str(plain)]) == 0
  assert json.loads(plain.read_text()) == metrics_lib.evaluate(gt, results)
  assert not (tmp_path / 'plain_per_category.json').exists()
