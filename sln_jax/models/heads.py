"""Box head and layered mask head (release form, NHWC, per ROI).

Module paths: box head ``conv1``, ``bn1``, ``conv2``, ``bn2``,
``linear_class``, ``linear_bbox`` [classifier.*]; mask head ``conv{1..4}``,
``bn{1..4}``, ``deconv``, ``conv5`` [mask.*]; layering-map head (no release
counterpart) ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``classes``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sln_jax.models.norm import NormSpec
from sln_jax.models.resnet import conv

Dtype = Any


class Upsample2x(nn.Module):
  """``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID',
  transpose_kernel=False)`` with the same parameters (kernel (2, 2, C_in,
  C_out), bias (C_out,)) and outputs, computed as one matmul and a
  depth-to-space: output pixel (2i + a, 2j + b) is ``x[i, j] @ kernel[1 - a,
  1 - b] + bias``. Stride equal to kernel means the four taps never overlap,
  so this is exact; it avoids the lhs-/rhs-dilated convolutions that XLA
  emits for a transposed conv and its kernel gradient, which XLA:CPU runs
  slowly (docs/benchmarks.md).

  (..., H, W, C_in) -> (..., 2H, 2W, C_out).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), (2, 2, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    y = jnp.einsum('...hwc,abco->...hawbo', x, kernel[::-1, ::-1].astype(self.dtype))
    *lead, h, _, w, _, o = y.shape
    return y.reshape(*lead, 2 * h, 2 * w, o) + bias.astype(self.dtype)


class BoxHead(nn.Module):
  """Pooled ROI features (R, P, P, C) -> dict (float32):

  logits (R, num_classes), probs (R, num_classes) softmax,
  deltas (R, num_classes, 4) (dy, dx, log dh, log dw), unscaled by bbox_std.
  conv1 is a P x P VALID conv (the release's 7x7 'fully connected' layer).
  """

  num_classes: int = 2
  channels: int = 1024
  bn_eps: float = 1e-3
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """``mask`` (R,) bool: the ROIs that count in batch-mode BN statistics."""
    pool = x.shape[1]
    x = conv(self.channels, pool, dtype=self.dtype, name='conv1')(x.astype(self.dtype))
    bn_mask = None if mask is None else mask[:, None, None]
    x = nn.relu(self.norm(self.bn_eps, self.dtype, 'bn1')(x, bn_mask))
    x = conv(self.channels, 1, dtype=self.dtype, name='conv2')(x)
    x = nn.relu(self.norm(self.bn_eps, self.dtype, 'bn2')(x, bn_mask))
    x = x.reshape(x.shape[0], self.channels)
    init = nn.initializers.normal(0.01)
    logits = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        kernel_init=init,
        param_dtype=jnp.float32,
        name='linear_class',
    )(x)
    deltas = nn.Dense(
        self.num_classes * 4,
        dtype=self.dtype,
        kernel_init=init,
        param_dtype=jnp.float32,
        name='linear_bbox',
    )(x)
    logits = logits.astype(jnp.float32)
    return {
        'logits': logits,
        'probs': jax.nn.softmax(logits, axis=-1),
        'deltas': deltas.astype(jnp.float32).reshape(-1, self.num_classes, 4),
    }


class MaskHead(nn.Module):
  """Layered mask head.

  Input: fpn (R, P, P, 256) ROI features, optionally glm (R, P, P, 183)
  GLM crops and layering (R, P, P, C) crops of the learnt layering map
  (:class:`LayeringMapHead`) of the same ROIs. The input is
  concat([glm, fpn, layering], -1): GLM channels FIRST, as in the release
  (torch.cat((cls_feature, x))), so a converted conv1 kernel maps channel for
  channel. Without the GLM (model.glm.enabled False) and the layering map
  the input is the FPN features alone.
  4 x (conv 3x3 SAME + BN (frozen unless model.train_bn) + ReLU) ->
  ConvTranspose 2x2/2 + ReLU -> conv 1x1 to 1 + num_layers channels;
  channel 0 is unused (release) unless ``background_channel``.

  Returns layer logits (R, 2P, 2P, num_layers) float32, or all
  (R, 2P, 2P, 1 + num_layers) channels with ``background_channel`` (the
  softmax form, channel 0 = outside the object).
  """

  num_layers: int = 1
  channels: int = 256
  bn_eps: float = 1e-3
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32
  background_channel: bool = False
  # Not in the release: after conv2, the ROI-wide mean and max of the
  # features are broadcast back and concatenated to every pixel, so conv3
  # and conv4 can compare a pixel with the whole ROI (whose texture it
  # shares: visible, or another object's: hidden).
  roi_context: bool = False

  @nn.compact
  def __call__(
      self,
      fpn: jax.Array,
      glm: Optional[jax.Array] = None,
      mask: Optional[jax.Array] = None,
      layering: Optional[jax.Array] = None,
  ) -> jax.Array:
    """``mask`` (R,) bool: the ROIs that count in batch-mode BN statistics."""
    x = fpn.astype(self.dtype)
    if glm is not None:
      x = jnp.concatenate([glm.astype(self.dtype), x], axis=-1)
    if layering is not None:
      x = jnp.concatenate([x, layering.astype(self.dtype)], axis=-1)
    bn_mask = None if mask is None else mask[:, None, None]
    for k in range(1, 5):
      if k == 3 and self.roi_context:
        pooled = jnp.concatenate(
            [jnp.mean(x, axis=(1, 2), keepdims=True), jnp.max(x, axis=(1, 2), keepdims=True)], -1
        )
        x = jnp.concatenate([x, jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[-1:])], -1)
      x = conv(self.channels, 3, padding=((1, 1), (1, 1)), dtype=self.dtype, name=f'conv{k}')(x)
      x = nn.relu(self.norm(self.bn_eps, self.dtype, f'bn{k}')(x, bn_mask))
    x = Upsample2x(self.channels, dtype=self.dtype, name='deconv')(x)
    x = nn.relu(x)
    x = conv(1 + self.num_layers, 1, dtype=self.dtype, name='conv5')(x)
    return (x if self.background_channel else x[..., 1:]).astype(jnp.float32)


class LayeringMapHead(nn.Module):
  """Learnt global layering map: per P2 cell, how many objects cover it.

  SLN's GLM gives the mask head image-level context (COCO-Stuff semantics);
  this head gives it the context the layering needs, learnt from the
  ground truth (``ops.targets.layering_map_targets``): a C-way
  classification of the number of amodal masks over each cell (0 .. C - 2,
  C - 1 = that many or more). Overlaps (2 or more) mark where one object
  hides another, and their extent outlines hidden parts.

  (B, H, W, F) P2 features -> 2 x (conv 3x3 SAME + BN + ReLU) -> conv 1x1
  -> (B, H, W, C) float32 logits.
  """

  num_classes: int = 4
  channels: int = 64
  bn_eps: float = 1e-3
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    for k in (1, 2):
      x = conv(self.channels, 3, padding=((1, 1), (1, 1)), dtype=self.dtype, name=f'conv{k}')(x)
      x = nn.relu(self.norm(self.bn_eps, self.dtype, f'bn{k}')(x))
    x = conv(self.num_classes, 1, dtype=self.dtype, name='classes')(x)
    return x.astype(jnp.float32)
