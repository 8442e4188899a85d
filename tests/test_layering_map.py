"""The learnt global layering map: its targets (against counts of full
masks), its loss (against numpy), and its place in the model (parameters,
mask-head input, loss term, gradients, config checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from sln_jax import config_checks, losses
from sln_jax.errors import UserError
from sln_jax.models import sln
from sln_jax.ops import targets

S, BOX = 64, 16


def _instances(seed, n=8):
  """n random shapes (ellipses and rectangles), each inside its own
  BOX x BOX square at a random place in the middle of an S x S canvas; crops are the
  squares' pixels exactly (K = BOX), so a crop cell is a canvas pixel.
  Returns full masks (n, S, S), crops (n, K, K, 2) split over two layer
  channels, normalised boxes (n, 4)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:BOX, :BOX]
  full = np.zeros((n, S, S), bool)
  crops = np.zeros((n, BOX, BOX, 2), np.float32)
  boxes = np.zeros((n, 4), np.float32)
  for i in range(n):
    y1, x1 = rng.integers(12, 12 + S // 4, 2)  # crowded: counts of 3 and more
    if i % 2:
      cy, cx, ry, rx = rng.uniform(5, 11, 2).tolist() + rng.uniform(3, 8, 2).tolist()
      shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    else:
      a, b = rng.integers(0, 6, 2)
      shape = (yy >= a) & (yy < BOX - b) & (xx >= b) & (xx < BOX - a)
    full[i, y1 : y1 + BOX, x1 : x1 + BOX] = shape
    split = rng.random((BOX, BOX)) < 0.5  # which layer channel holds a pixel
    crops[i, ..., 0] = shape & split
    crops[i, ..., 1] = shape & ~split
    boxes[i] = np.array([y1, x1, y1 + BOX, x1 + BOX]) / S
  return full, crops, boxes


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_layering_map_targets_count_the_amodal_masks_over_each_cell(seed):
  full, crops, boxes = _instances(seed)
  valid = np.array([True] * 7 + [False])
  count = full[valid].sum(0)
  assert count.max() >= 3  # overlaps to count, and to clip with 3 classes
  # One cell per pixel: the exact count, clipped to the last class.
  got = np.asarray(targets.layering_map_targets(crops, boxes, valid, S, 4))
  np.testing.assert_array_equal(got, np.minimum(count, 3))
  got = np.asarray(targets.layering_map_targets(crops, boxes, valid, S, 3))
  np.testing.assert_array_equal(got, np.minimum(count, 2))
  # P2's grid (stride 4): cell (i, j) reads the pixel under its centre
  # (4i + 2, 4j + 2) in continuous coordinates.
  got = np.asarray(targets.layering_map_targets(crops, boxes, valid, S // 4, 4))
  np.testing.assert_array_equal(got, np.minimum(count[2::4, 2::4], 3))
  batched = targets.batched_layering_map_targets(crops[None], boxes[None], valid[None], S // 4, 4)
  np.testing.assert_array_equal(np.asarray(batched)[0], got)


def test_layering_map_loss_is_the_mean_softmax_cross_entropy_per_image():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 5, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (2, 5, 5))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, labels[..., None], -1).mean()
  got = losses.layering_map_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _batch():
  full, crops, boxes = _instances(3, n=4)
  full, crops, boxes = full[:4], crops[:4], boxes[:4]
  image = np.full((S, S, 3), 40, np.uint8)
  for i, m in enumerate(full):
    image[m] = (60 * i, 200 - 40 * i, 120)
  return {
      'image': image[None],
      'glm_image': np.zeros((1, 33, 33, 3), np.uint8),
      'image_shape': np.array([[S, S]], np.float32),
      'gt_boxes': (boxes * S)[None],
      'gt_classes': np.ones((1, 4), np.int32),
      'gt_valid': np.ones((1, 4), bool),
      'gt_layers': crops[None],
  }


def _config(enabled):
  cfg = tiny.get_config()
  cfg.model.num_layers = 2
  cfg.model.glm.enabled = False
  cfg.model.layering_map.enabled = enabled
  cfg.model.layering_map.num_classes = 3
  cfg.model.layering_map.channels = 8
  return cfg


def test_layering_map_feeds_the_mask_head_and_trains_with_its_own_loss_term():
  cfg = _config(True)
  model = sln.build_model(cfg)
  variables = sln.init_variables(model, jax.random.PRNGKey(0), S)
  params = variables['params']
  assert set(params['layering_head']) == {'conv1', 'bn1', 'conv2', 'bn2', 'classes'}
  assert params['layering_head']['classes']['kernel'].shape[-1] == 3
  # The mask head's input: FPN ROI features, then the map's 3 probabilities.
  fpn = cfg.model.fpn_channels
  assert params['mask_head']['conv1']['kernel'].shape[2] == fpn + 3

  def loss(p, weights):
    terms, _ = model.apply(
        {'params': p, 'batch_stats': variables['batch_stats']},
        _batch(),
        jax.random.PRNGKey(1),
        weights,
        method='train_forward',
        mutable=['batch_stats'],
    )[0]
    return terms['total'], terms

  weights = dict(cfg.loss, layering_map=0.5)
  grad_fn = jax.jit(jax.value_and_grad(lambda p: loss(p, weights), has_aux=True))
  (total, terms), grads = grad_fn(params)
  assert np.isfinite(float(terms['layering_map'])) and float(terms['layering_map']) > 0
  # Weighted by config.loss.layering_map like the other terms.
  parts = sum(weights[t] * float(terms[t]) for t in losses.TERMS)
  np.testing.assert_allclose(float(total), parts, rtol=1e-5)
  g = grads['layering_head']['classes']['kernel']
  assert float(jnp.abs(g).max()) > 0
  out = jax.eval_shape(
      lambda v: model.apply(
          v, *(_batch()[k] for k in ('image', 'glm_image', 'image_shape')), method='infer'
      ),
      variables,
  )
  assert out['amodal_probs'].shape[-1] == cfg.model.roi.mask_size


def test_without_the_layering_map_there_is_no_head_and_the_term_is_zero():
  cfg = _config(False)
  model = sln.build_model(cfg)
  variables = sln.init_variables(model, jax.random.PRNGKey(0), S)
  assert 'layering_head' not in variables['params']
  assert variables['params']['mask_head']['conv1']['kernel'].shape[2] == cfg.model.fpn_channels
  (terms, _), _ = jax.jit(
      lambda v: model.apply(
          v, _batch(), jax.random.PRNGKey(1), method='train_forward', mutable=['batch_stats']
      )
  )(variables)
  assert float(terms['layering_map']) == 0.0


def test_config_checks_refuse_a_one_class_layering_map():
  cfg = _config(True)
  cfg.model.layering_map.num_classes = 1
  with pytest.raises(UserError, match='model.layering_map.num_classes'):
    config_checks.check_config(cfg)
