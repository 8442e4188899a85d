"""Losses against the release's torch formulas (gather-then-reduce form)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sln_jax import losses

T = lambda x: torch.tensor(np.asarray(x, np.float32))


def per_image(fn, *arrays):
  """The batch loss the module promises: mean over images of ``fn`` on
  each image's arrays (torch, float), 0 for an image where ``fn`` is NaN
  (nothing selected)."""
  vals = [float(fn(*(a[i] for a in arrays))) for i in range(len(arrays[0]))]
  return float(np.mean([0.0 if np.isnan(v) else v for v in vals]))


def _rpn_inputs(rng, b=2, a=30):
  logits = rng.normal(size=(b, a, 2)).astype(np.float32)
  labels = rng.choice([-1, 0, 1], size=(b, a)).astype(np.int32)
  pred = rng.normal(size=(b, a, 4)).astype(np.float32) * 2
  target = rng.normal(size=(b, a, 4)).astype(np.float32)
  return logits, labels, pred, target


def test_rpn_losses_match_torch():
  logits, labels, pred, target = _rpn_inputs(np.random.default_rng(0))
  want = per_image(
      lambda lg, lb: F.cross_entropy(
          T(lg[lb != -1]), torch.tensor((lb[lb != -1] == 1).astype(np.int64))
      ),
      logits,
      labels,
  )
  got = jax.jit(losses.rpn_class_loss)(logits, labels)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  want = per_image(
      lambda p, t, lb: F.smooth_l1_loss(T(p[lb == 1]), T(t[lb == 1])), pred, target, labels
  )
  got = jax.jit(losses.rpn_bbox_loss)(pred, target, labels)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Batch 1 is the release's mean over the selected anchors.
  sel = labels[:1] != -1
  want = F.cross_entropy(T(logits[:1][sel]), torch.tensor((labels[:1][sel] == 1).astype(np.int64)))
  np.testing.assert_allclose(
      float(losses.rpn_class_loss(logits[:1], labels[:1])), float(want), rtol=1e-5
  )


def test_head_losses_match_torch():
  rng = np.random.default_rng(1)
  b, r, c = 2, 12, 3
  logits = rng.normal(size=(b, r, c)).astype(np.float32)
  cls = rng.integers(0, c, (b, r)).astype(np.int32)
  valid = rng.uniform(size=(b, r)) > 0.3
  deltas = rng.normal(size=(b, r, c, 4)).astype(np.float32) * 2
  targets = rng.normal(size=(b, r, 4)).astype(np.float32)
  want = per_image(
      lambda lg, c, v: F.cross_entropy(T(lg[v]), torch.tensor(c[v]).long()), logits, cls, valid
  )
  np.testing.assert_allclose(float(losses.head_class_loss(logits, cls, valid)), want, rtol=1e-5)

  def bbox(d, c, t, v):
    ri = np.nonzero(v & (c > 0))[0]
    return F.smooth_l1_loss(T(d[ri, c[ri]]), T(t[ri]))

  want = per_image(bbox, deltas, cls, targets, valid)
  np.testing.assert_allclose(
      float(losses.head_bbox_loss(deltas, cls, targets, valid)), want, rtol=1e-5
  )


def test_mask_losses_match_torch():
  rng = np.random.default_rng(2)
  b, r, s, l = 2, 5, 4, 3
  logits = rng.normal(size=(b, r, s, s, l)).astype(np.float32) * 3
  layer = rng.integers(0, l + 1, (b, r, s, s))  # l = outside the object
  targets = np.eye(l + 1, dtype=np.float32)[layer][..., :l]
  positive = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], bool)
  want = per_image(
      lambda lg, t, p: F.binary_cross_entropy(torch.sigmoid(T(lg[p])), T(t[p])),
      logits,
      targets,
      positive,
  )
  got = jax.jit(losses.layer_loss)(logits, targets, positive)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  want = per_image(
      lambda lg, t, p: F.binary_cross_entropy(torch.sigmoid(T(lg[p]).sum(-1)), T(t[p]).sum(-1)),
      logits,
      targets,
      positive,
  )
  got = jax.jit(losses.amodal_loss)(logits, targets, positive)
  # torch takes logs of float32 probabilities: sums of logits reach ~15 here.
  np.testing.assert_allclose(float(got), want, rtol=5e-5)
  # bf16 inputs are computed in float32.
  got = losses.layer_loss(
      jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets, jnp.bfloat16), positive
  )
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      float(got),
      per_image(
          lambda lg, t, p: F.binary_cross_entropy(torch.sigmoid(T(lg[p])), T(t[p])),
          logits,
          targets,
          positive,
      ),
      rtol=2e-2,
  )


@pytest.mark.parametrize('weight', [1.0, 5.0, 0.5])
def test_occluded_pos_weight_is_torch_pos_weight_on_channels_2_and_up(weight):
  """layer_loss(occluded_pos_weight=w) is torch's BCE-with-logits with
  pos_weight (1, w, w, ...) over the layer channels, soft targets included."""
  rng = np.random.default_rng(5)
  b, r, s, l = 2, 4, 3, 3
  logits = rng.normal(size=(b, r, s, s, l)).astype(np.float32) * 4
  targets = rng.uniform(size=(b, r, s, s, l)).astype(np.float32)
  targets[0, 0] = np.round(targets[0, 0])
  positive = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], bool)
  pw = torch.tensor([1.0] + [weight] * (l - 1))
  want = per_image(
      lambda lg, t, p: F.binary_cross_entropy_with_logits(T(lg[p]), T(t[p]), pos_weight=pw),
      logits,
      targets,
      positive,
  )
  got = jax.jit(losses.layer_loss, static_argnames='occluded_pos_weight')(
      logits, targets, positive, occluded_pos_weight=weight
  )
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  if weight > 1:  # more weight on the occluded positives: a larger loss
    assert float(got) > float(losses.layer_loss(logits, targets, positive))


def test_amodal_loss_clips_overlapping_layer_targets():
  """Rounded layer targets may overlap (sum 2): the amodal target is
  clip(sum, 0, 1), as torch's BCE on the clamped sum."""
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(1, 2, 3, 3, 2)).astype(np.float32) * 2
  targets = rng.integers(0, 2, (1, 2, 3, 3, 2)).astype(np.float32)
  targets[0, 0, 0, 0] = 1  # both layers on
  positive = np.ones((1, 2), bool)
  want = F.binary_cross_entropy_with_logits(T(logits).sum(-1), T(targets).sum(-1).clamp(0, 1))
  np.testing.assert_allclose(
      float(losses.amodal_loss(logits, targets, positive)), float(want), rtol=1e-5
  )


def test_non_finite_values_where_not_selected_do_not_leak():
  """Elements that are not selected (ignored anchors, non-positive ROIs)
  drop out of the value even when they hold NaN or inf."""
  logits, labels, pred, target = _rpn_inputs(np.random.default_rng(7))
  rpn_class, rpn_bbox = jax.jit(losses.rpn_class_loss), jax.jit(losses.rpn_bbox_loss)
  nan_logits = np.where((labels == -1)[..., None], np.nan, logits)
  np.testing.assert_allclose(
      float(rpn_class(nan_logits, labels)), float(rpn_class(logits, labels)), rtol=1e-6
  )
  inf_pred = np.where((labels != 1)[..., None], np.inf, pred)
  np.testing.assert_allclose(
      float(rpn_bbox(inf_pred, target, labels)), float(rpn_bbox(pred, target, labels)), rtol=1e-6
  )
  layer = np.random.default_rng(8).normal(size=(2, 3, 4, 4, 2)).astype(np.float32)
  targets = (layer > 0.5).astype(np.float32)
  positive = np.array([[1, 0, 1], [0, 1, 0]], bool)
  bad = np.where(positive[:, :, None, None, None], layer, np.nan)
  for fn in (jax.jit(losses.layer_loss), jax.jit(losses.amodal_loss)):
    np.testing.assert_allclose(
        float(fn(bad, targets, positive)), float(fn(layer, targets, positive)), rtol=1e-6
    )


def test_batch_loss_is_mean_of_single_image_losses():
  """Device-count independence rests on this: any term over a batch equals
  the mean of the term over each image alone (also for an image with
  nothing selected)."""
  logits, labels, pred, target = _rpn_inputs(np.random.default_rng(4), b=3)
  labels[1] = -1  # image 1: nothing selected
  for fn, args in (
      (losses.rpn_class_loss, (logits, labels)),
      (losses.rpn_bbox_loss, (pred, target, labels)),
  ):
    whole = float(fn(*args))
    alone = np.mean([float(fn(*(a[i : i + 1] for a in args))) for i in range(3)])
    np.testing.assert_allclose(whole, alone, rtol=1e-6)


def test_zero_not_nan_when_nothing_selected_and_finite_grads():
  logits, labels, pred, target = _rpn_inputs(np.random.default_rng(3))
  none = np.full_like(labels, -1)
  z = np.zeros((1, 2, 4, 4, 1), np.float32)
  nopos = np.zeros((1, 2), bool)

  @jax.jit
  def all_terms():
    return jnp.stack(
        [
            losses.rpn_class_loss(logits, none),
            losses.rpn_bbox_loss(pred, target, none),
            losses.head_class_loss(np.zeros((1, 2, 2)), np.zeros((1, 2), np.int32), nopos),
            losses.head_bbox_loss(
                np.zeros((1, 2, 2, 4)), np.zeros((1, 2), np.int32), np.zeros((1, 2, 4)), nopos
            ),
            losses.layer_loss(z, z, nopos),
            losses.amodal_loss(z, z, nopos),
        ]
    )

  np.testing.assert_array_equal(np.asarray(all_terms()), np.zeros(6))
  big = np.full((1, 2, 4, 4, 1), 500.0, np.float32)
  val, grad = jax.jit(jax.value_and_grad(losses.layer_loss))(big, z, np.ones((1, 2), bool))
  assert np.isfinite(float(val)) and float(val) == pytest.approx(500.0)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_total_loss_weights():
  terms = {t: jnp.float32(i + 1) for i, t in enumerate(losses.TERMS)}
  weights = ml_collections.ConfigDict(
      dict(
          rpn_class=1.0,
          rpn_bbox=0.5,
          head_class=1.0,
          head_bbox=2.0,
          layer=1.0,
          amodal=0.0,
          layering_map=3.0,
      )
  )
  got = losses.total_loss(terms, weights)
  assert float(got) == pytest.approx(1 + 1 + 3 + 8 + 5 + 0 + 21)
  with pytest.raises(KeyError):
    losses.total_loss({'rpn_class': 1.0}, weights)


def test_layer_and_amodal_losses_push_each_channel_where_the_layers_say():
  """Stage b of the occlusion diagnosis: the push (minus the gradient) of the
  layer + amodal losses on each channel of a background, a visible and a
  hidden pixel, from zero logits. Each layer channel is raised most where it
  is the truth and both are lowered outside the object; the amodal term
  (sigmoid of the channel sum) raises every channel inside the object
  alike, so at the start the other layer's channel rises too, by half as
  much as the layer term holds it back. occluded_pos_weight adds to the
  occluded channel's push on hidden pixels and nowhere else."""
  # One ROI of 1 x 3 pixels: background, visible, hidden; channels
  # (visible layer, occluded layer).
  targets = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 1, 3, 2)
  positive = jnp.ones((1, 1), bool)

  def push(weight):
    def loss(logits):
      return losses.layer_loss(
          logits, targets, positive, occluded_pos_weight=weight
      ) + losses.amodal_loss(logits, targets, positive)

    return -np.asarray(jax.grad(loss)(jnp.zeros_like(targets))).reshape(3, 2)

  # Layer term: (t - 1/2) / 6 per element (6 elements); amodal term:
  # (T - 1/2) / 3 per pixel to both channels (T: the pixel is in the object).
  up = push(1.0)
  np.testing.assert_allclose(up, [[-0.25, -0.25], [0.25, 1 / 12], [1 / 12, 0.25]], rtol=1e-6)
  weighted = push(10.0)
  # pos_weight w adds (w - 1) * sigmoid(-x) / 6 on the hidden pixel's occluded channel.
  np.testing.assert_allclose(weighted[2, 1] - up[2, 1], 9 * 0.5 / 6, rtol=1e-6)
  changed = np.abs(weighted - up) > 1e-7
  assert changed.sum() == 1 and changed[2, 1]


def test_softmax_layer_and_amodal_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 4, 3)).astype(np.float32) * 2
  classes = rng.integers(0, 3, (2, 3, 4, 4))
  targets = np.eye(3, dtype=np.float32)[classes][..., 1:]  # (…, L=2) one-hot, 0 outside
  positive = np.array([[True, False, True], [False, False, False]])
  np.testing.assert_array_equal(np.asarray(losses.layer_classes(targets)), classes)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, classes[..., None], -1)[..., 0]
  w = np.where(classes >= 2, 4.0, 1.0)
  # Image 0: mean over its 2 positive ROIs' pixels; image 1: nothing, 0.
  want = (w * ce)[0][positive[0]].mean() / 2
  got = losses.softmax_layer_loss(logits, targets, positive, occluded_pos_weight=4.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  p_obj = 1 - np.exp(logp[..., 0])
  amodal = classes > 0
  bce = -np.where(amodal, np.log(p_obj), np.log(1 - p_obj))
  want = bce[0][positive[0]].mean() / 2
  got = losses.softmax_amodal_loss(logits, targets, positive)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_softmax_losses_push_a_hidden_pixel_to_the_occluded_layer_from_the_start():
  """The fix of stage b: with one softmax over (outside, visible, occluded)
  the layer + amodal losses lower the visible channel on a hidden pixel
  from zero logits (the sigmoid form raises it, by 1/12: the test above),
  and lower the occluded channel on a visible pixel."""
  targets = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 1, 3, 2)
  positive = jnp.ones((1, 1), bool)

  def loss(logits):
    return losses.softmax_layer_loss(logits, targets, positive) + losses.softmax_amodal_loss(
        logits, targets, positive
    )

  zeros = jnp.zeros((1, 1, 1, 3, 3))
  push = -np.asarray(jax.grad(loss)(zeros)).reshape(3, 3)  # pixels x (outside, visible, occluded)
  background, visible, hidden = push
  assert background[0] > 0 and background[1] < 0 and background[2] < 0
  assert visible[1] > 0 and visible[2] < 0 and visible[0] < 0
  assert hidden[2] > 0 and hidden[1] < 0 and hidden[0] < 0
  # CE: (onehot - 1/3) / 3 per pixel; amodal: logit logsumexp(0, 0) - 0 = log 2,
  # p = 2/3, and d/dlogits of -log p spreads (1 - p) = 1/3 as (-1, 1/2, 1/2) / 3.
  np.testing.assert_allclose(
      hidden, [(-1 / 3 - 1 / 3) / 3, (-1 / 3 + 1 / 6) / 3, (2 / 3 + 1 / 6) / 3], rtol=1e-5
  )
