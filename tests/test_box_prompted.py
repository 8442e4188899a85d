"""Box-prompted evaluation (sln_jax/evaluation/box_prompted.py) and
``SLN.infer_boxes``.

The eval batches come from the real pipeline (``pipeline.preprocess_example``
on hand-made examples): it sorts each image's instances by depth rank, cuts
them to input.max_instances, marks an empty mask invalid and pads, so the
oracle's mIoU of 1.0 holds only if every slot is scored against its own
ground-truth object. Objects are axis-aligned rectangles whose occluders
cover whole rows or columns of them, on images at canvas scale 2 and 1:
their masks go through the K x K crop of the pipeline and the 'aligned'
paste unchanged, so the oracle's IoUs are exactly 1.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from input_pipeline import pipeline, records, sources
from sln_jax import config_checks, modes, semdist
from sln_jax.errors import UserError
from sln_jax.evaluation import box_prompted, loops
from sln_jax.models import sln

FAST = {'xla_backend_optimization_level': 0}  # CPU compile time >> run time here


def _config():
  c = tiny.get_config()
  c.model.num_layers = 2  # gt_layers: visible, occluded
  return c


def _rect(h, w, y1, x1, y2, x2):
  m = np.zeros((h, w), bool)
  m[y1:y2, x1:x2] = True
  return m


def _image(image_id, h, w, rects, ranks):
  """An ImageAnnotation and the pipeline's example of one image: instances
  ``rects`` (y1, x1, y2, x2) or None (an empty mask) in annotation order
  with ``ranks``; each hidden part is what the objects of lower rank cover.
  The image is uniform grey ``image_id - 10`` (the oracle's row)."""
  amodal = np.stack([np.zeros((h, w), bool) if r is None else _rect(h, w, *r) for r in rects])
  ranks = np.asarray(ranks, np.int32)
  occluded = np.stack(
      [amodal[i] & np.any(amodal[ranks < ranks[i]], axis=0) for i in range(len(rects))]
  )
  instances = [
      records.InstanceAnnotation(
          amodal_rle=records.encode_mask(a),
          visible_rle=records.encode_mask(a & ~o),
          occluded_rle=records.encode_mask(o),
          depth_rank=int(r),
          occlude_rate=float(o.sum() / max(a.sum(), 1)),
      )
      for a, o, r in zip(amodal, occluded, ranks)
  ]
  ann = records.ImageAnnotation(image_id, f'{image_id}.png', h, w, instances)
  example = {
      'image': tf.constant(np.full((h, w, 3), image_id - 10, np.uint8)),
      'image_id': tf.constant(image_id, tf.int64),
      'instances': {
          'layer_index': tf.constant(semdist.layer_index_map(amodal, occluded, ranks)),
          'depth_rank': tf.constant(ranks),
          'occlude_rate': tf.constant([i.occlude_rate for i in instances], tf.float32),
          'is_stuff': tf.zeros(len(rects), tf.bool),
          'category_id': tf.ones(len(rects), tf.int32),
      },
  }
  return ann, example


# Image 11, 32 x 32 (canvas scale 2), annotation order c a e d b:
#   a rank 0, unoccluded; b rank 1, its left half behind a (32 px, rate 0.5);
#   c rank 2, unoccluded; d rank 3, one column behind c (8 px, rate 0.125);
#   e rank 4: past input.max_instances = 4, never prompted.
# Image 12, 64 x 64 (scale 1), order f g h: f rank 1, a 6 x 6 corner behind
#   h (36 px, rate 0.140625); g rank 0 with an empty mask (gt_valid False); h
#   rank 0. Image 13, 64 x 64: one unoccluded object.
_A = [(16, 4, 24, 11), (2, 2, 10, 10), (24, 24, 32, 32), (16, 10, 24, 18), (2, 6, 10, 14)]
IMAGES = (
    (11, 32, 32, _A, [2, 0, 4, 3, 1]),
    (12, 64, 64, [(10, 10, 26, 26), None, (20, 20, 36, 36)], [1, 0, 0]),
    (13, 64, 64, [(5, 40, 21, 56)], [0]),
)


@pytest.fixture(name='split', scope='module')
def fixture_split():
  """(annotations, eval batches (1 device x 2 images: [11, 12], [13,
  padding]))."""
  config = _config()
  anns, items = [], []
  for spec in IMAGES:
    ann, example = _image(*spec)
    anns.append(ann)
    items.append(pipeline.preprocess_example(example, config, train=False))
  items.append(pipeline.dummy_example(config))
  items = [{k: np.asarray(v) for k, v in item.items()} for item in items]
  batches = [{k: np.stack([a[k], b[k]])[None] for k in items[0]} for a, b in (items[:2], items[2:])]
  return anns, batches


class Oracle(nn.Module):
  """``SLN.infer_boxes``'s outputs from a table of layer probabilities per
  image (row: the image's grey level) and slot; ``wrong``: the visible mask
  predicted as the amodal one too (nothing hidden)."""

  table: np.ndarray  # (rows, M, m, m, 2): visible, occluded
  wrong: bool = False

  def infer_boxes(self, image, glm_image, image_shape, boxes, boxes_valid, classes=None):
    del glm_image, image_shape
    layers = jnp.asarray(self.table)[image[:, 0, 0, 0].astype(jnp.int32)]
    keep = boxes_valid.astype(jnp.float32)
    visible = layers[..., 0] * keep[..., None, None]
    amodal = visible if self.wrong else (layers[..., 0] + layers[..., 1]) * keep[..., None, None]
    return {
        'boxes': boxes * keep[..., None],
        'scores': keep,
        'classes': classes * boxes_valid,
        'valid': boxes_valid,
        'layer_probs': layers * keep[..., None, None, None],
        'amodal_probs': amodal,
        'visible_probs': visible,
    }


def _oracle(batches, wrong=False):
  """The oracle of ``batches``' ground-truth layers (K = mask size here)."""
  items = [{k: v.reshape((-1,) + v.shape[2:]) for k, v in b.items()} for b in batches]
  table = np.zeros((4,) + items[0]['gt_layers'].shape[1:], np.float32)
  for item in items:
    for j, image in enumerate(item['image']):
      table[image[0, 0, 0]] = item['gt_layers'][j]
  return Oracle(table, wrong)


def test_pipeline_order_is_what_instance_slots_rebuilds(split):
  anns, batches = split
  np.testing.assert_array_equal(box_prompted.instance_slots(anns[0], 4), [1, 4, 0, 3])
  np.testing.assert_array_equal(box_prompted.instance_slots(anns[1], 4), [1, 2, 0, -1])
  items = [(b, j) for b in batches for j in range(2)]
  for ann, (batch, j) in zip(anns, items):
    item = {k: v[0, j] for k, v in batch.items()}
    slots = box_prompted.instance_slots(ann, 4)
    got = box_prompted.check_slots(ann, slots, item)
    np.testing.assert_array_equal(got, np.where(item['gt_valid'], slots, -1))
  np.testing.assert_array_equal(batches[0]['gt_valid'][0, 1], [False, True, True, False])
  assert not batches[1]['is_valid'][0, 1]


def test_oracle_masks_score_one_and_pairing_survives_reorder_cut_empty_and_padding(
    split, tmp_path, capsys
):
  anns, batches = split
  config = _config()
  report = box_prompted.evaluate(config, str(tmp_path), _oracle(batches), {}, batches, anns, step=3)
  assert report['images'] == 3 and report['objects'] == 7 and report['occluded_objects'] == 2
  for key in ('amodal_miou', 'visible_miou', 'occluded_miou'):
    assert report[key] == 1.0, (key, report)
  assert report['hidden_pixels'] == {'visible': 0.0, 'occluded': 1.0, 'absent': 0.0}
  assert report['unscored_objects'] == {'beyond_max_instances': 1, 'empty_mask': 1}
  counts = {k: (v['objects'], v['occluded_objects']) for k, v in report['subsets'].items()}
  assert counts == {'none': (4, 0), 'partial': (2, 1), 'heavy': (1, 1)}
  assert all(v['amodal_miou'] == 1.0 for v in report['subsets'].values())
  assert report['subsets']['none']['occluded_miou'] == -1  # nothing hidden there
  with open(tmp_path / 'box_prompted.json') as f:
    assert json.load(f) == report
  out = capsys.readouterr().out
  assert 'box-prompted evaluation at step 3' in out and 'heavy' in out
  assert '1 objects past input.max_instances, 1 with an empty amodal mask' in out
  # One spawned host worker process: the scoring function and its arguments pickle.
  config.eval.host_workers = 1
  workers = box_prompted.evaluate(config, str(tmp_path), _oracle(batches), {}, batches, anns)
  assert workers == report
  # eval.max_images = 1 scores image 11 only.
  config.eval.host_workers = 0
  config.eval.max_images = 1
  one = box_prompted.evaluate(config, str(tmp_path), _oracle(batches), {}, batches, anns)
  assert one['images'] == 1 and one['objects'] == 4


def _iou(a, b):
  return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def test_visible_predicted_as_amodal_gives_the_mious_computed_by_hand(split, tmp_path):
  """The stand-in predicts each object's visible mask as its amodal mask:
  amodal IoU = visible / amodal area, visible IoU 1, occluded IoU 0 (the
  objects hiding >= 20 pixels: b and f), every hidden pixel absent."""
  anns, batches = split
  report = box_prompted.evaluate(
      _config(), str(tmp_path), _oracle(batches, wrong=True), {}, batches, anns
  )
  # a, b, c, d of image 11; f, h of image 12; image 13's object.
  want_amodal = {'a': 1, 'b': 32 / 64, 'c': 1, 'd': 56 / 64, 'f': 220 / 256, 'h': 1, 'k': 1}
  scored = [(anns[0], 1), (anns[0], 4), (anns[0], 0), (anns[0], 3), (anns[1], 0), (anns[1], 2)]
  scored.append((anns[2], 0))
  decode = records.decode_rle
  by_hand = [
      _iou(decode(ann.instances[g].visible_rle), decode(ann.instances[g].amodal_rle))
      for ann, g in scored
  ]
  np.testing.assert_allclose(by_hand, list(want_amodal.values()))
  assert report['amodal_miou'] == pytest.approx(np.mean(by_hand), abs=1e-12)
  assert report['visible_miou'] == 1.0
  assert report['occluded_miou'] == 0.0 and report['occluded_objects'] == 2
  assert report['hidden_pixels'] == {'visible': 0.0, 'occluded': 0.0, 'absent': 1.0}
  sub = report['subsets']
  assert sub['none']['amodal_miou'] == 1.0  # a, c, h, k
  assert sub['partial']['amodal_miou'] == pytest.approx((56 / 64 + 220 / 256) / 2, abs=1e-12)
  assert sub['heavy']['amodal_miou'] == pytest.approx(0.5, abs=1e-12)
  assert sub['partial']['occluded_miou'] == 0.0 and sub['heavy']['occluded_miou'] == 0.0


def test_ground_truth_that_does_not_fit_the_batch_is_refused(split, tmp_path):
  """Annotations other than those the split was prepared from: another
  depth order, a moved object, one instance fewer."""
  anns, batches = split
  config = _config()
  oracle = _oracle(batches)
  ann = anns[1]
  moved = records.ImageAnnotation(12, ann.file_name, 64, 64, list(ann.instances))
  moved.instances[2] = records.InstanceAnnotation(
      **{**vars(ann.instances[2]), 'amodal_rle': records.encode_mask(_rect(64, 64, 21, 20, 37, 36))}
  )
  reranked = records.ImageAnnotation(12, ann.file_name, 64, 64, list(ann.instances))
  reranked.instances[0] = records.InstanceAnnotation(**{**vars(ann.instances[0]), 'depth_rank': 2})
  fewer = records.ImageAnnotation(12, ann.file_name, 64, 64, list(ann.instances[1:]))
  for other, message in (
      (
          moved,
          r'image 12, batch slot 1 has box \[20.0, 20.0, 36.0, 36.0\] \(original pixels\), '
          r'its ground-truth instance 2 \[21.0, 20.0, 37.0, 36.0\]',
      ),
      (reranked, 'image 12, batch slot 2 has depth rank 1, its ground-truth instance 0 2'),
      (fewer, 'image 12, batch slot 2 holds an object but the ground truth has only 2'),
  ):
    with pytest.raises(UserError, match=message) as err:
      box_prompted.evaluate(config, str(tmp_path), oracle, {}, batches, [anns[0], other, anns[2]])
    assert err.value.field == 'dataset.eval_annotations'


# ------------------------------------------------------------- the model
def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST)


def test_infer_boxes_on_infer_detections_gives_infer_masks():
  """infer and infer_boxes share the mask-head tail: given infer's own boxes
  (canvas pixels, the gt_boxes convention) infer_boxes returns its masks;
  scores are 1 and classes 1 on valid slots, every output zero on invalid
  slots."""
  cfg = _config()
  model = sln.build_model(cfg)
  v = sln.init_variables(model, jax.random.PRNGKey(0), 64)
  v['params']['box_head']['linear_class']['bias'] = jnp.array([0.0, 5.0])  # all foreground
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
  glm = image[:, ::2, ::2][:, :33]
  glm = np.pad(glm, ((0, 0), (0, 1), (0, 1), (0, 0)), mode='edge')
  shape = np.array([[64, 48]], np.float32)
  args = (image, glm, shape)
  out = jax.device_get(_compile(functools.partial(model.apply, method='infer'), v, *args)(v, *args))
  valid = np.array(out['valid'])
  assert valid.sum() >= 6
  valid[0, :2] = False  # two slots asked without a box
  prompted = (out['boxes'], valid)
  infer_boxes = _compile(functools.partial(model.apply, method='infer_boxes'), v, *args, *prompted)
  got = jax.device_get(infer_boxes(v, *args, *prompted))
  keep = valid[0]
  for k in ('boxes', 'layer_probs', 'amodal_probs', 'visible_probs'):
    np.testing.assert_allclose(got[k][0, keep], out[k][0, keep], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.any(got[k][0, ~keep]), k
  assert np.abs(out['amodal_probs'][0, keep] - out['visible_probs'][0, keep]).max() > 0.01
  np.testing.assert_array_equal(got['valid'], valid)
  np.testing.assert_array_equal(got['scores'], valid.astype(np.float32))
  np.testing.assert_array_equal(got['classes'], valid.astype(np.int32))
  # A box outside the image_shape window is clipped to it, as detections are.
  wide = np.array(out['boxes'])
  wide[0, 2] = (-3.0, -2.0, 70.0, 60.0)
  clipped = jax.device_get(infer_boxes(v, *args, wide, valid))['boxes']
  np.testing.assert_allclose(clipped[0, 2], [0, 0, 64, 48])


# ------------------------------------------------------------- wiring
def test_box_prompted_flag_is_a_checked_bool():
  c = _config()
  assert c.eval.box_prompted is False
  config_checks.check_config(c)
  c.eval = ml_collections.ConfigDict({**c.eval.to_dict(), 'box_prompted': 'yes'})
  with pytest.raises(UserError) as err:
    config_checks.check_config(c)
  assert err.value.field == 'eval.box_prompted'


@pytest.mark.parametrize('mode', ['evaluate', 'train_and_evaluate'])
@pytest.mark.parametrize('flag', [False, True])
def test_evaluating_modes_run_box_prompted_evaluation_when_asked(mode, flag, tmp_path, monkeypatch):
  """After loops.evaluate, on a fresh pass of the eval batches and the same
  annotations, with the same model, variables and step."""
  calls = []
  variables = {'params': {'w': np.ones(2)}, 'batch_stats': {}}

  def recorder(name):
    def run(config, workdir, model, v, batches, annotations, step=0, writer=None, **kwargs):
      del config, workdir, writer, kwargs
      calls.append((name, model, v, list(batches), annotations, step))
      return {name: 1}

    return run

  monkeypatch.setattr(loops, 'evaluate', recorder('detections'))
  monkeypatch.setattr(box_prompted, 'evaluate', recorder('boxes'))
  monkeypatch.setattr(modes, 'checkpoint_steps', lambda workdir: [5])
  monkeypatch.setattr(modes, 'check_checkpoint_fits', lambda *a: None)
  monkeypatch.setattr(modes, 'load_variables', lambda c, w, v: (variables, 5))
  state = type('State', (), dict(step=5, **variables))
  monkeypatch.setattr(modes, 'train', lambda *a, on_start=None: state)
  reads = []
  data = sources.DataSources(
      eval_batches=lambda: iter([{'pass': len(reads)}]),
      eval_annotations=lambda: reads.append(1) or ['gt'],
  )
  config = _config()
  config.train.image_summary_every = 0
  config.eval.box_prompted = flag
  metrics = modes.run(config, str(tmp_path), mode, None, data, model='m', variables=variables)
  assert metrics == {'detections': 1}
  assert [c[0] for c in calls] == ['detections'] + (['boxes'] if flag else [])
  for name, model, v, batches, annotations, step in calls:
    assert (model, annotations, step, len(batches)) == ('m', ['gt'], 5, 1), name
    assert v['params'] is variables['params']
  assert len(reads) == 1  # the annotations are read once
