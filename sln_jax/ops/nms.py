"""Greedy non-maximum suppression with static shapes.

Semantics are those of ``tf.image.non_max_suppression``: candidates are the
boxes with ``score > score_threshold``, visited by decreasing score (ties:
lower index first); a candidate is kept unless a kept box visited earlier has
IoU > ``iou_threshold`` with it (and, when ``groups`` is given, the same
group); at most ``max_output`` boxes are kept. Any threshold works (no
built-in self-suppression constant). IoU is :func:`boxes.iou` (boxes without
area overlap nothing; TF would first reorder flipped corners).

With ``pixel_scale`` (release QUIRK, ``model.rpn.legacy_nms_plus_one``) IoU is
instead the release's (py-faster-rcnn ``nms_kernel.cu`` / ``pth_nms.py``):
boxes multiplied by ``pixel_scale`` (the canvas side, for normalised boxes:
the release's pixel boxes), then :func:`boxes.iou_plus_one`, one pixel added
to every width and height of areas and intersections, so zero-area boxes
overlap and can be suppressed; the test stays ``IoU > iou_threshold``.

Algorithm: sort once (unless ``presorted``), then walk the sorted boxes in
tiles of ``tile`` boxes (one ``lax.while_loop``, stopping early once
``max_output`` boxes are kept). A tile is first suppressed by the boxes kept
so far (an IoU block of max_output x tile), then resolved internally by
iterating the greedy recurrence ``keep_j = cand_j & !any_{i<j}(keep_i &
iou_ij > t)`` on its tile x tile IoU matrix to its fixed point (unique, as
entry j depends only on entries before it; reached from any start within j
sweeps, usually a few). Each loop step runs ``sweeps`` sweeps and commits
the tile only when the last one changed nothing, else the next step resumes
the same tile, so the loop runs about one step per tile: a single loop with
no inner one, since on XLA:GPU every loop step waits for its condition on
the host. Work O(N log N + N * (max_output + tile)) IoUs, sequential depth
about N / tile steps; memory O(tile * (max_output + tile)).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sln_jax.ops import boxes as box_ops


def _suppresses(a, b, ga, gb, thr, iou_fn):
  """(n, m) bool: box a_i suppresses box b_j (IoU > thr, same group)."""
  hit = iou_fn(a, b) > thr
  if ga is not None:
    hit &= ga[:, None] == gb[None, :]
  return hit


def nms_padded(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    max_output: int,
    iou_threshold: float,
    score_threshold: float = -jnp.inf,
    groups: Optional[jnp.ndarray] = None,
    tile: int = 256,
    pixel_scale: Optional[float] = None,
    sweeps: int = 4,
    presorted: bool = False,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy NMS of one image.

  Args:
    boxes: (N, 4) (y1, x1, y2, x2), any units.
    scores: (N,) float; boxes with score <= ``score_threshold`` (e.g. padding
      at -inf) are never selected.
    max_output: static number of output slots K.
    iou_threshold: suppress when IoU > this (a Python float or a scalar).
    score_threshold: see ``scores``.
    groups: optional (N,) int; boxes only suppress boxes of the same group
      (per-class NMS).
    tile: static tile size (a performance knob; results do not depend on it).
    pixel_scale: None (default): plain IoU (:func:`boxes.iou`). A number:
      the release's IoU, on ``boxes * pixel_scale`` with the +1 pixel
      convention (:func:`boxes.iou_plus_one`); for normalised boxes pass the
      canvas side in pixels.
    sweeps: static sweeps of a tile's recurrence per loop step (a
      performance knob; results do not depend on it).
    presorted: static; True when ``scores`` are already non-increasing
      (e.g. ``lax.top_k``'s output): the sort, a no-op then, is skipped.
      Results are the same as without it for such scores, undefined for
      others.

  Returns:
    indices: (K,) int32 into ``boxes``, kept boxes by decreasing score,
      0 in unused slots.
    valid: (K,) bool, True for the first (number kept) slots.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  if groups is not None:
    groups = jnp.asarray(groups)
  n = boxes.shape[0]
  k = int(max_output)
  tile = max(1, min(int(tile), n))
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  if presorted:  # stable argsort of non-increasing scores: the identity
    order = jnp.arange(n, dtype=jnp.int32)
    s_boxes, s_scores, s_groups = boxes, scores, groups
  else:
    order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
    s_boxes, s_scores = boxes[order], scores[order]
    s_groups = None if groups is None else groups[order]
  s_boxes = jnp.pad(s_boxes, ((0, pad), (0, 0)))
  if pixel_scale is None:
    iou_fn = box_ops.iou
  else:
    iou_fn = box_ops.iou_plus_one
    s_boxes = s_boxes * jnp.float32(pixel_scale)
  cand = jnp.pad(s_scores > score_threshold, (0, pad))
  s_idx = jnp.pad(order, (0, pad))
  s_grp = None if groups is None else jnp.pad(s_groups, (0, pad))
  lower = jnp.tril(jnp.ones((tile, tile), bool), -1).T  # [i, j]: i < j

  sweeps = max(1, int(sweeps))

  def step(state):
    t, count, kept_boxes, kept_grp, out_idx, keep, fresh = state
    start = t * tile
    tb = jax.lax.dynamic_slice_in_dim(s_boxes, start, tile)
    tc = jax.lax.dynamic_slice_in_dim(cand, start, tile)
    ti = jax.lax.dynamic_slice_in_dim(s_idx, start, tile)
    tg = None if s_grp is None else jax.lax.dynamic_slice_in_dim(s_grp, start, tile)
    slot_used = jnp.arange(k) < count
    cross = _suppresses(kept_boxes, tb, kept_grp, tg, iou_threshold, iou_fn)
    tc = tc & ~jnp.any(cross & slot_used[:, None], axis=0)
    inner = _suppresses(tb, tb, tg, tg, iou_threshold, iou_fn) & lower
    # sweep: keep_j = tc_j & no kept i < j suppresses j, as a 0/1 product
    inner = inner.astype(jnp.float32)
    keep = jnp.where(fresh, tc, keep)  # a new tile starts from its candidates
    for _ in range(sweeps):
      prev, keep = keep, tc & (keep.astype(jnp.float32) @ inner == 0)
    done = jnp.all(keep == prev)  # a fixed point: commit the tile
    pos = count + jnp.cumsum(keep) - 1
    dest = jnp.where(done & keep & (pos < k), pos, k)  # k = dropped
    kept_boxes = kept_boxes.at[dest].set(tb, mode='drop')
    if kept_grp is not None:
      kept_grp = kept_grp.at[dest].set(tg, mode='drop')
    out_idx = out_idx.at[dest].set(ti, mode='drop')
    count = jnp.where(done, jnp.minimum(count + jnp.sum(keep), k), count)
    return (t + done.astype(jnp.int32), count, kept_boxes, kept_grp, out_idx, keep, done)

  def cond(state):
    t, count = state[0], state[1]
    return (t < num_tiles) & (count < k)

  grp0 = None if groups is None else jnp.zeros((k,), s_grp.dtype)
  init = (
      jnp.array(0, jnp.int32),
      jnp.array(0, jnp.int32),
      jnp.zeros((k, 4), jnp.float32),
      grp0,
      jnp.zeros((k,), jnp.int32),
      jnp.zeros((tile,), bool),
      jnp.array(True),
  )
  _, count, _, _, out_idx, _, _ = jax.lax.while_loop(cond, step, init)
  valid = jnp.arange(k) < count
  return jnp.where(valid, out_idx, 0), valid


def batched_nms_padded(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    max_output: int,
    iou_threshold: float,
    score_threshold: float = -jnp.inf,
    groups: Optional[jnp.ndarray] = None,
    tile: int = 256,
    pixel_scale: Optional[float] = None,
    sweeps: int = 4,
    presorted: bool = False,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """:func:`nms_padded` over a batch: boxes (B, N, 4), scores (B, N)
  [, groups (B, N)] -> indices (B, K) int32, valid (B, K) bool."""
  fn = lambda b, s, g: nms_padded(
      b, s, max_output, iou_threshold, score_threshold, g, tile, pixel_scale, sweeps, presorted
  )
  if groups is None:
    return jax.vmap(lambda b, s: fn(b, s, None))(boxes, scores)
  return jax.vmap(fn)(boxes, scores, groups)
