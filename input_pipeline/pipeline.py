"""tf.data input pipeline: TFDS examples -> fixed-shape training/eval batches.

Batches follow docs/architecture.md ("Batches"), leading axes
(num_local_devices, per_device_batch), plus ``is_valid`` (B,) bool: False on
the dummy examples that pad the last evaluation batch (always True in
training).

Per example (``preprocess_example``):
  1. instances sorted by ``depth_rank`` (stable) and cut to
     ``input.max_instances`` (front-most kept; ``create_dataset`` logs how many
     images of the split exceed it, from the builder's metadata);
  2. optional horizontal flip (training, ``input.random_flip``) of the image
     and the layer index maps together, in source pixels;
  3. boxes from the (flipped) amodal masks, (y1, x1, y2, x2) with y2/x2
     exclusive, then optional release box jitter (``input.box_jitter``, each
     coordinate moved by U(-1, 1) * jitter * box height/width, clipped to the
     image). As in the release (utils.extract_bboxes), the jitter only moves
     ``gt_boxes`` (IoU matching and box-delta targets); the masks are cropped
     with the tight boxes, kept as ``gt_layer_boxes`` (equal to ``gt_boxes``
     without jitter);
  4. resize: 'pad' keeps the aspect ratio (longer side -> S, other side
     rounded half up) and pads bottom/right with 0 to S x S; 'squash' (release
     QUIRK) resizes to S x S. Bilinear with half-pixel centres, antialiased
     on shrinking as the release's ``scipy.misc.imresize`` (PIL BILINEAR: a
     triangle filter whose support widens by the shrink factor), rounded to
     uint8 (``_resize_uint8(antialias=True)``).
     ``image_scale`` = (new_h / H, new_w / W); ``gt_boxes`` (and
     ``gt_layer_boxes``) = source boxes x scale, i.e. the boxes of the
     resized masks in continuous pixel coordinates (computing them from masks
     resized to S x S would only add quantisation and cost N x S x S work);
  5. ``gt_layers``: the one-hot layer channels (``semdist.layer_channels``:
     L = model.num_layers, layers >= L-1 merged) of each instance,
     ``tf.image.crop_and_resize``d (bilinear) to K x K = gt_mask_size and
     rounded to 0/1. Sampling grid: rows y1 .. y2 - 1 (first to last pixel
     row of the tight, un-jittered box, in source pixels) and likewise
     columns; an axis-aligned box of K x K source pixels is copied exactly.
     Cropping the source-resolution maps equals cropping the resized ones up
     to resampling;
  6. padding to M = max_instances (``gt_valid`` False, zeros elsewhere);
     instances with an empty amodal mask are kept but invalid;
  7. ``glm_image``: the uint8 canvas resized bilinearly to model.glm.image_size
     (no antialiasing: the release's GLM input is not resized by PIL).
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import tfds_builders
from sln_jax import config_checks, errors, preprocess

# Keys and dtypes of one example (a batch adds the two leading axes).
BATCH_KEYS = (
    'image',
    'glm_image',
    'image_shape',
    'image_scale',
    'image_id',
    'gt_boxes',
    'gt_classes',
    'gt_valid',
    'gt_layers',
    'gt_layer_boxes',
    'gt_occlude_rate',
    'gt_is_stuff',
    'gt_depth_rank',
    'is_valid',
)


# ------------------------------------------------------------------ geometry
def resized_size(height, width, image_size: int, resize_mode: str):
  """(new_h, new_w) of the resized image inside the S x S canvas.

  'pad': the longer side becomes S, the other is rounded half up (integer
  arithmetic, so numpy and TF agree exactly); 'squash': (S, S). Takes python
  / numpy ints or TF int32 scalars and returns the same kind.
  """
  if resize_mode not in config_checks.RESIZE_MODES:
    raise ValueError(
        f'input.resize_mode must be one of {config_checks.RESIZE_MODES}, ' f'got {resize_mode!r}'
    )
  if isinstance(height, tf.Tensor):
    if resize_mode == 'squash':
      return tf.constant(image_size), tf.constant(image_size)
    m = tf.maximum(height, width)
    rnd = lambda v: tf.maximum((2 * v * image_size + m) // (2 * m), 1)  # noqa: E731
    return rnd(height), rnd(width)
  return preprocess.resized_size(height, width, image_size, resize_mode)


def _resize_uint8(image: tf.Tensor, size, antialias: bool = False) -> tf.Tensor:
  """Bilinear resize with half-pixel centres, rounded to uint8.

  Args:
    image: (H, W, C).
    size: (new_h, new_w), python ints or int32 scalars / a (2,) tensor.
    antialias: PIL's ``Image.resize(BILINEAR)`` (the release's
      ``scipy.misc.imresize``): a triangle filter whose support widens by the
      shrink factor on shrinking axes, weights normalised per output pixel,
      taps outside the image dropped; TF's ScaleAndTranslate
      (``tf.image.resize(antialias=True)``). Used only when an axis shrinks:
      on enlarging it is plain bilinear, the same filter, but that op's float
      arithmetic differs from ResizeBilinear's by ~3e-5 (1 level on ~0.01% of
      pixels), so images that only grow keep the ResizeBilinear result
      bit for bit. ``preprocess.resize_bilinear_np`` is the numpy twin of both paths.

  Returns:
    (new_h, new_w, C) uint8.
  """

  def resize(aa):
    return tf.image.resize(image, size, method='bilinear', antialias=aa)

  if antialias:
    shrinks = tf.reduce_any(tf.convert_to_tensor(size, tf.int32) < tf.shape(image)[:2])
    out = tf.cond(shrinks, lambda: resize(True), lambda: resize(False))
  else:
    out = resize(False)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def boxes_from_masks_tf(masks: tf.Tensor) -> tf.Tensor:
  """(N, H, W) bool -> (N, 4) float32 (y1, x1, y2, x2), y2/x2 exclusive;
  zeros for empty masks."""
  rows = tf.cast(tf.reduce_any(masks, axis=2), tf.int32)  # (N, H)
  cols = tf.cast(tf.reduce_any(masks, axis=1), tf.int32)  # (N, W)
  h, w = tf.shape(rows)[1], tf.shape(cols)[1]
  y1 = tf.argmax(rows, axis=1, output_type=tf.int32)
  y2 = h - tf.argmax(tf.reverse(rows, [1]), axis=1, output_type=tf.int32)
  x1 = tf.argmax(cols, axis=1, output_type=tf.int32)
  x2 = w - tf.argmax(tf.reverse(cols, [1]), axis=1, output_type=tf.int32)
  boxes = tf.cast(tf.stack([y1, x1, y2, x2], axis=1), tf.float32)
  nonempty = tf.reduce_any(rows > 0, axis=1)
  return tf.where(nonempty[:, None], boxes, tf.zeros_like(boxes))


def layer_channels_tf(index: tf.Tensor, num_layers: int) -> tf.Tensor:
  """(N, H, W) layer index -> (N, H, W, L) float32 one-hot layers, layers
  >= L-1 merged into the last channel (channels-last ``semdist.layer_channels``)."""
  index = tf.cast(index, tf.int32)[..., None]
  ks = tf.range(1, num_layers + 1, dtype=tf.int32)
  onehot = tf.equal(index, ks)
  last = tf.concat([tf.zeros([num_layers - 1], tf.bool), [True]], 0)
  onehot = tf.logical_or(onehot, tf.logical_and(index >= num_layers, last))
  return tf.cast(onehot, tf.float32)


def crop_layers(index: tf.Tensor, boxes: tf.Tensor, num_layers: int, mask_size: int) -> tf.Tensor:
  """Crops each instance's layer channels to its box.

  Args:
    index: (N, H, W) uint8 layer index maps (source pixels).
    boxes: (N, 4) float32 (y1, x1, y2, x2) source pixels, y2/x2 exclusive.
    num_layers: L.
    mask_size: K.

  Returns:
    (N, K, K, L) float32 in {0, 1}: bilinear samples on rows y1 .. y2-1 and
    columns x1 .. x2-1, thresholded at 0.5.
  """
  # One more row and column, copies of the last ones: TF's float32 sample
  # positions overshoot the last pixel row of a box that ends on the image
  # edge by a rounding step for ~4% of boxes (a zero row of target there);
  # inside the padded map the overshoot reads the copied edge row instead.
  index = tf.pad(index, [[0, 0], [0, 1], [0, 1]], mode='SYMMETRIC')
  shape = tf.shape(index)
  hm1 = tf.cast(shape[1] - 1, tf.float32)
  wm1 = tf.cast(shape[2] - 1, tf.float32)
  y1, x1, y2, x2 = tf.unstack(boxes, axis=1)
  norm = tf.stack([y1 / hm1, x1 / wm1, (y2 - 1.0) / hm1, (x2 - 1.0) / wm1], 1)
  crops = tf.image.crop_and_resize(
      layer_channels_tf(index, num_layers),
      norm,
      tf.range(tf.shape(boxes)[0]),
      [mask_size, mask_size],
      method='bilinear',
  )
  return tf.cast(crops >= 0.5, tf.float32)


def _pad_to(x: tf.Tensor, m: int) -> tf.Tensor:
  """Pads/cuts the leading axis to m with zeros (static shape)."""
  x = x[:m]
  pad = [[0, m - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  out = tf.pad(x, pad)
  out.set_shape([m] + x.shape.as_list()[1:])
  return out


# ------------------------------------------------------------------ examples
def decode_example(features: tfds.features.FeaturesDict, raw: dict) -> dict:
  """Decodes the image and layer maps left encoded by ``_decoders``."""
  inst = dict(raw['instances'])
  inst['layer_index'] = features['instances']['layer_index'].decode_example(inst['layer_index'])
  out = dict(raw)
  out['image'] = features['image'].decode_example(raw['image'])
  out['instances'] = inst
  return out


def preprocess_example(
    example: dict,
    config,
    *,
    train: bool,
    seed: Optional[tf.Tensor] = None,
    flip: Optional[tf.Tensor] = None,
) -> dict:
  """One decoded TFDS example -> one batch element (see module docstring).

  Args:
    example: image (H, W, 3) uint8, image_id, instances/{layer_index
      (N, H, W) uint8, depth_rank, occlude_rate, is_stuff, category_id}.
    config: full config (input.*, model.num_layers, model.glm.image_size,
      dataset.category_agnostic).
    train: enables random flip and box jitter.
    seed: (2,) int64 stateless seed; required when train randomness is on.
    flip: forces the flip decision (tests); None = random in training.
  """
  cin, m = config.input, config.input.max_instances
  size, k, nl = cin.image_size, cin.gt_mask_size, config.model.num_layers
  image = example['image']
  inst = example['instances']
  random_flip = train and cin.random_flip and flip is None
  if (random_flip or (train and cin.box_jitter > 0)) and seed is None:
    raise ValueError('preprocess_example(train=True) needs a seed')
  if seed is not None:
    seed_flip, seed_jitter = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  order = tf.argsort(inst['depth_rank'], stable=True)[:m]
  index = tf.gather(inst['layer_index'], order)

  def take(key):
    return tf.gather(inst[key], order)

  if random_flip:
    flip = tf.random.stateless_uniform([], seed_flip) < 0.5
  elif flip is None:
    flip = tf.constant(False)
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  index = tf.cond(flip, lambda: tf.reverse(index, [2]), lambda: index)

  h, w = tf.shape(image)[0], tf.shape(image)[1]
  tight = boxes_from_masks_tf(index > 0)
  valid = (tight[:, 2] > tight[:, 0]) & (tight[:, 3] > tight[:, 1])
  boxes = tight  # matching / delta boxes; the jitter moves only these
  if train and cin.box_jitter > 0:
    bh, bw = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    noise = tf.random.stateless_uniform(tf.shape(boxes), seed_jitter, -1.0, 1.0)
    boxes = boxes + noise * cin.box_jitter * tf.stack([bh, bw, bh, bw], 1)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    boxes = tf.clip_by_value(boxes, 0.0, tf.stack([hf, wf, hf, wf]))
    boxes = tf.where(valid[:, None], boxes, tf.zeros_like(boxes))

  nh, nw = resized_size(h, w, size, cin.resize_mode)
  resized = _resize_uint8(image, tf.stack([nh, nw]), antialias=True)
  canvas = tf.image.pad_to_bounding_box(resized, 0, 0, size, size)
  canvas.set_shape([size, size, 3])
  scale = tf.stack(
      [
          tf.cast(nh, tf.float32) / tf.cast(h, tf.float32),
          tf.cast(nw, tf.float32) / tf.cast(w, tf.float32),
      ]
  )
  gt_boxes = boxes * tf.tile(scale, [2])[None]
  layer_boxes = tight * tf.tile(scale, [2])[None]
  layers = crop_layers(index, tight, nl, k)
  layers = layers * tf.cast(valid, tf.float32)[:, None, None, None]

  if config.dataset.category_agnostic:
    classes = tf.ones_like(order, tf.int32)
  else:
    classes = tf.cast(take('category_id'), tf.int32)
  g = config.model.glm.image_size
  glm_image = _resize_uint8(canvas, [g, g], antialias=False)
  glm_image.set_shape([g, g, 3])
  return {
      'image': canvas,
      'glm_image': glm_image,
      'image_shape': tf.cast(tf.stack([nh, nw]), tf.float32),
      'image_scale': scale,
      'image_id': tf.cast(example['image_id'], tf.int32),
      'gt_boxes': _pad_to(tf.where(valid[:, None], gt_boxes, 0.0), m),
      'gt_classes': _pad_to(tf.where(valid, classes, 0), m),
      'gt_valid': _pad_to(valid, m),
      'gt_layers': _pad_to(layers, m),
      'gt_layer_boxes': _pad_to(tf.where(valid[:, None], layer_boxes, 0.0), m),
      'gt_occlude_rate': _pad_to(tf.cast(take('occlude_rate'), tf.float32), m),
      'gt_is_stuff': _pad_to(tf.cast(take('is_stuff'), tf.bool), m),
      'gt_depth_rank': _pad_to(tf.cast(take('depth_rank'), tf.int32), m),
      'is_valid': tf.constant(True),
  }


def dummy_example(config) -> dict:
  """An all-padding element (``is_valid`` False) that fills the last eval batch."""
  cin = config.input
  s, m, k = cin.image_size, cin.max_instances, cin.gt_mask_size
  g, nl = config.model.glm.image_size, config.model.num_layers
  return {
      'image': tf.zeros([s, s, 3], tf.uint8),
      'glm_image': tf.zeros([g, g, 3], tf.uint8),
      'image_shape': tf.constant([s, s], tf.float32),
      'image_scale': tf.ones([2], tf.float32),
      'image_id': tf.constant(-1, tf.int32),
      'gt_boxes': tf.zeros([m, 4], tf.float32),
      'gt_classes': tf.zeros([m], tf.int32),
      'gt_valid': tf.zeros([m], tf.bool),
      'gt_layers': tf.zeros([m, k, k, nl], tf.float32),
      'gt_layer_boxes': tf.zeros([m, 4], tf.float32),
      'gt_occlude_rate': tf.zeros([m], tf.float32),
      'gt_is_stuff': tf.zeros([m], tf.bool),
      'gt_depth_rank': tf.zeros([m], tf.int32),
      'is_valid': tf.constant(False),
  }


# ------------------------------------------------------------------ datasets
def _decoders() -> dict:
  """Leave the heavy features encoded until after shuffling."""
  skip = tfds.decode.SkipDecoding()
  return {'image': skip, 'instances': {'layer_index': skip}}


def _log_truncation(builder, split: str, max_instances: int) -> int:
  """Logs (and returns) how many images of ``split`` exceed max_instances."""
  counts = (builder.info.metadata or {}).get('num_instances', {}).get(split.split('[')[0])
  if counts is None:
    return 0
  over = int(sum(c > max_instances for c in counts))
  if over:
    logging.warning(
        '%s/%s: %d of %d images have more than input.max_instances'
        '=%d instances; keeping the front-most %d (by depth_rank).',
        builder.name,
        split,
        over,
        len(counts),
        max_instances,
        max_instances,
    )
  return over


def create_dataset(
    config,
    split: str,
    *,
    train: bool,
    num_local_devices: int,
    per_device_batch: int,
    shard_index: int = 0,
    num_shards: int = 1,
    builder=None,
) -> tf.data.Dataset:
  """The batched tf.data pipeline of one split for this process.

  Args:
    config: full config.
    split: TFDS split (slicing like 'val[:10]' allowed).
    train: shuffle + repeat + augmentation; otherwise one deterministic pass
      padded to whole batches with ``is_valid`` False dummies. Every shard
      yields the same number of eval batches (ceil(N / num_shards) padded up).
    num_local_devices, per_device_batch: the two leading batch axes.
    shard_index, num_shards: this process's shard (jax.process_index(),
      jax.process_count()).
    builder: a prepared builder; default ``tfds_builders.build_dataset(config)``.
  """
  cin = config.input
  builder = builder or tfds_builders.build_dataset(config)
  available = sorted(builder.info.splits)
  if split.split('[')[0] not in available:
    field = 'dataset.train_split' if train else 'dataset.eval_split'
    raise errors.UserError(
        f'split {split!r} not in dataset {builder.name!r} (available: ' f'{", ".join(available)})',
        path=os.fspath(builder.data_dir),
        field=field,
    )
  _log_truncation(builder, split, cin.max_instances)
  local_batch = num_local_devices * per_device_batch
  ds = builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders=_decoders(),
      read_config=tfds.ReadConfig(try_autocache=False),
  )
  ds = ds.shard(num_shards, shard_index)
  if cin.cache:
    ds = ds.cache()
  features = builder.info.features

  if train:
    ds = ds.shuffle(
        cin.shuffle_buffer, seed=config.seed + shard_index, reshuffle_each_iteration=True
    )
    ds = ds.repeat().enumerate()
    base = tf.constant(config.seed * 1_000_003 + shard_index, tf.int64)

    def train_fn(i, raw):
      ex = decode_example(features, raw)
      return preprocess_example(ex, config, train=True, seed=tf.stack([base, tf.cast(i, tf.int64)]))

    ds = ds.map(train_fn, num_parallel_calls=cin.num_parallel_calls)
  else:
    n = builder.info.splits[split].num_examples
    per_shard = math.ceil(n / num_shards)
    target = math.ceil(per_shard / local_batch) * local_batch
    mine = len(range(shard_index, n, num_shards))
    ds = ds.map(
        lambda raw: preprocess_example(decode_example(features, raw), config, train=False),
        num_parallel_calls=cin.num_parallel_calls,
    )
    if target > mine:
      pad = tf.data.Dataset.from_tensors(dummy_example(config))
      ds = ds.concatenate(pad.repeat(target - mine))

  ds = ds.batch(per_device_batch, drop_remainder=True)
  ds = ds.batch(num_local_devices, drop_remainder=True)
  ds = ds.prefetch(cin.prefetch)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cin.num_parallel_calls
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  return ds.with_options(options)


def create_split(
    config,
    split: str,
    *,
    train: bool,
    num_local_devices: int,
    per_device_batch: int,
    shard_index: int = 0,
    num_shards: int = 1,
    builder=None,
) -> Iterator[dict]:
  """``create_dataset`` as an iterator of numpy batch dicts."""
  ds = create_dataset(
      config,
      split,
      train=train,
      num_local_devices=num_local_devices,
      per_device_batch=per_device_batch,
      shard_index=shard_index,
      num_shards=num_shards,
      builder=builder,
  )
  return iter(tfds.as_numpy(ds))


# ------------------------------------------------------------------ inference
def preprocess_image_for_inference(image: np.ndarray, config):
  """The pipeline's image path in numpy (no TensorFlow), for predict mode:
  ``sln_jax.preprocess.preprocess_image`` with the config's canvas
  (input.image_size, input.resize_mode) and GLM size (model.glm.image_size).

  Returns:
    canvas (S, S, 3) uint8, image_shape (2,) float32 (valid h, w),
    image_scale (2,) float32 (canvas px per original px, y then x),
    glm_image (G, G, 3) uint8; equal to the tf.data pipeline's up to 1 in
    pixel value (float rounding).
  """
  return preprocess.preprocess_image(
      image, config.input.image_size, config.input.resize_mode, config.model.glm.image_size
  )
