"""sln_jax/evaluation/report.py and scripts/evaluate.py --report: the
report's numbers are metrics.json's, every picture it links exists, the
gallery is ranked by per-image amodal IoU, and it opens in a browser."""

import html.parser
import json
import os
import shutil
import subprocess

import numpy as np
from PIL import Image
import pytest

from input_pipeline import readers, records, synthetic
from sln_jax import errors
from sln_jax.evaluation import occlusion, report, results_check
from sln_scripts import evaluate as evaluate_script

SIZE = 64


class _Page(html.parser.HTMLParser):
  """Collects the cells with data-metric, the links and the gallery."""

  def __init__(self):
    super().__init__()
    self.cells, self.links, self.figures = {}, [], []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if 'data-metric' in a and 'data-value' in a:
      self.cells[a['data-metric']] = float(a['data-value'])
    if tag == 'img' and 'src' in a:
      self.links.append(a['src'])
    if tag == 'a' and 'href' in a:
      self.links.append(a['href'])
    if tag == 'figure':
      self.figures.append((int(a['data-image-id']), float(a['data-iou'])))


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  root = tmp_path_factory.mktemp('report')
  synthetic.generate_split(str(root), 'val', 5, image_size=SIZE, seed=3)
  ann_path = synthetic.annotation_path(str(root), 'val')
  images = synthetic.images_dir(str(root), 'val')
  gt = readers.load_annotations('cocoa', ann_path)
  results = []
  for k, a in enumerate(gt[:4]):
    # Images 0 and 1 perfect; 2 misses its last object; 3 has a false
    # positive; 4 has no detections.
    kept = a.instances[:-1] if k == 2 else a.instances
    for n, inst in enumerate(kept):
      results.append(
          {
              'image_id': a.image_id,
              'score': 0.9 - 0.01 * n,
              'segmentation': inst.amodal_rle,
              'visible_mask': inst.visible_rle,
              'depth_layer': int(inst.depth_rank),
          }
      )
    if k == 3:
      corner = np.zeros((SIZE, SIZE), bool)
      corner[:6, :6] = True
      rle = records.encode_mask(corner)
      results.append(
          {
              'image_id': a.image_id,
              'score': 0.95,
              'segmentation': rle,
              'visible_mask': rle,
              'depth_layer': 0,
          }
      )
  dt = root / 'dt.json'
  dt.write_text(json.dumps(results))
  out = root / 'report'
  args = ['--format', 'cocoa', '--annotations', ann_path, '--results', str(dt)]
  args += ['--output', str(root / 'm.json'), '--images', images, '--report', str(out)]
  assert evaluate_script.main(args) == 0
  page = _Page()
  page.feed((out / 'index.html').read_text(encoding='utf-8'))
  with open(root / 'm.json') as f:
    metrics = json.load(f)
  return {'gt': gt, 'results': results, 'out': out, 'page': page, 'metrics': metrics, 'args': args}


def test_report_numbers_are_metrics_json(evaluated):
  cells, metrics = evaluated['page'].cells, evaluated['metrics']
  flat = {
      f'{b}/{s}/{p}/{m}': v
      for b, table in metrics.items()
      for s, parts in table.items()
      for p, row in parts.items()
      for m, v in row.items()
  }
  assert set(metrics) == {'amodal', 'visible'}
  assert {k: v for k, v in cells.items() if k.count('/') == 3} == flat
  gt = evaluated['gt']
  occluded = occlusion.occlusion_metrics(gt, evaluated['results'])
  assert cells['depth_order/accuracy'] == occluded['depth_order']['accuracy']
  for key in ('correct', 'wrong', 'undecided', 'pairs'):
    assert cells[f'depth_order/{key}'] == occluded['depth_order'][key]
    assert cells[f'depth_order_votes/{key}'] == occluded['depth_order_votes'][key]
  for key in ('amodal_miou', 'visible_miou', 'occluded_miou', 'matched', 'occluded'):
    assert cells[f'masks/{key}'] == occluded['masks'][key]


def test_every_linked_picture_exists_and_the_gallery_is_ranked(evaluated):
  out, page = evaluated['out'], evaluated['page']
  assert {'pr_amodal.png', 'pr_visible.png', 'depth_order.png'} <= set(page.links)
  for link in page.links:
    path = out / link
    assert path.is_file(), link
    with Image.open(path) as im:
      assert im.format == 'PNG' and im.size[0] >= 400
  gt = evaluated['gt']
  ids = [i for i, _ in page.figures]
  assert sorted(ids) == sorted(a.image_id for a in gt)  # 5 images: 3 best, 2 worst
  best, worst = page.figures[:3], page.figures[3:]
  assert [v for _, v in best] == sorted((v for _, v in best), reverse=True)
  assert [v for _, v in worst] == sorted(v for _, v in worst)
  assert best[0][1] == 1.0 and worst[0] == (gt[4].image_id, 0.0)  # no detections
  gallery = {int(os.path.basename(link)[:-4]) for link in page.links if link.startswith('images/')}
  assert gallery == set(ids)
  assert not os.path.exists(str(out) + '.partial')


def test_per_image_amodal_iou_by_hand():
  a = np.zeros((10, 10), bool)
  a[0:4, 0:4] = True
  b = np.zeros((10, 10), bool)
  b[6:10, 6:10] = True
  inst = [
      records.InstanceAnnotation(
          amodal_rle=records.encode_mask(m),
          visible_rle=records.encode_mask(m),
          occluded_rle=records.encode_mask(np.zeros_like(m)),
          depth_rank=0,
          occlude_rate=0.0,
          is_stuff=False,
          category_id=1,
      )
      for m in (a, b)
  ]
  gt = [records.ImageAnnotation(1, '1.png', 10, 10, inst)]
  half = np.zeros((10, 10), bool)
  half[0:4, 0:2] = True  # IoU 0.5 with a: matched
  dets = results_check.check_results(
      [
          {'image_id': 1, 'score': 0.9, 'segmentation': records.encode_mask(half)},
          {'image_id': 1, 'score': 0.4, 'segmentation': records.encode_mask(b)},  # below 0.5
      ],
      gt,
  )
  got = report.per_image_amodal_iou(gt, dets, score_threshold=0.5)
  assert got == {1: {'iou': 0.25, 'objects': 2, 'matched': 1, 'false_positives': 0}}
  got = report.per_image_amodal_iou(gt, dets, score_threshold=0.3)
  assert got[1]['iou'] == 0.75 and got[1]['matched'] == 2


def test_report_needs_the_images(evaluated, tmp_path):
  args = [a for a in evaluated['args']]
  at = args.index('--images')
  del args[at : at + 2]
  with pytest.raises(errors.UserError, match='--images'):
    evaluate_script.main(args)


@pytest.mark.skipif(shutil.which('chromium') is None, reason='Chromium is not installed')
def test_report_opens_in_headless_chromium(evaluated, tmp_path):
  shot = tmp_path / 'shot.png'
  proc = subprocess.run(
      [
          'chromium',
          '--headless',
          '--no-sandbox',
          '--disable-gpu',
          '--hide-scrollbars',
          '--window-size=1200,1600',
          f'--screenshot={shot}',
          (evaluated['out'] / 'index.html').as_uri(),
      ],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  pixels = np.asarray(Image.open(shot).convert('L'), np.float64)
  assert pixels.shape == (1600, 1200)
  assert pixels.std() > 20  # tables, charts and pictures, not a blank page
  assert (pixels < 100).mean() > 0.01  # dark text and lines are drawn
