"""Semantics-aware distance map (sem-dist map): layered per-instance targets.

Every instance's amodal mask is split into layers by visibility: layer 0 is
the visible part; an occluded pixel of object j lies on layer
``1 + rank(j)``, where ``rank(j)`` is j's position among the objects whose
*hidden* part covers that pixel, sorted front to back (``depth_rank``
ascending, ties broken by instance index). The same rule as the release
(``load_layer2`` in ``amodal_train.py`` with ``objIDs_to_sindistanceLayer``):
there the hidden objects at a pixel are ranked by their index in the image's
region list, which COCOA / D2SA sort front to back, so both agree whenever
the instances are listed in depth order. Differences, deliberate:
  * an ``occluded`` pixel outside the object's own amodal mask is ignored
    (layer 0 of the index map there, and it does not count in other objects'
    ranks); the release keeps such pixels as both visible and hidden;
  * no instance cap (the release drops objects with index >= 32) and no
    small-component removal (that belongs to the legacy ``.npz`` writer).

Layer index map values (uint8): 0 outside the amodal mask, 1 visible,
k + 1 on layer k. ``layer_channels`` turns them into L one-hot channels with
layers >= L-1 merged into the last one (L = 1: the plain amodal mask).

Masks are (N, H, W) in image (or ROI) pixels, row-major (y, x). Functions take
numpy arrays; ``layer_channels``, ``decode``, ``decode_logits`` and
``pairwise_order`` also take jax arrays and work under ``jax.jit``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def _xp(x: Array):
  """numpy for numpy inputs, jax.numpy for jax arrays (incl. tracers)."""
  return jnp if isinstance(x, jax.Array) else np


def layer_index_map(amodal: np.ndarray, occluded: np.ndarray,
                    depth_rank: np.ndarray) -> np.ndarray:
  """Per-instance layer index map (numpy).

  Args:
    amodal: (N, H, W) bool, full masks.
    occluded: (N, H, W) bool, hidden parts (only the part inside ``amodal``
      is used).
    depth_rank: (N,) int, 0 = front-most; ties broken by instance index.

  Returns:
    (N, H, W) uint8: 0 outside ``amodal``, 1 on the visible part, k + 1 on
    layer k (k >= 1: hidden behind k - 1 other hidden objects listed in front
    of it at that pixel). Values saturate at 255 (more than 254 hidden
    objects stacked on one pixel).
  """
  amodal = np.asarray(amodal, bool)
  occluded = np.asarray(occluded, bool)
  depth_rank = np.asarray(depth_rank).reshape(-1)
  n = amodal.shape[0]
  if occluded.shape != amodal.shape or depth_rank.shape != (n,):
    raise ValueError(f'shape mismatch: amodal {amodal.shape}, occluded '
                     f'{occluded.shape}, depth_rank {depth_rank.shape}')
  hidden = occluded & amodal
  # Front-to-back order: depth rank, then index (lexsort: last key primary).
  order = np.lexsort((np.arange(n), depth_rank))
  out = np.empty(amodal.shape, np.uint8)
  # acc = 1 + number of hidden objects at or in front of the current one, so
  # a hidden pixel gets 1 + (rank + 1) = acc. Loop over instances only.
  acc = np.ones(amodal.shape[1:], np.uint16 if n >= 254 else np.uint8)
  for k in order:
    np.add(acc, hidden[k], out=acc, casting='unsafe')
    value = np.where(hidden[k], acc, amodal[k].view(np.uint8))
    out[k] = np.minimum(value, 255) if n >= 254 else value
  return out


def layer_channels(index: Array, num_layers: int) -> Array:
  """One-hot layer channels of a layer index map.

  Args:
    index: (..., H, W) integer layer index map (0 absent, k + 1 = layer k).
    num_layers: L >= 1.

  Returns:
    (..., L, H, W) float32: channel k = (layer == k) for k < L - 1, channel
    L - 1 = (layer >= L - 1). Their sum is the amodal mask. Same merge as
    the release (``load_layer2``: layers >= NUM_CLASSES - 2 go to the last
    channel).
  """
  if num_layers < 1:
    raise ValueError(f'num_layers must be >= 1, got {num_layers}')
  xp = _xp(index)
  index = xp.asarray(index).astype(xp.int32)
  ks = xp.arange(1, num_layers + 1, dtype=xp.int32).reshape(
      (num_layers, 1, 1))
  idx = index[..., None, :, :]
  channels = (idx == ks)
  last = idx[..., 0, :, :] >= num_layers
  if xp is np:
    channels[..., -1, :, :] |= last
  else:
    channels = channels.at[..., -1, :, :].set(channels[..., -1, :, :] | last)
  return channels.astype(xp.float32)


def global_layering_map(amodal: Array) -> Array:
  """(N, H, W) bool amodal masks -> (H, W) int32 count of covering objects."""
  xp = _xp(amodal)
  return xp.asarray(amodal).astype(xp.int32).sum(axis=0, dtype=xp.int32)


def _masks_from_presence(visible: Array, amodal: Array, hidden_scores: Array,
                         xp) -> dict:
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
  return dict(visible=visible, amodal=amodal, occluded=amodal & ~visible,
              layer=layer.astype(xp.int32))


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
  flat = layer.reshape(n, -1)[:, None, :]                    # (N, 1, P)
  levels = xp.arange(num_levels, dtype=flat.dtype)[None, :, None]
  at = (flat == levels).astype(xp.float32)                   # (N, K, P)
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
      front[i] = (rows > rows[:, i:i + 1]).sum(axis=0)
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
