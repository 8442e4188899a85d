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

``decode_layer_logits`` turns the mask head's logits into layer, amodal and
visible probabilities, in either form of ``model.layer_activation``.

Masks are (N, H, W) in image (or ROI) pixels, row-major (y, x). Functions take
numpy arrays; ``layer_channels`` also takes jax arrays and works under
``jax.jit``; ``decode_layer_logits`` is jax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

LAYER_ACTIVATIONS = ('sigmoid', 'softmax')


def _xp(x: Array):
  """numpy for numpy inputs, jax.numpy for jax arrays (incl. tracers)."""
  return jnp if isinstance(x, jax.Array) else np


def layer_index_map(amodal: np.ndarray, occluded: np.ndarray, depth_rank: np.ndarray) -> np.ndarray:
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
    raise ValueError(
        f'shape mismatch: amodal {amodal.shape}, occluded '
        f'{occluded.shape}, depth_rank {depth_rank.shape}'
    )
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
  ks = xp.arange(1, num_layers + 1, dtype=xp.int32).reshape((num_layers, 1, 1))
  idx = index[..., None, :, :]
  channels = idx == ks
  last = idx[..., 0, :, :] >= num_layers
  if xp is np:
    channels[..., -1, :, :] |= last
  else:
    channels = channels.at[..., -1, :, :].set(channels[..., -1, :, :] | last)
  return channels.astype(xp.float32)


def decode_layer_logits(logits: Array, activation: str = 'sigmoid') -> dict[str, Array]:
  """Mask-head logits -> layer, amodal and visible probabilities (jax).

  Args:
    logits: (..., L) layer channels 1..L for 'sigmoid' (the release: one
      independent sigmoid per layer, channel 0 of the head unused), or
      (..., 1 + L) every head channel for 'softmax' (one softmax over
      outside-the-object, visible and the L - 1 occluded layers).
    activation: 'sigmoid' | 'softmax' (``model.layer_activation``).

  Returns:
    layer_probs (..., L): sigmoid of each channel | softmax of channels
    1..L; amodal_probs (...): sigmoid of the channels' sum | 1 - p(outside);
    visible_probs (...): sigmoid of channel 1 | p(visible) / p(object), the
    share of the object's probability on the visible layer, so that a
    pasted threshold of 0.5 keeps the pixels whose most likely layer (for
    L = 2) is the visible one.
  """
  x = jnp.asarray(logits, jnp.float32)
  if activation == 'sigmoid':
    return {
        'layer_probs': jax.nn.sigmoid(x),
        'amodal_probs': jax.nn.sigmoid(jnp.sum(x, axis=-1)),
        'visible_probs': jax.nn.sigmoid(x[..., 0]),
    }
  if activation != 'softmax':
    raise ValueError(f'activation must be one of {LAYER_ACTIVATIONS}, got {activation!r}')
  probs = jax.nn.softmax(x, axis=-1)
  # p(visible | object) from logits: softmax over channels 1..L, channel 1.
  visible = jax.nn.softmax(x[..., 1:], axis=-1)[..., 0]
  return {
      'layer_probs': probs[..., 1:],
      'amodal_probs': 1.0 - probs[..., 0],
      'visible_probs': visible,
  }
