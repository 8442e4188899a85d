"""A tiny Flax module with SLN's module paths and entry points, for loop tests.

Paths: backbone/C1_conv, backbone/C1_bn (BN), backbone/C4_0/conv1,
fpn/P2_lateral, rpn/conv_class, box_head/linear_class, glm/layer1_conv.
``train_forward`` uses the rng (random pixel dropout) so PRNG handling is
exercised, and a loss term 'scaled' multiplies by ``image_scale`` so a NaN
there makes that term non-finite.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), name='conv1')(x))


class _Backbone(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, name='C1_conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='C1_bn')(x)
    return _Block(name='C4_0')(nn.relu(x))


class _Single(nn.Module):
  features: int
  layer: str

  @nn.compact
  def __call__(self, x):
    if self.layer == 'dense':
      return nn.Dense(self.features, name='linear_class')(x)
    return nn.Conv(self.features, (1, 1), name=self.layer)(x)


class StandIn(nn.Module):
  """Stand-in for ``SLN``: same entry points, a few tiny layers."""

  def setup(self):
    self.backbone = _Backbone()
    self.fpn = _Single(4, 'P2_lateral')
    self.rpn = _Single(2, 'conv_class')
    self.box_head = _Single(3, 'dense')
    self.glm = _Single(2, 'layer1_conv')

  def _features(self, image, keep):
    x = image.astype(jnp.float32) / 255.0 * keep
    c = self.backbone(x)
    p = self.fpn(c) + self.glm(x)[:, ::2, ::2, :1]
    return p

  def __call__(self, image):
    p = self._features(image, 1.0)
    return self.rpn(p), self.box_head(p.mean((1, 2)))

  def train_forward(self, batch, rng):
    """SLN's contract: ``rng`` is (B,) per-image keys, every term a mean over
    images of per-image values."""
    shape = batch['image'].shape[1:3] + (1,)
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 0.8, shape))(rng)
    p = self._features(batch['image'], keep)
    r = self.rpn(p)
    logits = self.box_head(p.mean((1, 2)))
    target = batch['gt_boxes'][:, 0, :3] / 32.0
    fit = jnp.mean((logits - target) ** 2)
    act = jnp.mean(jnp.mean((r - 0.5) ** 2, axis=(1, 2, 3)) * jnp.mean(batch['image_scale'], -1))
    losses = {'fit': fit, 'scaled': act, 'total': fit + act}
    return losses, {'mean_logit': jnp.mean(logits)}

  def infer(self, image, glm_image, image_shape):
    """SLN's output layout: two detections per image, boxes in canvas pixels
    (a fixed box and one shrunk by the box head), masks from the rpn map."""
    del glm_image
    r, logits = self(image)
    b = image.shape[0]
    h, w = image_shape[:, 0], image_shape[:, 1]
    full = jnp.stack([jnp.zeros_like(h), jnp.zeros_like(w), h / 2, w / 2], -1)
    shrink = jax.nn.sigmoid(logits[:, :1])
    part = jnp.stack([h / 4, w / 4, h / 4 + h / 2 * shrink[:, 0], w / 4 + w / 2 * shrink[:, 0]], -1)
    probs = jax.nn.sigmoid(jax.image.resize(r[..., :1], (b, 8, 8, 1), 'bilinear'))
    layer = jnp.stack([probs, 1.0 - probs], axis=1)  # (B, 2, 8, 8, 1)
    return {
        'boxes': jnp.stack([full, part], axis=1),
        'scores': jnp.stack([jnp.full((b,), 0.9), jax.nn.sigmoid(logits[:, 1])], 1),
        'classes': jnp.ones((b, 2), jnp.int32),
        'valid': jnp.ones((b, 2), bool),
        'layer_probs': layer,
        'amodal_probs': jnp.ones_like(layer[..., 0]),
        'visible_probs': layer[..., 0],
    }


@functools.lru_cache(maxsize=None)
def _init(seed: int, size: int):
  model = StandIn()
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3), jnp.uint8))


def init_variables(seed: int = 0, size: int = 16):
  model = StandIn()
  variables = _init(seed, size)
  # Non-trivial frozen BN statistics.
  stats = jax.tree.map(lambda x: x + 0.1, variables['batch_stats'])
  return model, {'params': variables['params'], 'batch_stats': stats}


def make_batches(num: int, devices: int, per_device: int, size: int = 16, seed: int = 0):
  """``num`` deterministic batches with leading axes (devices, per_device)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    shape = (devices, per_device)
    boxes = rng.uniform(0, size, shape + (2, 4)).astype(np.float32)
    out.append(
        {
            'image': rng.integers(0, 256, shape + (size, size, 3), dtype=np.uint8),
            'gt_boxes': boxes,
            'image_scale': np.ones(shape + (2,), np.float32),
            'glm_image': np.zeros(shape + (4, 4, 3), np.uint8),
            'image_shape': np.full(shape + (2,), size, np.float32),
        }
    )
  return out


def annotation(image_id, h, w, box):
  """One ImageAnnotation whose single instance fills ``box`` (y1,x1,y2,x2)."""
  from input_pipeline import records  # pylint: disable=import-outside-toplevel

  mask = np.zeros((h, w), bool)
  mask[box[0] : box[2], box[1] : box[3]] = True
  rle = records.encode_mask(mask)
  inst = records.InstanceAnnotation(
      amodal_rle=rle,
      visible_rle=rle,
      occluded_rle=records.encode_mask(np.zeros_like(mask)),
      depth_rank=0,
      occlude_rate=0.0,
  )
  return records.ImageAnnotation(image_id, f'{image_id}.png', h, w, [inst])


def eval_batch(ids, valid, size=16, scale=0.5):
  """One eval batch on one device: ``ids`` images (uniform grey canvas of
  ``size``), content 16 x 12 at ``scale`` of the original."""
  n = len(ids)
  return {
      'image': np.full((1, n, size, size, 3), 100, np.uint8),
      'glm_image': np.zeros((1, n, 4, 4, 3), np.uint8),
      'image_shape': np.tile(np.float32([16, 12]), (1, n, 1)),
      'image_scale': np.full((1, n, 2), scale, np.float32),
      'image_id': np.asarray([ids], np.int32),
      'is_valid': np.asarray([valid], bool),
  }


class RecordingWriter:
  """Records what the loop writes (clu MetricWriter interface)."""

  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def write_images(self, step, images):
    self.images[step] = dict(images)

  def flush(self):
    pass
