"""scripts/convert_annotations.py end to end (subprocess): outputs equal the
library's encoding; every bad input exits 2 with one line and no output."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from input_pipeline import legacy_layers, readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'annotations')
SCRIPT = os.path.join(ROOT, 'scripts', 'convert_annotations.py')


def fixture(name):
  with open(os.path.join(FIXTURES, name)) as f:
    return json.load(f)


def write_images(images_dir, data):
  os.makedirs(images_dir, exist_ok=True)
  for img in data['images']:
    Image.new('RGB', (img['width'], img['height'])).save(os.path.join(images_dir, img['file_name']))


def run(fmt, annotations, images, out):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(
      [
          sys.executable,
          SCRIPT,
          '--format',
          fmt,
          '--annotations',
          str(annotations),
          '--images',
          str(images),
          '--out',
          str(out),
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=120,
  )


@pytest.mark.parametrize('fmt', ['cocoa', 'kins'])
def test_converts_fixture(tmp_path, fmt):
  name = f'{fmt}_tiny.json'
  images = tmp_path / 'images'
  write_images(str(images), fixture(name))
  out = tmp_path / 'layers'
  proc = run(fmt, os.path.join(FIXTURES, name), images, out)
  assert proc.returncode == 0, proc.stderr
  assert 'skipped 1 images with no instances' in proc.stdout
  anns = readers.load_annotations(fmt, os.path.join(FIXTURES, name))
  stems = sorted(os.path.splitext(a.file_name)[0] + '.npz' for a in anns)
  assert sorted(os.listdir(out)) == stems
  for ann in anns:
    with np.load(out / (os.path.splitext(ann.file_name)[0] + '.npz')) as data:
      layer = data['layer']
    assert layer.dtype == np.uint64 and layer.shape == (ann.height, ann.width)
    np.testing.assert_array_equal(layer, legacy_layers.encode_legacy_layers(ann))
    assert layer.any()
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []


def _cocoa_case(tmp_path, edit):
  data = fixture('cocoa_tiny.json')
  edit(data)
  path = tmp_path / 'gt_cocoa.json'
  path.write_text(json.dumps(data))
  return 'cocoa', path, data


def _region(data, j):
  return data['annotations'][0]['regions'][j]


def _many_regions(data):
  _region(data, 1)['segmentation'] = [0, 0, 59, 0, 59, 39, 0, 39]
  data['annotations'][0]['regions'] += [dict(_region(data, 1), order=k) for k in range(4, 35)]
  data['annotations'][0]['depth_constraint'] = ''


def _missing_image(data):
  pass


BAD = {
    # name: (edit, field the message must name)
    'malformed_json': (None, 'line 1 column'),
    'missing_image': ('img_c.jpg', 'images[2].file_name'),
    'rle_size': (
        lambda d: _region(d, 0)['visible_mask'].update(size=[40, 61]),
        'annotations[0].regions[0].visible_mask.size',
    ),
    'short_polygon': (
        lambda d: _region(d, 1).update(segmentation=[1, 1, 5, 5]),
        'annotations[0].regions[1].segmentation',
    ),
    'no_order': (lambda d: _region(d, 2).pop('order'), 'annotations[0].regions[2].order'),
    'no_width': (lambda d: d['images'][0].pop('width'), 'images[0].width'),
    'too_many': (_many_regions, 'img_a.png'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_exits_2_with_one_line(tmp_path, case):
  edit, field = BAD[case]
  images = tmp_path / 'images'
  if case == 'malformed_json':
    path = tmp_path / 'gt_cocoa.json'
    path.write_text('{"images": [}')
    write_images(str(images), fixture('cocoa_tiny.json'))
  else:
    _, path, data = _cocoa_case(tmp_path, edit if callable(edit) else _missing_image)
    write_images(str(images), fixture('cocoa_tiny.json'))
    if case == 'missing_image':
      os.remove(images / edit)
  out = tmp_path / 'layers'
  proc = run('cocoa', path, images, out)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert 'gt_cocoa.json' in lines[0] and field in lines[0]
  if case == 'missing_image':
    assert 'img_c.jpg' in lines[0]
  if case == 'too_many':
    assert 'at most 32' in lines[0]
  assert not out.exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []


def test_out_may_be_the_images_directory(tmp_path):
  """The release keeps each layer file beside its image: converting into the
  images folder replaces same-named .npz files and keeps everything else."""
  images = tmp_path / 'images'
  data = fixture('cocoa_tiny.json')
  write_images(str(images), data)
  anns = readers.load_annotations('cocoa', os.path.join(FIXTURES, 'cocoa_tiny.json'))
  stale = images / (os.path.splitext(anns[0].file_name)[0] + '.npz')
  stale.write_bytes(b'stale')
  (images / 'notes.txt').write_text('mine')
  before = sorted(os.listdir(images))

  bad = _cocoa_case(tmp_path, BAD['no_order'][0])[1]
  proc = run('cocoa', bad, images, images)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert sorted(os.listdir(images)) == before and stale.read_bytes() == b'stale'

  proc = run('cocoa', os.path.join(FIXTURES, 'cocoa_tiny.json'), images, images)
  assert proc.returncode == 0, proc.stderr
  layers = sorted(os.path.splitext(a.file_name)[0] + '.npz' for a in anns)
  assert sorted(os.listdir(images)) == sorted(set(before) | set(layers))
  assert (images / 'notes.txt').read_text() == 'mine'
  for img in data['images']:
    assert (images / img['file_name']).stat().st_size > 0
  with np.load(stale) as out:
    np.testing.assert_array_equal(out['layer'], legacy_layers.encode_legacy_layers(anns[0]))
