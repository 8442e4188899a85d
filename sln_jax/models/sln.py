"""The whole Semantics Layering Network: training forward and inference forward.

Coordinates: the batch carries canvas pixels (y1, x1, y2, x2); inside the
model every box is normalised by the canvas side S (``boxes / S``), so the
anchors, proposals, ROIs and detections live in [0, 1] and the same boxes
index the FPN maps and the GLM map (``glm_image`` is the whole canvas
resized, so a normalised canvas box is also a normalised GLM box).

Loss weights: ``SLN(config.model, loss_weights=config.loss)`` (see
:func:`build_model`); ``train_forward`` also accepts ``loss_weights``, which
wins. Missing weights default to 1 (the release). The same mapping may carry
``occluded_pos_weight`` (:func:`sln_jax.losses.layer_loss`; 1 = release).

Training mask head: it only runs on the positive slots. ``sample_rois``
places positives first, so the first ``int(rois_per_image * positive_ratio)``
ROI slots hold every possible positive; the mask head and the mask losses
use those slots only (masked by ``positive``), a static count (70 of the
100 slots at the release's settings) that spares the mask head the slots
that can only hold negatives.

GLM disabled (``model.glm.enabled=False``): no GLM parameters; the mask head
input is the FPN ROI features alone.

Learnt layering map (``model.layering_map.enabled``; off in the release):
``LayeringMapHead`` classifies, on P2, how many objects cover each cell
(``targets.layering_map_targets``, loss term ``layering_map``); its softmax
is crop-and-resized per ROI like the GLM and appended to the mask head's
input. The mask losses train it too (no stop-gradient).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sln_jax import losses, semdist
from sln_jax.models import layer_metrics
from sln_jax.models.deeplab import DeepLabV2
from sln_jax.models.fpn import FPN
from sln_jax.models.heads import BoxHead, LayeringMapHead, MaskHead
from sln_jax.models.norm import NormSpec
from sln_jax.models.resnet import ResNet
from sln_jax.models.rpn import RPN

# The variables of an SLN, kept reachable here: sln.init_variables etc.
from sln_jax.models.variables import count_parameters, init_variables, variable_shapes  # noqa: F401
from sln_jax.ops import anchors as anchor_ops
from sln_jax.ops import boxes as box_ops
from sln_jax.ops import postprocess, proposals, roi_align, targets

FEATURE_STRIDES = anchor_ops.DEFAULT_STRIDES  # P2..P6: 4, 8, 16, 32, 64


class SLN(nn.Module):
  """SLN over ``config`` = the model sub-config (``config.model``)."""

  config: Any
  loss_weights: Optional[Mapping[str, float]] = None
  bn_axis_name: Optional[str] = None  # batch-mode BN: devices that share statistics

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    norm = NormSpec(
        train=bool(c.train_bn), momentum=float(c.bn_momentum), axis_name=self.bn_axis_name
    )
    if 2 * c.roi.mask_pool_size != c.roi.mask_size:
      raise ValueError(
          f'model.roi.mask_size ({c.roi.mask_size}) must be twice '
          f'model.roi.mask_pool_size ({c.roi.mask_pool_size})'
      )
    self.backbone = ResNet(
        stage_sizes=tuple(c.backbone.stage_sizes),
        width=c.backbone.width,
        bn_eps=c.backbone.bn_eps,
        norm=norm,
        dtype=dtype,
    )
    self.fpn = FPN(channels=c.fpn_channels, dtype=dtype)
    self.rpn = RPN(
        anchors_per_location=len(c.rpn.anchor_ratios),
        anchor_stride=c.rpn.anchor_stride,
        channels=c.rpn.conv_channels,
        dtype=dtype,
    )
    self.box_head = BoxHead(
        num_classes=c.num_classes,
        channels=c.box_head_channels,
        bn_eps=c.backbone.bn_eps,
        norm=norm,
        dtype=dtype,
    )
    self.mask_head = MaskHead(
        num_layers=c.num_layers,
        background_channel=self._activation() == 'softmax',
        roi_context=bool(c.get('mask_head_context', False)),
        channels=c.mask_head_channels,
        bn_eps=c.backbone.bn_eps,
        norm=norm,
        dtype=dtype,
    )
    if self._layering_enabled():
      lm = c.layering_map
      self.layering_head = LayeringMapHead(
          num_classes=lm.num_classes,
          channels=lm.channels,
          bn_eps=c.backbone.bn_eps,
          norm=norm,
          dtype=dtype,
      )
    if c.glm.enabled:
      g = c.glm
      self.glm = DeepLabV2(
          stage_sizes=tuple(g.stage_sizes),
          width=g.width,
          num_classes=g.num_classes,
          atrous_rates=tuple(g.atrous_rates),
          scales=tuple(g.scales),
          bn_eps=g.bn_eps,
          dtype=dtype,
      )

  # ------------------------------------------------------------- pieces
  def _activation(self) -> str:
    """``model.layer_activation`` ('sigmoid', the release, when absent)."""
    return str(self.config.get('layer_activation', 'sigmoid'))

  def _layering_enabled(self) -> bool:
    lm = self.config.get('layering_map')
    return bool(lm is not None and lm.enabled)

  def _layering_logits(self, pyramid) -> Optional[jax.Array]:
    """(B, S/4, S/4, C) layering-map logits on P2, or None when disabled."""
    return self.layering_head(pyramid[0]) if self._layering_enabled() else None

  def _preprocess(self, image: jax.Array) -> jax.Array:
    """uint8 RGB (B, H, W, 3) -> (float - mean_pixel) in the compute dtype."""
    mean = jnp.asarray(self.config.mean_pixel, jnp.float32)
    return (image.astype(jnp.float32) - mean).astype(jnp.dtype(self.config.dtype))

  def _anchors(self, size: int) -> jnp.ndarray:
    """(A, 4) normalised anchors (numpy at trace time -> constant)."""
    r = self.config.rpn
    a = anchor_ops.generate_anchors(
        (size, size),
        tuple(r.anchor_scales),
        tuple(r.anchor_ratios),
        FEATURE_STRIDES,
        r.anchor_stride,
    )
    return jnp.asarray(a / np.float32(size))

  def _features(self, image: jax.Array):
    feats = self.fpn(self.backbone(self._preprocess(image)))
    pyramid = [feats[f'p{k}'] for k in (2, 3, 4, 5)]
    rpn_out = self.rpn(pyramid + [feats['p6']])
    return pyramid, rpn_out

  def _glm_features(self, glm_image: jax.Array) -> Optional[jax.Array]:
    if not self.config.glm.enabled:
      return None
    return self.glm(self._preprocess(glm_image))['features']

  def _proposals(self, rpn_out, size: int, post_nms_topk: int):
    r = self.config.rpn
    rois, valid = proposals.generate_proposals(
        rpn_out['probs'][..., 1],
        rpn_out['deltas'],
        self._anchors(size),
        pre_nms_topk=r.pre_nms_topk,
        nms_threshold=r.nms_threshold,
        post_nms_topk=post_nms_topk,
        bbox_std=tuple(r.bbox_std),
        # release QUIRK: NMS IoU in canvas pixels with the +1 convention
        nms_pixel_scale=float(size) if r.legacy_nms_plus_one else None,
    )
    return jax.lax.stop_gradient(rois), valid

  def _pool(self, pyramid, rois: jax.Array, crop: int, size: int) -> jax.Array:
    o = self.config.roi
    return roi_align.multilevel_crop_and_resize(
        pyramid,
        rois,
        crop,
        image_area=float(size * size),
        aligned=o.aligned,
        sampling_ratio=o.sampling_ratio,
    )

  def _box_head(self, pyramid, rois: jax.Array, size: int, mask: Optional[jax.Array] = None):
    """``mask`` (B, R) bool: ROIs that count in batch-mode BN statistics."""
    b, r = rois.shape[:2]
    pooled = self._pool(pyramid, rois, self.config.roi.pool_size, size)
    out = self.box_head(
        pooled.reshape((b * r,) + pooled.shape[2:]), None if mask is None else mask.reshape(b * r)
    )
    return jax.tree.map(lambda x: x.reshape((b, r) + x.shape[1:]), out)

  def _mask_head(
      self,
      pyramid,
      glm_feats,
      rois: jax.Array,
      glm_rois: jax.Array,
      size: int,
      mask: Optional[jax.Array] = None,
      layering_logits: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Layer logits (B, N, M, M, L) for normalised ``rois`` (B, N, 4);
    ``mask`` (B, N) bool: ROIs that count in batch-mode BN statistics;
    ``layering_logits`` (B, G, G, C): the layering map, whose softmax is
    cropped per ROI into the mask head's input."""
    crop = self.config.roi.mask_pool_size
    b, n = rois.shape[:2]
    flat = lambda x: x.reshape((b * n,) + x.shape[2:])
    fpn = flat(self._pool(pyramid, rois, crop, size))
    glm = None
    if glm_feats is not None:
      glm = flat(roi_align.crop_and_resize(glm_feats, jax.lax.stop_gradient(glm_rois), crop))
    layering = None
    if layering_logits is not None:
      probs = jax.nn.softmax(layering_logits, axis=-1)
      layering = flat(roi_align.crop_and_resize(probs, jax.lax.stop_gradient(rois), crop))
    logits = self.mask_head(
        fpn, glm, None if mask is None else mask.reshape(b * n), layering=layering
    )
    return logits.reshape((b, n) + logits.shape[1:])

  # ------------------------------------------------------------- training
  def train_forward(
      self,
      batch: Mapping[str, jax.Array],
      rng: jax.Array,
      loss_weights: Optional[Mapping[str, float]] = None,
  ):
    """Training forward of a batch (leading axis B; docs/architecture.md).

    Args:
      batch: image (B,S,S,3) uint8, glm_image (B,G,G,3) uint8, gt_boxes
        (B,M,4) canvas pixels (matching and box-delta targets; jittered
        with input.box_jitter), gt_classes (B,M) int32, gt_valid (B,M)
        bool, gt_layers (B,M,K,K,L) float32 cropped to gt_layer_boxes
        (B,M,4) canvas pixels, the tight mask boxes (optional: gt_boxes
        when absent, right for batches without box jitter).
      rng: PRNG key, or (B,) keys, one per image (anchor and ROI sampling;
        the train step passes per-image keys so the randomness does not
        depend on how the batch is split over devices).
      loss_weights: optional override of the module's ``loss_weights``.

    Returns:
      (losses: the float32 terms of ``losses.TERMS`` and 'total', metrics:
      float32 scalars).
      Every term and metric is the mean over images of that image's value
      (:mod:`sln_jax.losses`), so a batch gives the same result as its
      images run one by one and averaged.
    """
    c = self.config
    size = batch['image'].shape[1]
    keys = jax.vmap(jax.random.split)(targets.per_image_keys(rng, batch['image'].shape[0]))
    rng_rpn, rng_roi = keys[:, 0], keys[:, 1]
    pyramid, rpn_out = self._features(batch['image'])
    glm_feats = self._glm_features(batch['glm_image'])
    layering_logits = self._layering_logits(pyramid)

    gt_boxes = box_ops.normalize(batch['gt_boxes'].astype(jnp.float32), size)
    gt_valid = batch['gt_valid'].astype(bool)
    gt_classes = batch['gt_classes'].astype(jnp.int32)

    r = c.rpn
    rpn_labels, rpn_deltas = targets.batched_rpn_targets(
        rng_rpn,
        self._anchors(size),
        gt_boxes,
        gt_valid,
        positive_iou=r.positive_iou,
        negative_iou=r.negative_iou,
        num_samples=r.anchors_per_image,
        positive_fraction=r.positive_fraction,
        bbox_std=tuple(r.bbox_std),
    )

    rois, rois_valid = self._proposals(rpn_out, size, r.post_nms_topk_train)
    o = c.roi
    sample = targets.batched_sample_rois(
        rng_roi,
        rois,
        rois_valid,
        gt_boxes,
        gt_classes,
        gt_valid,
        num_rois=o.rois_per_image,
        positive_ratio=o.positive_ratio,
        fg_iou=o.fg_iou,
        bbox_std=tuple(o.bbox_std),
    )
    sample = jax.tree.map(jax.lax.stop_gradient, sample)
    head = self._box_head(pyramid, sample['rois'], size, mask=sample['valid'])

    npos = max(1, int(o.rois_per_image * o.positive_ratio))
    pos = {k: v[:, :npos] for k, v in sample.items()}
    layer_logits = self._mask_head(
        pyramid,
        glm_feats,
        pos['rois'],
        pos['rois'],
        size,
        mask=pos['positive'],
        layering_logits=layering_logits,
    )
    layer_boxes = box_ops.normalize(
        batch.get('gt_layer_boxes', batch['gt_boxes']).astype(jnp.float32), size
    )
    layering_loss = jnp.float32(0.0)
    if layering_logits is not None:
      layering_loss = losses.layering_map_loss(
          layering_logits,
          targets.batched_layering_map_targets(
              batch['gt_layers'].astype(jnp.float32),
              layer_boxes,
              gt_valid,
              layering_logits.shape[1],
              layering_logits.shape[-1],
          ),
      )
    layer_targets = targets.batched_mask_targets(
        batch['gt_layers'].astype(jnp.float32),
        layer_boxes,
        pos['rois'],
        pos['matched_gt'],
        mask_size=o.mask_size,
        positive=pos['positive'],
    )

    given = dict(loss_weights if loss_weights is not None else (self.loss_weights or {}))
    terms = {
        'rpn_class': losses.rpn_class_loss(rpn_out['logits'], rpn_labels),
        'rpn_bbox': losses.rpn_bbox_loss(rpn_out['deltas'], rpn_deltas, rpn_labels),
        'head_class': losses.head_class_loss(
            head['logits'], sample['class_targets'], sample['valid']
        ),
        'head_bbox': losses.head_bbox_loss(
            head['deltas'], sample['class_targets'], sample['bbox_targets'], sample['valid']
        ),
        **losses.mask_losses(
            layer_logits,
            layer_targets,
            pos['positive'],
            self._activation(),
            float(given.get('occluded_pos_weight', 1.0)),
        ),
        'layering_map': layering_loss,
    }
    weights = {k: float(given.get(k, 1.0)) for k in losses.TERMS}
    terms['total'] = losses.total_loss(terms, weights)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    per_image = lambda x: jnp.mean(jnp.sum(f32(x), axis=1))
    correct = (jnp.argmax(head['logits'], -1) == sample['class_targets']) & sample['valid']
    metrics = {
        'rpn_positives': per_image(rpn_labels == 1),
        'roi_positives': per_image(sample['positive']),
        'roi_sampled': per_image(sample['valid']),
        'proposals': per_image(rois_valid),
        'head_accuracy': jnp.mean(
            jnp.sum(f32(correct), 1) / jnp.maximum(jnp.sum(f32(sample['valid']), 1), 1.0)
        ),
    }
    metrics.update(
        layer_metrics.layer_pixel_counts(
            layer_logits, layer_targets, pos['positive'], self._activation()
        )
    )
    return terms, metrics

  # ------------------------------------------------------------- inference
  def infer(
      self, image: jax.Array, glm_image: jax.Array, image_shape: jax.Array
  ) -> dict[str, jax.Array]:
    """Detections with layered masks (docs/architecture.md).

    Args:
      image: (B, S, S, 3) uint8 canvas; glm_image: (B, G, G, 3) uint8 canvas
        resized; image_shape: (B, 2) valid (h, w) inside the canvas, pixels.

    Returns:
      boxes (B,D,4) canvas pixels (y1,x1,y2,x2), scores (B,D), classes (B,D)
      int32, valid (B,D) bool, layer_probs (B,D,M,M,L), amodal_probs
      (B,D,M,M) and visible_probs (B,D,M,M) as ``semdist.decode_layer_logits``
      gives them for ``model.layer_activation`` (the release's 'sigmoid':
      sigmoid of each layer logit, of their sum, of the first); M =
      roi.mask_size. Invalid slots are zero.
    """
    c = self.config
    size = image.shape[1]
    pyramid, rpn_out = self._features(image)
    glm_feats = self._glm_features(glm_image)
    rois, rois_valid = self._proposals(rpn_out, size, c.rpn.post_nms_topk_test)
    head = self._box_head(pyramid, rois, size)
    hw = image_shape.astype(jnp.float32) / size
    window = jnp.concatenate([jnp.zeros_like(hw), hw], axis=-1)
    t = c.detection
    det = postprocess.batched_detect(
        rois,
        head['probs'],
        head['deltas'],
        window,
        roi_valid=rois_valid,
        bbox_std=tuple(c.roi.bbox_std),
        max_detections=t.max_detections,
        min_confidence=t.min_confidence,
        nms_threshold=t.nms_threshold,
    )
    return self._detections_with_masks(
        pyramid, glm_feats, det['boxes'], det['valid'], det['scores'], det['classes'], size
    )

  def infer_boxes(
      self,
      image: jax.Array,
      glm_image: jax.Array,
      image_shape: jax.Array,
      boxes: jax.Array,
      boxes_valid: jax.Array,
      classes: Optional[jax.Array] = None,
  ) -> dict[str, jax.Array]:
    """Masks of given boxes (the box-prompted protocol): the mask head of
    :meth:`infer` on ``boxes`` instead of the RPN and box head's detections.

    Args:
      image: (B, S, S, 3) uint8 canvas; glm_image: (B, G, G, 3) uint8 canvas
        resized; image_shape: (B, 2) valid (h, w) inside the canvas, pixels.
      boxes: (B, N, 4) canvas pixels (y1, x1, y2, x2), y2/x2 exclusive: the
        convention of the batches' ``gt_boxes`` and of :meth:`infer`'s
        ``boxes``; clipped to the image_shape window as detections are.
      boxes_valid: (B, N) bool, False on padding slots.
      classes: (B, N) int class of each box; None: 1 (foreground).

    Returns :meth:`infer`'s dict over the N given slots (boxes clipped,
    scores 1 on valid slots); invalid slots are zero.
    """
    size = image.shape[1]
    pyramid, _ = self._features(image)
    glm_feats = self._glm_features(glm_image)
    valid = boxes_valid.astype(bool)
    hw = image_shape.astype(jnp.float32)[:, None, :] / size  # (B, 1, 2)
    norm = box_ops.normalize(boxes.astype(jnp.float32), size)
    norm = jnp.clip(norm, 0.0, jnp.concatenate([hw, hw], axis=-1))
    classes = jnp.ones(valid.shape, jnp.int32) if classes is None else classes.astype(jnp.int32)
    scores, classes = valid.astype(jnp.float32), jnp.where(valid, classes, 0)
    return self._detections_with_masks(pyramid, glm_feats, norm, valid, scores, classes, size)

  def _detections_with_masks(
      self,
      pyramid,
      glm_feats,
      boxes: jax.Array,
      valid: jax.Array,
      scores: jax.Array,
      classes: jax.Array,
      size: int,
  ) -> dict[str, jax.Array]:
    """The inference tail of :meth:`infer` and :meth:`infer_boxes`: the mask
    head on normalised ``boxes`` (B, N, 4) (rounded to whole canvas pixels
    first with model.detection.round_boxes), decoded to probabilities; the
    boxes come back in canvas pixels, and every output of a slot whose
    ``valid`` (B, N) is False is zero (scores and classes are passed
    through)."""
    c = self.config
    boxes = jax.lax.stop_gradient(boxes)
    if c.detection.round_boxes:  # release QUIRK: whole canvas pixels (torch.round, half to even)
      boxes = jnp.round(boxes * size) / size
    # Release QUIRK (model.glm.legacy_pixel_boxes): pixel-unit boxes into the GLM crop.
    glm_boxes = boxes * size if c.glm.legacy_pixel_boxes else boxes
    logits = self._mask_head(
        pyramid, glm_feats, boxes, glm_boxes, size, layering_logits=self._layering_logits(pyramid)
    )
    keep = valid[:, :, None, None].astype(jnp.float32)
    return {
        'boxes': box_ops.denormalize(boxes, size) * keep[..., 0],
        'scores': scores,
        'classes': classes,
        'valid': valid,
        **{
            k: v * (keep[..., None] if k == 'layer_probs' else keep)
            for k, v in semdist.decode_layer_logits(logits, self._activation()).items()
        },
    }


def build_model(config) -> SLN:
  """SLN from the full config tree (model sub-config + loss weights)."""
  return SLN(config.model, loss_weights=dict(config.loss))
