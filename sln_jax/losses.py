"""The release's six training losses, masked over padding, and the loss of
the learnt layering map (``layering_map``, 0 when the model has none).

Every term is a float32 scalar (inputs may be bfloat16): the mean over the
batch of per-image means over that image's selected elements, where an
image with nothing selected contributes 0 -- not NaN. With batch 1 (the
release) this is the release's mean over the selected elements; with any
batch it equals running each image alone and averaging, so the loss does
not depend on how a batch is split over devices. Cross-entropies use log-softmax /
log-sigmoid forms, so large logits stay finite (torch's
``binary_cross_entropy`` on probabilities clamps logs at -100 instead).
Smooth-L1 is torch's default (beta 1), averaged over all 4 coordinates of
the selected boxes, as ``F.smooth_l1_loss``.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

TERMS = (
    'rpn_class',
    'rpn_bbox',
    'head_class',
    'head_bbox',
    'layer',
    'amodal',
    'layering_map',
)


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean over the leading (image) axis of each image's mean of ``values``
  where ``mask`` (broadcast to values); an image with no selected element
  counts as 0."""
  mask = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
  axes = tuple(range(1, values.ndim))
  total = jnp.sum(jnp.where(mask > 0, values, 0.0), axis=axes)
  return jnp.mean(total / jnp.maximum(jnp.sum(mask, axis=axes), 1.0))


def _cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """(..., C) logits, (...) int labels -> (...) softmax cross-entropy."""
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  safe = jnp.clip(labels, 0, logits.shape[-1] - 1).astype(jnp.int32)
  return -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]


def smooth_l1(pred: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """Elementwise smooth-L1 (beta 1): 0.5 d^2 if |d| < 1 else |d| - 0.5."""
  d = jnp.abs(_f32(pred) - _f32(target))
  return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def sigmoid_bce(logits: jnp.ndarray, targets: jnp.ndarray, pos_weight=1.0) -> jnp.ndarray:
  """Elementwise BCE(sigmoid(logits), targets), stable form.

  ``pos_weight`` (broadcast to the elements) scales the target-1 term as
  torch's ``binary_cross_entropy_with_logits(pos_weight=...)``:
  ``-(w t log s + (1 - t) log(1 - s))``, s = sigmoid(logits).
  """
  x, t = _f32(logits), _f32(targets)
  # softplus(x) = max(x, 0) + log1p(exp(-|x|)), with the derivative sigmoid(x)
  # everywhere; differentiating that max/abs form directly gives -t instead
  # of 1/2 - t at x = 0 exactly (a zero logit, e.g. a bias on a zero input,
  # would never be pushed down).
  bce = jax.nn.softplus(x) - x * t
  if isinstance(pos_weight, (int, float)) and pos_weight == 1.0:
    return bce
  # The weighted form is bce - (w - 1) t log s, and -log s = softplus(-x).
  return bce + (_f32(pos_weight) - 1.0) * t * jax.nn.softplus(-x)


def rpn_class_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Softmax CE of the RPN over non-ignored anchors.

  Args:
    logits: (B, A, 2) (background, foreground).
    labels: (B, A) int, 1 positive, 0 negative, -1 ignored.
  """
  ce = _cross_entropy(logits, (labels == 1).astype(jnp.int32))
  return _masked_mean(ce, labels >= 0)


def rpn_bbox_loss(
    deltas_pred: jnp.ndarray, deltas_target: jnp.ndarray, labels: jnp.ndarray
) -> jnp.ndarray:
  """Smooth-L1 of positive anchors' deltas, mean over 4 * #positives.

  Args:
    deltas_pred, deltas_target: (B, A, 4).
    labels: (B, A) int, 1 marks positives.
  """
  return _masked_mean(smooth_l1(deltas_pred, deltas_target), (labels == 1)[..., None])


def head_class_loss(
    logits: jnp.ndarray, class_targets: jnp.ndarray, valid: jnp.ndarray
) -> jnp.ndarray:
  """Softmax CE of the box head over sampled (valid) ROIs.

  Args:
    logits: (B, R, C).
    class_targets: (B, R) int, 0 background.
    valid: (B, R) bool.
  """
  return _masked_mean(_cross_entropy(logits, class_targets), valid)


def head_bbox_loss(
    deltas: jnp.ndarray, class_targets: jnp.ndarray, bbox_targets: jnp.ndarray, valid: jnp.ndarray
) -> jnp.ndarray:
  """Smooth-L1 of the true class's deltas over positive ROIs.

  Args:
    deltas: (B, R, C, 4) class-specific predictions.
    class_targets: (B, R) int; positives are valid ROIs with class > 0.
    bbox_targets: (B, R, 4).
    valid: (B, R) bool.
  """
  cls = jnp.clip(class_targets, 0, deltas.shape[-2] - 1).astype(jnp.int32)
  pred = jnp.take_along_axis(deltas, cls[..., None, None], axis=-2)[..., 0, :]
  positive = valid & (class_targets > 0)
  return _masked_mean(smooth_l1(pred, bbox_targets), positive[..., None])


def layer_loss(
    layer_logits: jnp.ndarray,
    layer_targets: jnp.ndarray,
    positive: jnp.ndarray,
    occluded_pos_weight: float = 1.0,
) -> jnp.ndarray:
  """BCE(sigmoid(layer logits), layer targets) over positive ROIs.

  Args:
    layer_logits: (B, R, S, S, L) (mask-head channels 1..L).
    layer_targets: (B, R, S, S, L) in [0, 1].
    positive: (B, R) bool.
    occluded_pos_weight: ``pos_weight`` of the occluded layers (channels
      2..L) in :func:`sigmoid_bce`; the visible layer keeps 1. 1 is the
      release. Occluded pixels are a small share of an ROI, so unweighted
      the occluded layers first learn to be off everywhere
      (``config.loss.occluded_pos_weight``).
  """
  pos_weight = 1.0
  if occluded_pos_weight != 1.0:
    pos_weight = jnp.where(
        jnp.arange(layer_logits.shape[-1]) >= 1, jnp.float32(occluded_pos_weight), jnp.float32(1.0)
    )
  return _masked_mean(
      sigmoid_bce(layer_logits, layer_targets, pos_weight), positive[:, :, None, None, None]
  )


def amodal_loss(
    layer_logits: jnp.ndarray, layer_targets: jnp.ndarray, positive: jnp.ndarray
) -> jnp.ndarray:
  """BCE(sigmoid(sum of layer logits), clip(sum of targets, 0, 1)).

  Shapes as :func:`layer_loss`; sums run over the last (layer) axis. The
  release does not clip; its targets are one-hot over layers so the clip
  only guards against overlapping rounded layers.
  """
  logits = jnp.sum(_f32(layer_logits), axis=-1)
  targets = jnp.clip(jnp.sum(_f32(layer_targets), axis=-1), 0.0, 1.0)
  return _masked_mean(sigmoid_bce(logits, targets), positive[:, :, None, None])


def layer_classes(layer_targets: jnp.ndarray) -> jnp.ndarray:
  """(..., L) one-hot layer targets -> (...) int32 class: 0 outside the
  object, k on layer channel k (1 = visible, 2.. occluded). Overlapping
  rounded channels (rare) take the first."""
  t = _f32(layer_targets) >= 0.5
  return jnp.where(jnp.any(t, axis=-1), 1 + jnp.argmax(t, axis=-1), 0).astype(jnp.int32)


def softmax_layer_loss(
    logits: jnp.ndarray,
    layer_targets: jnp.ndarray,
    positive: jnp.ndarray,
    occluded_pos_weight: float = 1.0,
) -> jnp.ndarray:
  """Softmax CE of exclusive layer classes over positive ROIs
  (``model.layer_activation='softmax'``).

  Every pixel of an ROI is exactly one of: outside the object (class 0),
  visible (1), on occluded layer k (k + 1), as the layer index map says, so
  one softmax over the mask head's 1 + L channels classifies it.

  Args:
    logits: (B, R, S, S, 1 + L) all mask-head channels.
    layer_targets: (B, R, S, S, L) one-hot layer channels.
    positive: (B, R) bool.
    occluded_pos_weight: weight of the CE of pixels whose class is an
      occluded layer (2..L); the others weigh 1.
  """
  classes = layer_classes(layer_targets)
  ce = _cross_entropy(logits, classes)
  if occluded_pos_weight != 1.0:
    ce = jnp.where(classes >= 2, jnp.float32(occluded_pos_weight), 1.0) * ce
  return _masked_mean(ce, positive[:, :, None, None])


def softmax_amodal_loss(
    logits: jnp.ndarray, layer_targets: jnp.ndarray, positive: jnp.ndarray
) -> jnp.ndarray:
  """BCE of the amodal probability 1 - p(class 0) of the softmax form:
  its logit is logsumexp(channels 1..L) - channel 0. Shapes as
  :func:`softmax_layer_loss`."""
  x = _f32(logits)
  amodal_logit = jax.nn.logsumexp(x[..., 1:], axis=-1) - x[..., 0]
  targets = jnp.clip(jnp.sum(_f32(layer_targets), axis=-1), 0.0, 1.0)
  return _masked_mean(sigmoid_bce(amodal_logit, targets), positive[:, :, None, None])


def mask_losses(
    logits: jnp.ndarray,
    layer_targets: jnp.ndarray,
    positive: jnp.ndarray,
    activation: str = 'sigmoid',
    occluded_pos_weight: float = 1.0,
) -> dict[str, jnp.ndarray]:
  """The 'layer' and 'amodal' terms of the mask head's form
  (``model.layer_activation``): :func:`layer_loss` and :func:`amodal_loss`
  on the L layer logits ('sigmoid', the release), or
  :func:`softmax_layer_loss` and :func:`softmax_amodal_loss` on all 1 + L
  channels ('softmax')."""
  if activation == 'softmax':
    return {
        'layer': softmax_layer_loss(
            logits, layer_targets, positive, occluded_pos_weight=occluded_pos_weight
        ),
        'amodal': softmax_amodal_loss(logits, layer_targets, positive),
    }
  return {
      'layer': layer_loss(logits, layer_targets, positive, occluded_pos_weight=occluded_pos_weight),
      'amodal': amodal_loss(logits, layer_targets, positive),
  }


def layering_map_loss(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Softmax CE of the learnt layering map, mean over every cell.

  Args:
    logits: (B, G, G, C).
    targets: (B, G, G) int in [0, C - 1] (``ops.targets.layering_map_targets``).
  """
  ce = _cross_entropy(logits, targets)
  return _masked_mean(ce, jnp.ones(ce.shape, bool))


def total_loss(terms: Mapping[str, jnp.ndarray], weights: Mapping[str, float]) -> jnp.ndarray:
  """Weighted sum of the terms.

  Args:
    terms: scalars keyed by :data:`TERMS` (the field names of
      ``config.loss``); extra keys are ignored.
    weights: ``config.loss`` (or any mapping with the same keys).

  Returns:
    float32 scalar.
  """
  missing = [t for t in TERMS if t not in terms]
  if missing:
    raise KeyError(f'loss terms missing: {missing}')
  return sum(float(weights[t]) * _f32(terms[t]) for t in TERMS)
