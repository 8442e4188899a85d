"""Tests for sln_jax.semdist: the release's rank rule, round trips, order."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sln_jax import semdist
from tests import semdist_decode

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


def _scene(draw_rects, depth_rank, size):
  """Rectangles (y1, x1, y2, x2) -> amodal, visible, occluded, by depth."""
  n = len(draw_rects)
  amodal = np.zeros((n, size, size), bool)
  for i, (y1, x1, y2, x2) in enumerate(draw_rects):
    amodal[i, y1:y2, x1:x2] = True
  visible = np.zeros_like(amodal)
  for i in range(n):
    in_front = depth_rank < depth_rank[i]
    visible[i] = amodal[i] & ~amodal[in_front].any(axis=0)
  return amodal, visible, amodal & ~visible


@st.composite
def scenes(draw, max_n=5, size=12):
  n = draw(st.integers(1, max_n))
  rects = []
  for _ in range(n):
    y1 = draw(st.integers(0, size - 1))
    x1 = draw(st.integers(0, size - 1))
    y2 = draw(st.integers(y1 + 1, size))
    x2 = draw(st.integers(x1 + 1, size))
    rects.append((y1, x1, y2, x2))
  rank = np.asarray(draw(st.permutations(list(range(n)))), np.int32)
  return (*_scene(rects, rank, size), rank)


def _naive_index(amodal, occluded, rank):
  """Per-pixel loop of the release's rule (load_layer2): independent ref."""
  n, h, w = amodal.shape
  out = np.zeros((n, h, w), np.uint8)
  order = sorted(range(n), key=lambda i: (rank[i], i))
  for y in range(h):
    for x in range(w):
      hidden = [j for j in order if occluded[j, y, x] and amodal[j, y, x]]
      for j in range(n):
        if not amodal[j, y, x]:
          continue
        out[j, y, x] = 2 + hidden.index(j) if j in hidden else 1
  return out


def test_rank_rule_three_stacked():
  # A (front) covers cols 0..5, B cols 2..7, C (back) cols 4..9, one row.
  rank = np.array([0, 1, 2])
  amodal, _, occluded = _scene([(0, 0, 1, 6), (0, 2, 1, 8), (0, 4, 1, 10)], rank, 10)
  amodal, occluded = amodal[:, :1], occluded[:, :1]
  idx = semdist.layer_index_map(amodal, occluded, rank)[:, 0]
  np.testing.assert_array_equal(idx[0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
  # B hidden behind A on 2..5: only hidden object there -> layer 1 (value 2).
  np.testing.assert_array_equal(idx[1], [0, 0, 2, 2, 2, 2, 1, 1, 0, 0])
  # C: behind A and B on 4,5 (2nd hidden -> layer 2, value 3), behind B
  # only on 6,7 (layer 1), visible on 8,9.
  np.testing.assert_array_equal(idx[2], [0, 0, 0, 0, 3, 3, 2, 2, 1, 1])


def test_rank_rule_ranks_by_depth_not_index():
  # Same stack listed back to front: depth_rank decides, not the index.
  amodal = np.ones((3, 2, 2), bool)
  occluded = np.ones((3, 2, 2), bool)
  occluded[2] = False  # index 2 is the front object
  idx = semdist.layer_index_map(amodal, occluded, np.array([2, 1, 0]))
  assert (idx[2] == 1).all() and (idx[1] == 2).all() and (idx[0] == 3).all()
  # Ties broken by index: equal ranks, both hidden -> index 0 first.
  idx = semdist.layer_index_map(amodal[:2], occluded[:2], np.array([1, 1]))
  assert (idx[0] == 2).all() and (idx[1] == 3).all()


def test_rank_rule_counts_hidden_only():
  # One pixel, four objects: A visible, B and C hidden, D (back) marked
  # visible. Ranks count hidden objects only: B layer 1, C layer 2; A and D
  # are on layer 0.
  amodal = np.ones((4, 1, 1), bool)
  occluded = np.array([False, True, True, False]).reshape(4, 1, 1)
  idx = semdist.layer_index_map(amodal, occluded, np.array([0, 1, 2, 3]))
  np.testing.assert_array_equal(idx.ravel(), [1, 2, 3, 1])


def test_occluded_outside_amodal_is_ignored():
  amodal = np.array([[[True, False]], [[True, True]]])
  occluded = np.array([[[False, False]], [[True, True]]])
  occluded2 = occluded.copy()
  occluded2[0, 0, 1] = True  # stray hidden pixel of object 0
  a = semdist.layer_index_map(amodal, occluded, np.array([0, 1]))
  b = semdist.layer_index_map(amodal, occluded2, np.array([0, 1]))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, 0], [[1, 0], [2, 2]])


@SETTINGS
@hypothesis.given(scenes(max_n=4, size=6))
def test_index_matches_per_pixel_reference(scene):
  amodal, _, occluded, rank = scene
  np.testing.assert_array_equal(
      semdist.layer_index_map(amodal, occluded, rank), _naive_index(amodal, occluded, rank)
  )


@SETTINGS
@hypothesis.given(scenes())
def test_round_trip_and_order(scene):
  amodal, visible, occluded, rank = scene
  n = len(rank)
  idx = semdist.layer_index_map(amodal, occluded, rank)
  assert idx.dtype == np.uint8 and idx.shape == amodal.shape
  # L >= N: one-hot channels; decoding recovers the masks exactly.
  ch = semdist.layer_channels(idx, max(n, 2))
  assert ch.dtype == np.float32 and ch.shape == (n, max(n, 2)) + amodal.shape[1:]
  np.testing.assert_array_equal(ch.sum(axis=1), amodal)
  dec = semdist_decode.decode(ch)
  np.testing.assert_array_equal(dec['visible'], visible)
  np.testing.assert_array_equal(dec['amodal'], amodal)
  np.testing.assert_array_equal(dec['occluded'], occluded)
  np.testing.assert_array_equal(dec['layer'], idx.astype(np.int32) - 1)
  # L = 1 collapses to the amodal mask.
  ch1 = semdist.layer_channels(idx, 1)
  np.testing.assert_array_equal(ch1[:, 0], amodal)
  np.testing.assert_array_equal(semdist_decode.decode(ch1)['amodal'], amodal)
  # Pairwise order of the decoded layers = annotated order where overlapping.
  order = semdist_decode.pairwise_order(dec['layer'])
  overlap = (amodal[:, None] & amodal[None]).reshape(n, n, -1).any(-1)
  np.fill_diagonal(overlap, False)
  expected = np.sign(rank[None, :] - rank[:, None]) * overlap
  np.testing.assert_array_equal(order, expected.astype(np.int8))
  # Global layering map = plain count.
  count = np.zeros(amodal.shape[1:], np.int64)
  for i in range(n):
    count += amodal[i]
  glm = semdist_decode.global_layering_map(amodal)
  assert glm.dtype == np.int32
  np.testing.assert_array_equal(glm, count)


@pytest.mark.parametrize('n', [254, 255, 300])
def test_layer_index_map_many_stacked_saturates(n):
  """n objects hidden on one pixel, listed front to back: object k is on
  layer k + 1 (value k + 2), saturating at 255 without wrapping around."""
  amodal = np.ones((n, 1, 2), bool)
  occluded = np.zeros_like(amodal)
  occluded[:, 0, 0] = True
  idx = semdist.layer_index_map(amodal, occluded, np.arange(n))
  assert idx.dtype == np.uint8
  np.testing.assert_array_equal(idx[:, 0, 0], np.minimum(np.arange(n) + 2, 255))
  np.testing.assert_array_equal(idx[:, 0, 1], np.ones(n))


def test_layer_channels_merge_and_batch_dims():
  idx = np.array([[[0, 1, 2, 3, 4, 9]]], np.uint8)  # (1, 1, 6)
  ch = semdist.layer_channels(idx, 3)
  assert ch.shape == (1, 3, 1, 6)
  np.testing.assert_array_equal(
      ch[0, :, 0], [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
  )
  batched = semdist.layer_channels(np.stack([idx, idx]), 3)  # (2, 1, 3, 1, 6)
  np.testing.assert_array_equal(batched[1], ch)
  jch = jax.jit(lambda x: semdist.layer_channels(x, 3))(jnp.asarray(idx))
  np.testing.assert_array_equal(np.asarray(jch), ch)
  with pytest.raises(ValueError):
    semdist.layer_channels(idx, 0)


def test_decode_probs_rules():
  # One pixel each: visible; hidden on layer 2; absent; hidden layer 1 wins.
  p = np.array(
      [[0.9, 0.1, 0.2], [0.1, 0.3, 0.8], [0.2, 0.4, 0.1], [0.4, 0.7, 0.6]], np.float32
  ).reshape(4, 1, 3, 1)
  p = np.transpose(p, (1, 2, 0, 3))  # (1, 3, 4, 1)
  dec = semdist_decode.decode(p)
  np.testing.assert_array_equal(dec['visible'][0, :, 0], [1, 0, 0, 0])
  np.testing.assert_array_equal(dec['amodal'][0, :, 0], [1, 1, 0, 1])
  np.testing.assert_array_equal(dec['occluded'][0, :, 0], [0, 1, 0, 1])
  np.testing.assert_array_equal(dec['layer'][0, :, 0], [0, 2, -1, 1])
  jdec = jax.jit(semdist_decode.decode)(jnp.asarray(p))
  for k in dec:
    np.testing.assert_array_equal(np.asarray(jdec[k]), dec[k])


def test_decode_logits_matches_sigmoid_definitions():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 2, (3, 3, 5, 5)).astype(np.float32)
  sig = lambda v: 1 / (1 + np.exp(-v.astype(np.float64)))
  dec = semdist_decode.decode_logits(x, threshold=0.4)
  amodal = sig(x.sum(1)) > 0.4
  visible = (sig(x[:, 0]) > 0.4) & amodal
  np.testing.assert_array_equal(dec['amodal'], amodal)
  np.testing.assert_array_equal(dec['visible'], visible)
  np.testing.assert_array_equal(dec['occluded'], amodal & ~visible)
  layer = np.where(visible, 0, np.where(amodal, 1 + x[:, 1:].argmax(1), -1))
  np.testing.assert_array_equal(dec['layer'], layer)
  jdec = jax.jit(lambda v: semdist_decode.decode_logits(v, 0.4))(jnp.asarray(x))
  for k in dec:
    np.testing.assert_array_equal(np.asarray(jdec[k]), dec[k])
  # L = 1: amodal == visible == sigmoid(logit) > t.
  d1 = semdist_decode.decode_logits(x[:, :1])
  np.testing.assert_array_equal(d1['amodal'], x[:, 0] > 0)
  assert not d1['occluded'].any() and (d1['layer'] <= 0).all()


def test_decode_threshold_is_strict():
  """Presence is p > t (logit > log(t / (1 - t))): exactly at the threshold
  a layer is absent. Pixel 0: all layers at t; pixel 1: layer 0 at t,
  layer 1 above."""
  p = np.array([[0.5, 0.5], [0.5, 0.7]], np.float32).T.reshape(1, 2, 1, 2)
  dec = semdist_decode.decode(p)
  np.testing.assert_array_equal(dec['amodal'][0, 0], [False, True])
  np.testing.assert_array_equal(dec['visible'][0, 0], [False, False])
  np.testing.assert_array_equal(dec['layer'][0, 0], [-1, 1])
  x = np.array([[0.0, 0.0], [0.0, 1.0]], np.float32).T.reshape(1, 2, 1, 2)
  for fn in (semdist_decode.decode_logits, jax.jit(semdist_decode.decode_logits)):
    dec = fn(x)  # sigmoid(0) = 0.5 = threshold
    np.testing.assert_array_equal(np.asarray(dec['amodal'])[0, 0], [False, True])
    np.testing.assert_array_equal(np.asarray(dec['visible'])[0, 0], [False, False])
    np.testing.assert_array_equal(np.asarray(dec['layer'])[0, 0], [-1, 1])


def _naive_order(layer):
  n = layer.shape[0]
  out = np.zeros((n, n), np.int8)
  for i in range(n):
    for j in range(n):
      both = (layer[i] >= 0) & (layer[j] >= 0)
      votes = (np.sign(layer[j] - layer[i]) * both).sum()
      out[i, j] = np.sign(votes)
  return out


def test_pairwise_order_majority_vote_and_jax_paths():
  rng = np.random.default_rng(1)
  layer = rng.integers(-1, 4, (6, 7, 9)).astype(np.int32)
  layer[5] = -1  # absent instance: no overlaps
  ref = _naive_order(layer)
  assert (ref != 0).any() and (ref[5] == 0).all()
  np.testing.assert_array_equal(semdist_decode.pairwise_order(layer), ref)
  scan = jax.jit(semdist_decode.pairwise_order)(jnp.asarray(layer))
  onehot = jax.jit(lambda v: semdist_decode.pairwise_order(v, num_levels=4))(jnp.asarray(layer))
  np.testing.assert_array_equal(np.asarray(scan), ref)
  np.testing.assert_array_equal(np.asarray(onehot), ref)
  assert np.asarray(scan).dtype == np.int8
  # Tie: one pixel each way -> 0.
  tie = np.array([[[0, 1]], [[1, 0]]])
  np.testing.assert_array_equal(semdist_decode.pairwise_order(tie), np.zeros((2, 2)))


@pytest.mark.parametrize('num_levels', [2, 4])
def test_pairwise_order_num_levels_drops_higher_layers(num_levels):
  """Layers >= num_levels count as absent (numpy, and jax's one-hot path):
  the plain vote with those pixels set to -1."""
  rng = np.random.default_rng(3)
  layer = rng.integers(-1, 6, (5, 6, 7)).astype(np.int32)
  ref = _naive_order(np.where(layer < num_levels, layer, -1))
  assert not np.array_equal(ref, _naive_order(layer))
  np.testing.assert_array_equal(semdist_decode.pairwise_order(layer, num_levels=num_levels), ref)
  onehot = jax.jit(lambda v: semdist_decode.pairwise_order(v, num_levels=num_levels))(
      jnp.asarray(layer)
  )
  np.testing.assert_array_equal(np.asarray(onehot), ref)


def test_layer_index_map_shape_errors():
  with pytest.raises(ValueError):
    semdist.layer_index_map(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 4), bool), np.arange(2))
  with pytest.raises(ValueError):
    semdist.layer_index_map(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3), bool), np.arange(3))


def test_decode_layer_logits_in_both_forms():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 4, 3)).astype(np.float32) * 3
  sig = lambda v: 1 / (1 + np.exp(-v))
  # Release form: x holds the L = 3 layer channels.
  got = semdist.decode_layer_logits(jnp.asarray(x), 'sigmoid')
  np.testing.assert_allclose(got['layer_probs'], sig(x), rtol=1e-5)
  np.testing.assert_allclose(got['amodal_probs'], sig(x.sum(-1)), rtol=1e-5)
  np.testing.assert_allclose(got['visible_probs'], sig(x[..., 0]), rtol=1e-5)
  # Softmax form: x holds (outside, visible, occluded) for L = 2.
  p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  got = semdist.decode_layer_logits(jnp.asarray(x), 'softmax')
  np.testing.assert_allclose(got['layer_probs'], p[..., 1:], rtol=1e-5)
  np.testing.assert_allclose(got['amodal_probs'], 1 - p[..., 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['visible_probs'], p[..., 1] / (p[..., 1] + p[..., 2]), rtol=1e-5)
  # Visible at 0.5 is exactly "the visible layer beats the occluded one".
  np.testing.assert_array_equal(np.asarray(got['visible_probs']) > 0.5, x[..., 1] > x[..., 2])
  with pytest.raises(ValueError, match='activation'):
    semdist.decode_layer_logits(jnp.asarray(x), 'tanh')
