"""Decoding of sem-dist layer maps, the tests' oracle of what the layers mean.

From per-layer probabilities or logits to visible / occluded / amodal masks
(``decode``, ``decode_logits``), the pairwise depth order the layers imply
(``pairwise_order``) and the global layering map (objects per pixel).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sln_jax.semdist import Array, _xp


def global_layering_map(amodal: Array) -> Array:
  """(N, H, W) bool amodal masks -> (H, W) int32 count of covering objects."""
  xp = _xp(amodal)
  return xp.asarray(amodal).astype(xp.int32).sum(axis=0, dtype=xp.int32)


def _masks_from_presence(visible: Array, amodal: Array, hidden_scores: Array, xp) -> dict:
  """Shared tail of ``decode`` / ``decode_logits``.

  hidden_scores: (N, L-1, H, W) scores of layers 1..L-1 (argmax picks the
  layer of an occluded pixel) or None when L = 1.
  """
  visible = visible & amodal
  if hidden_scores is None:
    layer = xp.where(amodal, 0, -1)
  else:
    hidden_layer = 1 + xp.argmax(hidden_scores, axis=1)
    layer = xp.where(visible, 0, xp.where(amodal, hidden_layer, -1))
  return dict(
      visible=visible, amodal=amodal, occluded=amodal & ~visible, layer=layer.astype(xp.int32)
  )


def decode(layer_probs: Array, threshold: float = 0.5) -> dict:
  """Masks from per-layer probabilities.

  Args:
    layer_probs: (N, L, H, W) probabilities of layers 0..L-1 (e.g. the
      one-hot ``layer_channels`` or per-layer sigmoids).
    threshold: presence threshold.

  Returns:
    dict of (N, H, W) arrays: ``visible`` = p[:, 0] > t; ``amodal`` = any
    layer present, i.e. max over layers > t (for the network's logits use
    ``decode_logits``: sigmoid of the summed logits); ``occluded`` = amodal &
    ~visible; ``layer`` int32 = 0 where visible, else 1 + argmax over layers
    1..L-1 where amodal, else -1. For L = 1 visible == amodal (no layering).
  """
  xp = _xp(layer_probs)
  p = xp.asarray(layer_probs)
  visible = p[:, 0] > threshold
  amodal = xp.max(p, axis=1) > threshold
  hidden = p[:, 1:] if p.shape[1] > 1 else None
  return _masks_from_presence(visible, amodal, hidden, xp)


def decode_logits(layer_logits: Array, threshold: float = 0.5) -> dict:
  """Masks from the layered mask head's logits, as the network defines them.

  Args:
    layer_logits: (N, L, H, W) logits of layers 0..L-1 (the head's channels
      1..L).
    threshold: probability threshold in (0, 1).

  Returns:
    dict as ``decode``: ``amodal`` = sigmoid(sum of layer logits) > t,
    ``visible`` = sigmoid(layer-0 logit) > t, restricted to ``amodal``;
    ``layer`` = 0 where visible, else 1 + argmax of the logits of layers
    1..L-1 where amodal, else -1. Thresholds are applied on the logit scale
    (sigmoid(x) > t <=> x > log(t / (1 - t))).
  """
  if not 0.0 < threshold < 1.0:
    raise ValueError(f'threshold must be in (0, 1), got {threshold}')
  xp = _xp(layer_logits)
  x = xp.asarray(layer_logits)
  cut = math.log(threshold / (1.0 - threshold))
  visible = x[:, 0] > cut
  amodal = xp.sum(x, axis=1) > cut
  hidden = x[:, 1:] if x.shape[1] > 1 else None
  return _masks_from_presence(visible, amodal, hidden, xp)


def _front_counts_onehot(layer: Array, num_levels: int, xp) -> Array:
  """(N, N) int32: pixels where both are present (0 <= layer < K) and i's
  layer is lower than j's, as a one-hot matmul over the K levels."""
  n = layer.shape[0]
  flat = layer.reshape(n, -1)[:, None, :]  # (N, 1, P)
  levels = xp.arange(num_levels, dtype=flat.dtype)[None, :, None]
  at = (flat == levels).astype(xp.float32)  # (N, K, P)
  behind = ((flat > levels) & (flat < num_levels)).astype(xp.float32)
  return xp.einsum('ikp,jkp->ij', at, behind).round().astype(xp.int32)


def pairwise_order(layer: Array, num_levels: Optional[int] = None) -> Array:
  """Pairwise depth order from decoded per-instance layers.

  Args:
    layer: (N, H, W) int, layer per pixel, -1 where the instance is absent.
    num_levels: optional static bound on the layer values (pixels with
      layers >= num_levels count as absent). Under jax it selects a one-hot
      matmul (O(N^2 K H W) flops); without it a row-by-row scan over
      instances (O(N^2 H W) work, O(N H W) memory). numpy loops over
      instances, each against the pixels it covers twice or more.

  Returns:
    (N, N) int8: +1 if i is in front of j (lower layer on more of their
    overlapping pixels than higher), -1 if behind, 0 with no overlap or a tie
    (and on the diagonal). Antisymmetric.
  """
  xp = _xp(layer)
  layer = xp.asarray(layer).astype(xp.int32)
  n = layer.shape[0]
  if xp is np:
    flat = layer.reshape(n, -1)
    if num_levels is not None:
      flat = np.where(flat < num_levels, flat, -1)
    # Only pixels covered by >= 2 instances vote. (P, N) rows per pixel.
    cols = flat[:, (flat >= 0).sum(axis=0) >= 2].T.copy()
    front = np.zeros((n, n), np.int64)
    for i in range(n):  # loop over instances, vectorised over pixels
      rows = cols[cols[:, i] >= 0]
      front[i] = (rows > rows[:, i : i + 1]).sum(axis=0)
  elif num_levels is not None:
    front = _front_counts_onehot(layer, num_levels, jnp)
  else:
    flat = layer.reshape(n, -1)

    def row(li):
      both = (li[None] >= 0) & (flat >= 0)
      return jnp.sum(both & (li[None] < flat), axis=1, dtype=jnp.int32)

    front = jax.lax.map(row, flat)
  vote = front - front.T
  return xp.sign(vote).astype(xp.int8)
