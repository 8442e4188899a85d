"""Region proposal head (release form), shared over P2..P6.

conv_shared 3x3 (SAME, stride anchor_stride) + ReLU -> conv_class 1x1
(2 per anchor) and conv_bbox 1x1 (4 per anchor). Outputs are concatenated in
the release's anchor order: level (P2..P6), then row, column, anchor ratio.
Module paths: ``conv_shared``, ``conv_class``, ``conv_bbox``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sln_jax.models.resnet import conv, same_pad

Dtype = Any


class RPN(nn.Module):
  """Features [(B, Hl, Wl, C)] per level -> dict (float32):

  logits (B, Atot, 2) [background, foreground], probs (B, Atot, 2) softmax,
  deltas (B, Atot, 4) (dy, dx, log dh, log dw) unscaled by bbox_std;
  Atot = sum_l ceil(Hl / stride) * ceil(Wl / stride) * anchors_per_location.
  """

  anchors_per_location: int = 3
  anchor_stride: int = 1
  channels: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> dict[str, jax.Array]:
    a = self.anchors_per_location
    shared = conv(self.channels, 3, self.anchor_stride, dtype=self.dtype, name='conv_shared')
    cls = conv(2 * a, 1, dtype=self.dtype, name='conv_class')
    box = conv(4 * a, 1, dtype=self.dtype, name='conv_bbox')
    logits, deltas = [], []
    for f in features:
      h = nn.relu(shared(same_pad(f, 3, self.anchor_stride)))
      b = f.shape[0]
      logits.append(cls(h).reshape(b, -1, 2))
      deltas.append(box(h).reshape(b, -1, 4))
    logits = jnp.concatenate(logits, axis=1).astype(jnp.float32)
    deltas = jnp.concatenate(deltas, axis=1).astype(jnp.float32)
    return {'logits': logits, 'probs': jax.nn.softmax(logits, axis=-1), 'deltas': deltas}
