"""The evaluate and predict modes (sln_jax.evaluation.loops) on the stand-in
model of tests/train_standin.py: results in original pixels, eval.max_images
and predict.max_images, the device lookahead, files skipped with a reason,
the split over processes."""

import json
import os

import jax
import numpy as np
import pytest

from configs import default
from sln_jax.errors import UserError
from sln_jax.evaluation import loops
from tests import train_standin as ts


def _config():
  return default.get_config()


def test_finish_in_order_finishes_each_item_after_lookahead_later_launches():
  """Items are finished in order; with lookahead k, item i is finished only
  after item i + k was launched (so the device works while the host does)."""
  for lookahead in (0, 1, 2):
    log = []

    def launch():
      for i in range(4):
        log.append(('launch', i))
        yield (i,)

    loops.finish_in_order(launch(), lambda i: log.append(('finish', i)), lookahead)
    assert [i for kind, i in log if kind == 'finish'] == [0, 1, 2, 3]
    for i in range(4):
      finished_at = log.index(('finish', i))
      launched = {j for kind, j in log[:finished_at] if kind == 'launch'}
      assert launched == set(range(min(4, i + lookahead + 1))), (lookahead, log)
  loops.finish_in_order(iter([]), lambda *_: pytest.fail('nothing to finish'), 1)


@pytest.mark.parametrize('lookahead,workers', [(0, 0), (1, 2)])
def test_evaluate_scores_in_original_pixels(tmp_path, monkeypatch, lookahead, workers):
  """Canvas 16 = half of the 32 x 24 originals: the stand-in's first
  detection, canvas box (0, 0, 8, 6), must land on GT (0, 0, 16, 12).
  Lookahead 1 (accelerators: dispatch the next batch before reading this
  one) with two host worker processes gives the same results as 0 with
  none (the CPU defaults)."""
  assert loops.dispatch_lookahead() == 0  # the tests run on the CPU
  monkeypatch.setattr(loops, 'dispatch_lookahead', lambda: lookahead)
  model, v = ts.init_variables()
  c = _config()
  assert loops.num_host_workers(c) == 0  # -1 on a CPU backend
  c.eval.host_workers = workers
  # Image 4 is annotated but not in the evaluated split (e.g. 'val[:3]'): it
  # must not count as missed.
  gt = [ts.annotation(i, 32, 24, (0, 0, 16, 12)) for i in (1, 2, 3, 4)]
  batches = [ts.eval_batch([1, 2], [True, True]), ts.eval_batch([3, -1], [True, False])]
  writer = ts.RecordingWriter()
  metrics = loops.evaluate(c, str(tmp_path), model, v, batches, gt, step=7, writer=writer)
  with open(tmp_path / 'metrics.json') as f:
    assert json.load(f) == metrics
  with open(tmp_path / 'depth_order.json') as f:
    depth = json.load(f)
  assert set(depth) == {'accuracy', 'correct', 'wrong', 'undecided', 'pairs', 'things'}
  assert depth['pairs'] == 0 and depth['accuracy'] == -1  # one object per image
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  assert sorted({r['image_id'] for r in results}) == [1, 2, 3]
  full = [r for r in results if r['score'] == pytest.approx(0.9)]
  assert len(full) == 3
  np.testing.assert_allclose(full[0]['bbox'], [0, 0, 12, 16])
  assert metrics['amodal']['all']['both']['AP'] == pytest.approx(1.0)
  assert metrics['amodal']['all']['stuff']['AP'] == -1
  assert writer.scalars[7]['eval/amodal_AP'] == pytest.approx(1.0)
  if workers:  # the same file as the host computes it in this process
    c.eval.host_workers = 0
    loops.evaluate(c, str(tmp_path / 'inline'), model, v, batches, gt)
    with open(tmp_path / 'inline' / 'results.json') as f:
      assert json.load(f) == results
  # eval.max_images scores only the first images and reads no batch past them.
  c.eval.max_images = 2
  read = []

  def reading():
    for b in batches:
      read.append(b['image_id'].tolist())
      yield b

  loops.evaluate(c, str(tmp_path), model, v, reading(), gt)
  with open(tmp_path / 'results.json') as f:
    assert sorted({r['image_id'] for r in json.load(f)}) == [1, 2]
  assert read == [[[1, 2]]]


@pytest.mark.parametrize('lookahead,workers', [(0, 0), (1, 2)])
def test_predict_writes_json_and_png_and_skips_bad_files(
    tmp_path, capsys, monkeypatch, lookahead, workers
):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(loops, 'dispatch_lookahead', lambda: lookahead)
  model, v = ts.init_variables()
  src = tmp_path / 'in'
  src.mkdir()
  Image.fromarray(np.full((32, 24, 3), 200, np.uint8)).save(src / 'COCO_val2014_000000000042.png')
  Image.fromarray(np.full((16, 16, 3), 50, np.uint8)).save(src / 'b.jpg')
  (src / 'notes.txt').write_text('not an image')
  (src / 'broken.png').write_bytes(b'\x89PNG garbage')

  def preprocess(image, config):
    del config
    h, w = image.shape[:2]
    s = 16 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    canvas = np.zeros((16, 16, 3), np.uint8)
    canvas[:nh, :nw] = np.asarray(Image.fromarray(image).resize((nw, nh)))
    return canvas, np.float32([nh, nw]), np.float32([nh / h, nw / w]), np.zeros((4, 4, 3), np.uint8)

  c = _config()
  c.eval.host_workers = workers
  c.predict.input_dir = str(src)
  c.predict.output_dir = str(tmp_path / 'out')
  c.predict.score_threshold = 0.0
  assert loops.predict(c, model, v, preprocess) == 2
  captured = capsys.readouterr()
  out = captured.out + captured.err
  assert 'notes.txt: not an image' in out and 'broken.png: unreadable image' in out
  assert sorted(os.listdir(tmp_path / 'out')) == sorted(
      ['COCO_val2014_000000000042.json', 'COCO_val2014_000000000042.png', 'b.json', 'b.png']
  )
  with open(tmp_path / 'out' / 'COCO_val2014_000000000042.json') as f:
    results = json.load(f)
  assert {r['image_id'] for r in results} == {42}
  np.testing.assert_allclose(results[0]['bbox'], [0, 0, 12, 16])  # original pixels
  assert Image.open(tmp_path / 'out' / 'b.png').size[0] == 768  # 16 pixels, drawn 48 times larger
  c.predict.max_images = 1
  c.predict.output_dir = str(tmp_path / 'out1')
  assert loops.predict(c, model, v, preprocess) == 1
  assert sorted(os.listdir(tmp_path / 'out1')) == [
      'COCO_val2014_000000000042.json',
      'COCO_val2014_000000000042.png',
  ]
  # Two processes split the sorted files (42.png, b.jpg, broken.png, notes.txt):
  # process 1 takes b.jpg and notes.txt.
  c.predict.max_images = -1
  c.predict.output_dir = str(tmp_path / 'out2')
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert loops.predict(c, model, v, preprocess) == 1
  assert sorted(os.listdir(tmp_path / 'out2')) == ['b.json', 'b.png']
  assert 'process 1 of 2' in capsys.readouterr().out
  monkeypatch.undo()
  c.predict.input_dir = str(tmp_path / 'missing')
  with pytest.raises(UserError, match='predict.input_dir'):
    loops.predict(c, model, v, preprocess)
  # b.jpg and b.png would write the same b.json / b.png: refused up front.
  Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(src / 'b.png')
  c.predict.input_dir, c.predict.output_dir = str(src), str(tmp_path / 'out3')
  with pytest.raises(UserError, match=r'predict.input_dir: b.jpg and b.png would both write'):
    loops.predict(c, model, v, preprocess)
  assert not (tmp_path / 'out3').exists()
