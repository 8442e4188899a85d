"""Tests of input_pipeline/pipeline.py: geometry, targets, batching."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import tiny
from input_pipeline import pipeline, tfds_builders
from sln_jax import preprocess, semdist


def _config(**input_overrides):
  c = tiny.get_config()  # S = 64, M = 4, K = 16, G = 33
  for k, v in input_overrides.items():
    c.input[k] = v
  return c


def _example(image, index, depth_rank, image_id=7):
  n = index.shape[0]
  return dict(
      image=tf.constant(image),
      image_id=tf.constant(image_id, tf.int64),
      instances=dict(
          layer_index=tf.constant(index, tf.uint8),
          depth_rank=tf.constant(depth_rank, tf.int32),
          occlude_rate=tf.constant(np.linspace(0, 0.5, n), tf.float32),
          is_stuff=tf.constant(np.arange(n) % 2 == 1),
          category_id=tf.constant(np.arange(n) + 3, tf.int32),
      ),
  )


def _scene(h=20, w=40, seed=0):
  """Two overlapping rectangles: instance 1 is partly hidden by 0."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  amodal = np.zeros((2, h, w), bool)
  amodal[0, 2:10, 3:20] = True
  amodal[1, 5:15, 10:30] = True
  occluded = np.zeros_like(amodal)
  occluded[1] = amodal[0] & amodal[1]
  index = semdist.layer_index_map(amodal, occluded, np.array([0, 1]))
  return image, index


def _np(d):
  return {k: v.numpy() for k, v in d.items()}


def test_resize_pad_keeps_aspect_and_scales_boxes():
  image, index = _scene(20, 40)
  out = _np(pipeline.preprocess_example(_example(image, index, [0, 1]), _config(), train=False))
  np.testing.assert_array_equal(out['image_shape'], [32, 64])
  np.testing.assert_allclose(out['image_scale'], [1.6, 1.6])
  assert out['image'].shape == (64, 64, 3) and out['image'].dtype == np.uint8
  assert not out['image'][32:].any()  # padded bottom with zeros
  src_boxes = tfds_builders.boxes_from_masks(index > 0)  # independent numpy
  np.testing.assert_array_equal(src_boxes, [[2, 3, 10, 20], [5, 10, 15, 30]])
  np.testing.assert_allclose(out['gt_boxes'][:2], src_boxes * 1.6, rtol=1e-6)
  np.testing.assert_array_equal(out['gt_boxes'][2:], 0)
  # Aspect: the valid region matches TF's own resize of the source image.
  ref = tf.image.resize(image, [32, 64], method='bilinear').numpy()
  assert np.abs(out['image'][:32].astype(float) - ref).max() <= 0.5 + 1e-4


def test_squash_mode():
  image, index = _scene(20, 40)
  out = _np(
      pipeline.preprocess_example(
          _example(image, index, [0, 1]), _config(resize_mode='squash'), train=False
      )
  )
  np.testing.assert_array_equal(out['image_shape'], [64, 64])
  np.testing.assert_allclose(out['image_scale'], [3.2, 1.6])
  np.testing.assert_allclose(out['gt_boxes'][1], [16, 16, 48, 48], rtol=1e-6)
  assert out['image'][63].any() and out['image'][:, 63].any()


def test_flip_is_consistent():
  image, index = _scene(20, 40)
  c = _config()
  ex = _example(image, index, [0, 1])
  a = _np(pipeline.preprocess_example(ex, c, train=True, flip=tf.constant(False)))
  b = _np(pipeline.preprocess_example(ex, c, train=True, flip=tf.constant(True)))
  # Valid region flipped, padding untouched.
  np.testing.assert_array_equal(b['image'][:32], a['image'][:32, ::-1])
  assert not b['image'][32:].any()
  nw = a['image_shape'][1]
  ya1, xa1, ya2, xa2 = a['gt_boxes'][:2].T
  np.testing.assert_allclose(
      b['gt_boxes'][:2], np.stack([ya1, nw - xa2, ya2, nw - xa1], 1), atol=1e-4
  )
  np.testing.assert_array_equal(b['gt_layers'], a['gt_layers'][:, :, ::-1])
  # Boxes of the flipped masks, computed independently in numpy.
  flipped = tfds_builders.boxes_from_masks(index[:, :, ::-1] > 0) * 1.6
  np.testing.assert_allclose(b['gt_boxes'][:2], flipped, rtol=1e-6)


def test_flip_of_a_tall_image_keeps_padding_right_and_flips_glm_image():
  """The source image is flipped before resizing, so the valid region stays
  at the left of the canvas (padding right), and the GLM image is the
  resize of the flipped canvas."""
  image, index = _scene(40, 20, seed=6)  # tall: 40 x 20 -> 64 x 32 on the canvas
  c = _config()
  ex = _example(image, index, [0, 1])
  a = _np(pipeline.preprocess_example(ex, c, train=True, flip=tf.constant(False)))
  b = _np(pipeline.preprocess_example(ex, c, train=True, flip=tf.constant(True)))
  np.testing.assert_array_equal(b['image_shape'], [64, 32])
  np.testing.assert_array_equal(b['image'][:, :32], a['image'][:, :32][:, ::-1])
  assert not b['image'][:, 32:].any()
  glm = tf.image.resize(b['image'], [33, 33], method='bilinear', antialias=False)
  np.testing.assert_array_equal(b['glm_image'], preprocess.to_uint8(glm.numpy()))
  assert not np.array_equal(b['glm_image'], a['glm_image'])
  flipped = tfds_builders.boxes_from_masks(index[:, :, ::-1] > 0) * 1.6
  np.testing.assert_allclose(b['gt_boxes'][:2], flipped, rtol=1e-6)
  np.testing.assert_array_equal(b['gt_layers'], a['gt_layers'][:, :, ::-1])


@pytest.mark.parametrize('num_layers', [1, 3])
def test_gt_layers_crop_equals_numpy_crop(num_layers):
  # Box of exactly K x K source pixels, scale 1 -> crop is an exact copy.
  rng = np.random.default_rng(1)
  k = 16
  amodal = np.zeros((3, 64, 64), bool)
  amodal[0, 10 : 10 + k, 20 : 20 + k] = True
  amodal[1, 12:40, 25:50] = True
  amodal[2, 5:30, 15:45] = True
  occluded = amodal & (rng.random(amodal.shape) < 0.5)
  occluded[2] = False
  index = semdist.layer_index_map(amodal, occluded, np.array([2, 1, 0]))
  assert index.max() >= 3  # layers beyond L-1 get merged when L = 1 or 3
  c = _config()
  c.model.num_layers = num_layers
  image = np.zeros((64, 64, 3), np.uint8)
  out = _np(pipeline.preprocess_example(_example(image, index, [2, 1, 0]), c, train=False))
  # Sorted by depth: instance 2 first, then 1, then 0.
  np.testing.assert_array_equal(out['gt_depth_rank'][:3], [0, 1, 2])
  np.testing.assert_array_equal(out['gt_boxes'][2], [10, 20, 26, 36])
  expected = semdist.layer_channels(index[0], num_layers)[:, 10:26, 20:36]
  np.testing.assert_array_equal(out['gt_layers'][2], np.moveaxis(expected, 0, -1))
  assert out['gt_layers'].shape == (4, k, k, num_layers)
  # Every crop's channel sum is the amodal mask (one layer per pixel).
  assert set(np.unique(out['gt_layers'][:3].sum(-1))) <= {0.0, 1.0}


def test_gt_layers_of_boxes_ending_on_the_image_edge_keep_their_last_row():
  """Objects that run to the bottom-right image edge: every sample of the
  box lies on the object, so the whole target is 1. TF's crop_and_resize
  alone would return 0 on the last row or column of ~4% of these boxes
  (its float32 sample position lands a rounding step outside the image)."""
  rng = np.random.default_rng(0)
  h, w, n, k = 97, 131, 200, 28
  y1 = rng.integers(0, h - 2, n)
  x1 = rng.integers(0, w - 2, n)
  index = np.zeros((n, h, w), np.uint8)
  for i in range(n):
    index[i, y1[i] :, x1[i] :] = 1
  boxes = np.stack([y1, x1, np.full(n, h), np.full(n, w)], 1).astype(np.float32)
  crops = pipeline.crop_layers(tf.constant(index), tf.constant(boxes), 2, k).numpy()
  assert crops.shape == (n, k, k, 2)
  np.testing.assert_array_equal(crops[..., 0], 1.0)
  np.testing.assert_array_equal(crops[..., 1], 0.0)


def test_crop_layers_half_way_sample_counts_as_inside():
  """Thresholding at 0.5 keeps a sample that falls exactly between an object
  pixel and a background one (as ``_crop_np``); reachable with odd K."""
  index = np.array([[[1, 0, 0, 0]]], np.uint8)  # 1 x 4 image, object at x=0
  box = np.array([0, 0, 1, 2], np.float32)  # columns 0..1 -> K=3 at 0, .5, 1
  crops = pipeline.crop_layers(tf.constant(index), tf.constant(box[None]), 1, 3)
  ref = _crop_np(semdist.layer_channels(index[0], 1), box, 3)
  np.testing.assert_array_equal(ref[..., 0], [[1, 1, 0]] * 3)
  np.testing.assert_array_equal(crops.numpy()[0], ref)


def test_per_instance_fields_follow_the_depth_sort():
  """Every per-instance output is gathered in the same (stable) depth order
  and cut to M: class, occlusion rate, stuff flag, rank and box."""
  h = w = 32
  n = 6
  index = np.zeros((n, h, w), np.uint8)
  for i in range(n):
    index[i, i : i + 5, 2 * i : 2 * i + 6] = 1
  depth = np.array([3, 1, 4, 1, 0, 2])
  c = _config()
  c.dataset.category_agnostic = False
  ex = _example(np.zeros((h, w, 3), np.uint8), index, depth)
  out = _np(pipeline.preprocess_example(ex, c, train=False))
  order = np.argsort(depth, kind='stable')[:4]
  np.testing.assert_array_equal(order, [4, 1, 3, 5])
  np.testing.assert_array_equal(out['gt_classes'], order + 3)
  np.testing.assert_allclose(out['gt_occlude_rate'], np.linspace(0, 0.5, n)[order], rtol=1e-6)
  np.testing.assert_array_equal(out['gt_is_stuff'], order % 2 == 1)
  np.testing.assert_array_equal(out['gt_depth_rank'], depth[order])
  np.testing.assert_allclose(out['gt_boxes'], tfds_builders.boxes_from_masks(index[order] > 0) * 2)


def test_padding_truncation_and_validity():
  h = w = 32
  n = 6
  index = np.zeros((n, h, w), np.uint8)
  for i in range(n):
    index[i, i : i + 5, 2 * i : 2 * i + 6] = 1
  index[5] = 0  # empty mask: kept but invalid
  depth = np.array([5, 4, 3, 2, 0, 1])
  ex = _example(np.zeros((h, w, 3), np.uint8), index, depth)
  out = _np(pipeline.preprocess_example(ex, _config(), train=False))
  # max_instances = 4: the four front-most by depth (instances 4, 5, 3, 2).
  np.testing.assert_array_equal(out['gt_depth_rank'], [0, 1, 2, 3])
  np.testing.assert_array_equal(out['gt_valid'], [True, False, True, True])
  np.testing.assert_array_equal(out['gt_classes'], [1, 0, 1, 1])
  np.testing.assert_array_equal(out['gt_boxes'][1], 0)
  np.testing.assert_array_equal(out['gt_layers'][1], 0)
  np.testing.assert_allclose(out['gt_boxes'][0], np.array([4, 8, 9, 14]) * 2)
  np.testing.assert_array_equal(out['gt_is_stuff'], [False, True, True, False])
  # Fewer instances than M: zero padding.
  ex2 = _example(np.zeros((h, w, 3), np.uint8), index[:2], [0, 1])
  c = _config()
  c.dataset.category_agnostic = False
  out2 = _np(pipeline.preprocess_example(ex2, c, train=False))
  np.testing.assert_array_equal(out2['gt_valid'], [True, True, False, False])
  np.testing.assert_array_equal(out2['gt_classes'], [3, 4, 0, 0])
  np.testing.assert_array_equal(out2['gt_occlude_rate'][2:], 0)
  dummy = _np(pipeline.dummy_example(c))
  assert set(dummy) == set(out2) and not dummy['is_valid']
  for key in out2:
    assert dummy[key].shape == out2[key].shape, key
    assert dummy[key].dtype == out2[key].dtype, key


@pytest.mark.parametrize('shape', [(32, 32), (20, 40)])
def test_box_jitter_is_bounded_and_seeded(shape):
  image, index = _scene(*shape)
  c = _config(box_jitter=1 / 15, random_flip=False)
  ex = _example(image, index, [0, 1])
  seed = tf.constant([3, 4], tf.int64)
  a = _np(pipeline.preprocess_example(ex, c, train=True, seed=seed))
  b = _np(pipeline.preprocess_example(ex, c, train=True, seed=seed))
  plain = _np(pipeline.preprocess_example(ex, c, train=False))
  np.testing.assert_array_equal(a['gt_boxes'], b['gt_boxes'])
  assert not np.allclose(a['gt_boxes'][:2], plain['gt_boxes'][:2])
  p = plain['gt_boxes'][:2]
  size = np.stack([p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]] * 2, 1)
  assert np.all(np.abs(a['gt_boxes'][:2] - p) <= size / 15 + 1e-4)
  assert np.all(a['gt_boxes'] >= 0)
  assert np.all(a['gt_boxes'] <= np.tile(a['image_shape'], 2) + 1e-4)


def test_box_jitter_moves_only_the_matching_boxes_never_the_masks():
  """Release: the jitter changes the GT boxes of IoU matching and box
  deltas, not the masks. gt_layers stay cropped to the tight boxes
  (gt_layer_boxes), so mask targets keep the object pixels beyond a jittered
  edge that moved inward (cropping to the jittered box cut them off)."""
  from sln_jax.ops import targets  # pylint: disable=import-outside-toplevel

  yy, xx = np.mgrid[:64, :64]
  amodal = np.stack(
      [
          ((yy - 24) / 16.0) ** 2 + ((xx - 26) / 20.0) ** 2 <= 1,
          ((yy - 40) / 18.0) ** 2 + ((xx - 38) / 14.0) ** 2 <= 1,
      ]
  )
  occluded = np.zeros_like(amodal)
  occluded[1] = amodal[0] & amodal[1]
  index = semdist.layer_index_map(amodal, occluded, np.array([0, 1]))
  c = _config(box_jitter=1 / 15, random_flip=False)
  ex = _example(np.zeros((64, 64, 3), np.uint8), index, [0, 1])
  jit = _np(pipeline.preprocess_example(ex, c, train=True, seed=tf.constant([3, 4], tf.int64)))
  plain = _np(pipeline.preprocess_example(ex, c, train=False))
  tight = plain['gt_boxes']
  # The seed moves some edge of each object inward.
  box = jit['gt_boxes'][:2]
  assert ((box[:, :2] > tight[:2, :2]).any(1) | (box[:, 2:] < tight[:2, 2:]).any(1)).all()
  np.testing.assert_array_equal(jit['gt_layers'], plain['gt_layers'])
  np.testing.assert_array_equal(plain['gt_layer_boxes'], tight)
  np.testing.assert_array_equal(jit['gt_layer_boxes'], tight)
  # Through the targets: ROI = the true box, S = K -> the whole crop.
  k, size = c.input.gt_mask_size, c.input.image_size
  got = np.asarray(
      targets.mask_targets(
          jit['gt_layers'], jit['gt_layer_boxes'] / size, tight[:2] / size, np.arange(2), k
      )
  )
  np.testing.assert_array_equal(got, plain['gt_layers'][:2])


@pytest.mark.parametrize(
    'mode,shape', [('pad', (37, 53)), ('pad', (90, 70)), ('squash', (48, 100))]
)
def test_inference_preprocessing_matches_pipeline(mode, shape):
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  c = _config(resize_mode=mode)
  ex = _example(image, np.zeros((1,) + shape, np.uint8), [0])
  out = _np(pipeline.preprocess_example(ex, c, train=False))
  canvas, image_shape, image_scale, glm = pipeline.preprocess_image_for_inference(image, c)
  assert canvas.dtype == np.uint8 and glm.dtype == np.uint8
  assert np.abs(canvas.astype(int) - out['image']).max() <= 1
  assert np.abs(glm.astype(int) - out['glm_image']).max() <= 1
  np.testing.assert_array_equal(image_shape, out['image_shape'])
  np.testing.assert_allclose(image_scale, out['image_scale'], rtol=1e-6)


def test_inference_preprocessing_of_gray_and_rgba_images():
  """Grayscale (H, W) is broadcast to RGB; an alpha channel is dropped."""
  rng = np.random.default_rng(7)
  rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  gray = rgb[..., 0]
  rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 53, 1), np.uint8)], 2)
  c = _config()
  pairs = [(gray, np.repeat(gray[..., None], 3, axis=2)), (rgba, rgb)]
  for image, same_as in pairs:
    got = pipeline.preprocess_image_for_inference(image, c)
    want = pipeline.preprocess_image_for_inference(same_as, c)
    assert got[0].shape == (64, 64, 3) and got[3].shape == (33, 33, 3)
    for g, e in zip(got, want):
      np.testing.assert_array_equal(g, e)


# Image -> canvas resizes: D2SA and KINS shrink into 1024, COCOA grows; the
# squashed KINS image and the last one grow on one axis and shrink on the other.
RESIZES = [
    ((1440, 1920), (768, 1024)),
    ((375, 1242), (309, 1024)),
    ((61, 97), (29, 64)),
    ((480, 640), (768, 1024)),
    ((37, 53), (45, 64)),
    ((375, 1242), (1024, 1024)),
    ((300, 90), (150, 200)),
]


@pytest.mark.parametrize('src,dst', RESIZES)
def test_antialiased_numpy_twin_matches_tf(src, dst):
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, src + (3,), dtype=np.uint8)
  aa = tf.image.resize(image, dst, method='bilinear', antialias=True).numpy()
  plain = tf.image.resize(image, dst, method='bilinear').numpy()
  twin = preprocess.resize_bilinear_np(image, *dst, antialias=True)
  ours = pipeline._resize_uint8(tf.constant(image), dst, antialias=True).numpy()
  diff = np.abs(ours.astype(int) - preprocess.to_uint8(twin))
  assert diff.max() <= 1 and (diff == 0).mean() >= 0.999
  if dst[0] < src[0] or dst[1] < src[1]:
    np.testing.assert_allclose(twin, aa, atol=1e-3)
    np.testing.assert_array_equal(ours, preprocess.to_uint8(aa))
  else:
    # Enlarging: the triangle filter is plain bilinear (up to float rounding),
    # and the pipeline keeps ResizeBilinear's result exactly.
    np.testing.assert_allclose(aa, plain, atol=1e-3)
    np.testing.assert_array_equal(ours, preprocess.to_uint8(plain))
    np.testing.assert_allclose(twin, plain, atol=1e-3)


@pytest.mark.parametrize(
    'src,dst',
    [((375, 1242), (309, 1024)), ((375, 1242), (1024, 1024)), ((1440, 1920), (768, 1024))],
)
def test_antialiased_resize_is_pil_bilinear(src, dst):
  """The release resizes with scipy.misc.imresize = PIL BILINEAR (uint8)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, src + (3,), dtype=np.uint8)
  pil = np.asarray(Image.fromarray(image).resize(dst[::-1], Image.Resampling.BILINEAR)).astype(int)
  for antialias in (True, False):
    ours = pipeline._resize_uint8(tf.constant(image), dst, antialias).numpy()
    twin = preprocess.to_uint8(preprocess.resize_bilinear_np(image, *dst, antialias=antialias))
    for got in (ours, twin):
      diff = np.abs(got.astype(int) - pil)
      if antialias:  # PIL rounds to uint8 between its two passes
        assert diff.mean() < 0.3 and diff.max() <= 1
      else:
        assert diff.mean() > 2


def test_canvas_is_antialiased_and_glm_image_is_not():
  image = np.random.default_rng(5).integers(0, 256, (150, 100, 3), np.uint8)
  out = _np(
      pipeline.preprocess_example(
          _example(image, np.zeros((1, 150, 100), np.uint8), [0]), _config(), train=False
      )
  )
  np.testing.assert_array_equal(out['image_shape'], [64, 43])
  aa = tf.image.resize(image, [64, 43], method='bilinear', antialias=True)
  np.testing.assert_array_equal(out['image'][:, :43], preprocess.to_uint8(aa.numpy()))
  glm = tf.image.resize(out['image'], [33, 33], method='bilinear', antialias=False)
  np.testing.assert_array_equal(out['glm_image'], preprocess.to_uint8(glm.numpy()))


# ------------------------------------------------------------ end to end
NUM_TRAIN, NUM_VAL = 6, 5


@pytest.fixture(scope='module')
def synthetic_config(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('synthetic')
  c = tiny.get_config()
  c.dataset.name = 'synthetic'
  c.dataset.data_dir = str(tmp / 'tfds')
  c.dataset.manual_dir = str(tmp / 'raw')
  s = c.dataset.synthetic
  s.image_size, s.num_train, s.num_val, s.seed = 64, NUM_TRAIN, NUM_VAL, 0
  c.input.shuffle_buffer = 8
  c.model.num_layers = 2
  tfds_builders.build_dataset(c)
  return c


def _expected_shapes(c, d, b):
  s, m, k = c.input.image_size, c.input.max_instances, c.input.gt_mask_size
  g, nl = c.model.glm.image_size, c.model.num_layers
  return {
      'image': ((d, b, s, s, 3), np.uint8),
      'glm_image': ((d, b, g, g, 3), np.uint8),
      'image_shape': ((d, b, 2), np.float32),
      'image_scale': ((d, b, 2), np.float32),
      'image_id': ((d, b), np.int32),
      'gt_boxes': ((d, b, m, 4), np.float32),
      'gt_classes': ((d, b, m), np.int32),
      'gt_valid': ((d, b, m), np.bool_),
      'gt_layers': ((d, b, m, k, k, nl), np.float32),
      'gt_layer_boxes': ((d, b, m, 4), np.float32),
      'gt_occlude_rate': ((d, b, m), np.float32),
      'gt_is_stuff': ((d, b, m), np.bool_),
      'gt_depth_rank': ((d, b, m), np.int32),
      'is_valid': ((d, b), np.bool_),
  }


def test_train_batch_shapes_and_dtypes(synthetic_config):
  c = synthetic_config
  builder = tfds_builders.build_dataset(c)  # already prepared: reused
  assert builder.info.splits['train'].num_examples <= NUM_TRAIN
  assert os.path.isfile(os.path.join(c.dataset.manual_dir, tfds_builders.Synthetic.PARAMS_FILE))
  it = pipeline.create_split(
      c, 'train', train=True, num_local_devices=2, per_device_batch=2, builder=builder
  )
  batch = next(it)
  expected = _expected_shapes(c, 2, 2)
  assert set(batch) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape, key
    assert batch[key].dtype == dtype, key
  assert batch['is_valid'].all() and batch['gt_valid'].any()
  assert set(np.unique(batch['gt_layers'])) <= {0.0, 1.0}
  valid = batch['gt_valid']
  boxes = batch['gt_boxes'][valid]
  assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  np.testing.assert_array_equal(batch['gt_layer_boxes'][~valid], 0)
  hw = np.repeat(batch['image_shape'][:, :, None, :], c.input.max_instances, 2)
  assert np.all(boxes[:, 2:] <= hw[valid] + 1e-4)
  # One-hot layers: at most one channel per pixel.
  assert batch['gt_layers'].sum(-1).max() <= 1
  next(it)  # repeats past the end of the split


def test_train_split_flips_some_examples_and_not_others(synthetic_config):
  """Training applies the random horizontal flip (input.random_flip, no
  jitter in the tiny config), one decision per example: each training
  example is its evaluation twin or that twin mirrored, and both occur."""
  c = synthetic_config
  builder = tfds_builders.build_dataset(c)
  assert c.input.random_flip and c.input.box_jitter == 0
  plain = {}
  for b in pipeline.create_split(
      c, 'train', train=False, num_local_devices=1, per_device_batch=1, builder=builder
  ):
    plain[int(b['image_id'][0, 0])] = {k: v[0, 0] for k, v in b.items()}
  it = pipeline.create_split(
      c, 'train', train=True, num_local_devices=1, per_device_batch=4, builder=builder
  )
  seen = set()
  for _ in range(3):
    batch = next(it)
    for j in range(4):
      got = {k: v[0, j] for k, v in batch.items()}
      ref = plain[int(got['image_id'])]
      v = got['gt_valid']
      nw = ref['image_shape'][1]
      if np.array_equal(got['image'], ref['image']):
        seen.add(False)
        np.testing.assert_array_equal(got['gt_layers'], ref['gt_layers'])
        np.testing.assert_array_equal(got['gt_boxes'], ref['gt_boxes'])
      else:
        seen.add(True)
        np.testing.assert_array_equal(got['image'], ref['image'][:, ::-1])
        np.testing.assert_array_equal(got['gt_layers'][v], ref['gt_layers'][v][:, :, ::-1])
        y1, x1, y2, x2 = ref['gt_boxes'][v].T
        np.testing.assert_allclose(
            got['gt_boxes'][v], np.stack([y1, nw - x2, y2, nw - x1], 1), atol=1e-4
        )
  assert seen == {False, True}


def _crop_np(channels, box, k):
  """Independent numpy crop: bilinear samples on rows y1..y2-1, columns
  x1..x2-1 of (L, H, W) channels (tf.image.crop_and_resize semantics)."""
  y1, x1, y2, x2 = box
  ys = y1 + np.arange(k) * (y2 - 1 - y1) / (k - 1)
  xs = x1 + np.arange(k) * (x2 - 1 - x1) / (k - 1)

  def taps(v, size):
    lo = np.floor(v).astype(int)
    return lo, np.minimum(lo + 1, size - 1), v - lo

  y0, y1i, fy = taps(ys, channels.shape[1])
  x0, x1i, fx = taps(xs, channels.shape[2])
  c = channels.astype(np.float64)
  top = c[:, y0][:, :, x0] * (1 - fx) + c[:, y0][:, :, x1i] * fx
  bot = c[:, y1i][:, :, x0] * (1 - fx) + c[:, y1i][:, :, x1i] * fx
  out = top * (1 - fy)[None, :, None] + bot * fy[None, :, None]
  return np.moveaxis(out >= 0.5, 0, -1).astype(np.float32)


def test_eval_targets_match_numpy_reference(synthetic_config):
  c = synthetic_config
  builder = tfds_builders.build_dataset(c)
  raw = {int(e['image_id']): e for e in tfds.as_numpy(builder.as_dataset(split='val'))}
  batch = next(
      pipeline.create_split(
          c, 'val', train=False, num_local_devices=1, per_device_batch=2, builder=builder
      )
  )
  k, m, nl = c.input.gt_mask_size, c.input.max_instances, c.model.num_layers
  checked = 0
  for b in range(2):
    ex = raw[int(batch['image_id'][0, b])]
    inst = ex['instances']
    order = np.argsort(inst['depth_rank'], kind='stable')[:m]
    scale = batch['image_scale'][0, b]
    for j, i in enumerate(order):
      box = inst['bbox'][i]
      np.testing.assert_allclose(batch['gt_boxes'][0, b, j], box * np.tile(scale, 2), rtol=1e-5)
      np.testing.assert_array_equal(batch['gt_layer_boxes'][0, b, j], batch['gt_boxes'][0, b, j])
      ref = _crop_np(semdist.layer_channels(inst['layer_index'][i], nl), box, k)
      # Bilinear weights can land within float error of 0.5: allow a pixel.
      assert np.abs(batch['gt_layers'][0, b, j] - ref).sum() <= 1
      checked += 1
  assert checked >= 2


def _eval_ids(c, **kwargs):
  batches = list(pipeline.create_split(c, c.dataset.eval_split, train=False, **kwargs))
  ids = np.concatenate([b['image_id'].reshape(-1) for b in batches])
  valid = np.concatenate([b['is_valid'].reshape(-1) for b in batches])
  return batches, ids, valid


def test_eval_split_is_deterministic_and_padded(synthetic_config):
  c = synthetic_config
  n = tfds_builders.build_dataset(c).info.splits['val'].num_examples
  batches, ids, valid = _eval_ids(c, num_local_devices=1, per_device_batch=2)
  assert len(batches) == -(-n // 2) and valid.sum() == n
  assert not valid[n:].any() and np.all(ids[~valid] == -1)
  last = batches[-1]
  if n % 2:
    assert not last['gt_valid'][0, 1].any() and not last['image'][0, 1].any()
  _, ids2, _ = _eval_ids(c, num_local_devices=1, per_device_batch=2)
  np.testing.assert_array_equal(ids, ids2)
  # Two process shards: disjoint, together the whole split, same length.
  b0, ids0, v0 = _eval_ids(c, num_local_devices=1, per_device_batch=2, shard_index=0, num_shards=2)
  b1, ids1, v1 = _eval_ids(c, num_local_devices=1, per_device_batch=2, shard_index=1, num_shards=2)
  assert len(b0) == len(b1)
  assert not set(ids0[v0]) & set(ids1[v1])
  assert set(ids0[v0]) | set(ids1[v1]) == set(ids[valid])
  # Split slicing: the first 3 images, same order.
  b3, ids3, v3 = _eval_ids(_sliced(c), num_local_devices=1, per_device_batch=2)
  assert len(b3) == 2 and v3.sum() == 3
  np.testing.assert_array_equal(ids3[v3], ids[:3])


def _sliced(c):
  c = c.copy_and_resolve_references()
  c.dataset.eval_split = 'val[:3]'
  return c


def test_synthetic_params_mismatch_is_refused(synthetic_config):
  c = tiny.get_config()
  c.dataset.name = 'synthetic'
  c.dataset.data_dir = synthetic_config.dataset.data_dir
  c.dataset.manual_dir = synthetic_config.dataset.manual_dir
  c.dataset.synthetic.image_size = 64
  c.dataset.synthetic.num_train = NUM_TRAIN + 1
  with pytest.raises(tfds_builders.errors.UserError, match='sln_synthetic'):
    tfds_builders.build_dataset(c)


def test_truncation_is_counted(synthetic_config):
  builder = tfds_builders.build_dataset(synthetic_config)
  counts = builder.info.metadata['num_instances']['train']
  assert len(counts) == builder.info.splits['train'].num_examples
  assert pipeline._log_truncation(builder, 'train', 0) == len(counts)
  assert pipeline._log_truncation(builder, 'train', max(counts)) == 0


def test_unknown_split_is_a_user_error(synthetic_config):
  with pytest.raises(tfds_builders.errors.UserError, match='available: train, val'):
    pipeline.create_split(
        synthetic_config, 'test', train=False, num_local_devices=1, per_device_batch=1
    )


def test_training_targets_agree_with_the_scene_polygons_and_depth_order(synthetic_config):
  """Stage a of the occlusion diagnosis: the layered targets of a training
  batch (random flip, resize, padding, crop) against the scene as written:
  each region's polygon rasterised by pycocotools, flipped when the image
  is, and split into the part no region in front covers (visible) and the
  rest (hidden), by the regions' ``order`` alone. Every instance's crop
  agrees with that split on all but a boundary fringe of its samples, and
  its hidden samples lie under a region in front (up to that fringe)."""
  import json  # pylint: disable=import-outside-toplevel

  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel

  c = synthetic_config
  with open(os.path.join(c.dataset.manual_dir, 'annotations', 'COCO_amodal_train2014.json')) as f:
    data = json.load(f)
  scenes = {a['image_id']: a for a in data['annotations']}
  plain = {
      int(b['image_id'][0, 0]): b['image'][0, 0]
      for b in pipeline.create_split(
          c, 'train', train=False, num_local_devices=1, per_device_batch=1
      )
  }
  batch = next(
      pipeline.create_split(c, 'train', train=True, num_local_devices=1, per_device_batch=6)
  )
  k = c.input.gt_mask_size
  checked, flips, hidden_total = 0, set(), 0
  for b in range(6):
    image_id = int(batch['image_id'][0, b])
    flip = not np.array_equal(batch['image'][0, b], plain[image_id])
    flips.add(flip)
    regions = sorted(scenes[image_id]['regions'], key=lambda r: r['order'])
    h = w = c.dataset.synthetic.image_size
    amodal = np.stack(
        [
            mask_utils.decode(mask_utils.frPyObjects([r['segmentation']], h, w))[..., 0] > 0
            for r in regions
        ]
    )
    if flip:
      amodal = amodal[:, :, ::-1]
    front = np.cumsum(amodal, 0) - amodal  # regions in front covering each pixel
    visible, hidden = amodal & (front == 0), amodal & (front > 0)
    for j in range(int(batch['gt_valid'][0, b].sum())):
      y1, x1, y2, x2 = batch['gt_layer_boxes'][0, b, j]  # canvas = source pixels here
      ys = np.round(y1 + np.arange(k) * (y2 - 1 - y1) / (k - 1)).astype(int)
      xs = np.round(x1 + np.arange(k) * (x2 - 1 - x1) / (k - 1)).astype(int)
      got = batch['gt_layers'][0, b, j] > 0.5  # (K, K, 2): visible, occluded
      want = np.stack([visible[j][np.ix_(ys, xs)], hidden[j][np.ix_(ys, xs)]], -1)
      # Bilinear samples between pixels may round the other way on edges.
      assert (got != want).sum() <= 0.06 * max(want.sum(), 1) + 2, (image_id, j)
      under_front = (front[j] > 0)[np.ix_(ys, xs)]
      assert (got[..., 1] & ~under_front).sum() <= 0.1 * got[..., 1].sum() + 2, (image_id, j)
      hidden_total += int(got[..., 1].sum())
      checked += 1
  assert checked >= 12 and hidden_total > 0
