"""FPN and RPN head: shapes, top-down wiring, shared weights, anchor order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sln_jax.models import fpn as fpn_lib
from sln_jax.models import rpn as rpn_lib
from tests import torch_reference as tr
from tests.random_params import random_params, to_torch


def _fill(shapes, seed=0):
  return random_params(shapes, seed, std=0.3, positive_vectors=False)


def _feats(seed=1, b=2, c=8):
  rng = np.random.default_rng(seed)
  return {
      f'c{k}': jnp.asarray(rng.normal(size=(b, 64 >> k, 64 >> k, c << k)), jnp.float32)
      for k in (2, 3, 4, 5)
  }


def test_fpn_shapes_names_and_numerics():
  feats = _feats()
  model = fpn_lib.FPN(channels=16)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), feats))
  assert set(v['params']) == {f'P{s}_{n}' for s in (2, 3, 4, 5) for n in ('lateral', 'output')}
  out = jax.jit(model.apply)(v, feats)
  for k, side in zip(('p2', 'p3', 'p4', 'p5', 'p6'), (16, 8, 4, 2, 1)):
    assert out[k].shape == (2, side, side, 16), k
  # Independent numpy reference of the top-down path.
  p = jax.tree.map(np.asarray, v['params'])
  x = {k: np.asarray(a, np.float64) for k, a in feats.items()}
  lat = (
      lambda s: np.einsum('bhwc,cd->bhwd', x[f'c{s}'], p[f'P{s}_lateral']['kernel'][0, 0])
      + p[f'P{s}_lateral']['bias']
  )
  up = lambda a: a.repeat(2, 1).repeat(2, 2)
  t5 = lat(5)
  t4 = lat(4) + up(t5)
  t3 = lat(3) + up(t4)

  def conv3(a, q):
    a = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = a.shape[1] - 2, a.shape[2] - 2
    return (
        sum(
            np.einsum('bhwc,cd->bhwd', a[:, i : i + h, j : j + w], q['kernel'][i, j])
            for i in range(3)
            for j in range(3)
        )
        + q['bias']
    )

  np.testing.assert_allclose(out['p3'], conv3(t3, p['P3_output']), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['p5'], conv3(t5, p['P5_output']), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out['p6'], np.asarray(out['p5'])[:, ::2, ::2])


def test_rpn_shared_weights_and_anchor_order():
  rng = np.random.default_rng(2)
  levels = [jnp.asarray(rng.normal(size=(2, s, s, 16)), jnp.float32) for s in (16, 8, 4, 2, 1)]
  model = rpn_lib.RPN(anchors_per_location=3, channels=32)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), levels))
  assert set(v['params']) == {'conv_shared', 'conv_class', 'conv_bbox'}
  assert v['params']['conv_class']['kernel'].shape == (1, 1, 32, 6)
  assert v['params']['conv_bbox']['kernel'].shape == (1, 1, 32, 12)
  out = jax.jit(model.apply)(v, levels)
  total = sum(s * s for s in (16, 8, 4, 2, 1)) * 3
  assert out['logits'].shape == (2, total, 2)
  assert out['deltas'].shape == (2, total, 4)
  np.testing.assert_allclose(np.asarray(out['probs']).sum(-1), 1.0, rtol=1e-6)
  # Anchor order: level, row, column, anchor. Recompute the level-1 (P3)
  # outputs alone and find anchor (row 2, col 5, ratio 1) at its index.
  single = jax.jit(model.apply)(v, [levels[1]])
  offset = 16 * 16 * 3
  idx = offset + (2 * 8 + 5) * 3 + 1
  np.testing.assert_allclose(
      out['logits'][:, idx], single['logits'][:, (2 * 8 + 5) * 3 + 1], rtol=1e-5, atol=1e-5
  )
  # torch layout check: NCHW conv output permuted to NHWC then viewed (-1, 2):
  # channel 2a + k of cell (r, c) is logits[(r * W + c) * A + a, k].
  p = jax.tree.map(np.asarray, v['params'])
  x = np.pad(np.asarray(levels[1], np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h = (
      sum(
          np.einsum('bhwc,cd->bhwd', x[:, i : i + 8, j : j + 8], p['conv_shared']['kernel'][i, j])
          for i in range(3)
          for j in range(3)
      )
      + p['conv_shared']['bias']
  )
  h = np.maximum(h, 0)
  cls = np.einsum('bhwc,cd->bhwd', h, p['conv_class']['kernel'][0, 0]) + p['conv_class']['bias']
  np.testing.assert_allclose(
      single['logits'][0, (2 * 8 + 5) * 3 + 1], cls[0, 2, 5, 2:4], rtol=1e-4, atol=1e-4
  )


def test_fpn_top_down_reaches_every_level():
  """P2..P5 each against a numpy top-down path: P_k = conv3(lat_k + up(sum
  of the levels above)), down to P2."""
  feats = _feats(seed=3, b=1)
  model = fpn_lib.FPN(channels=8)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), feats), seed=4)
  out = jax.jit(model.apply)(v, feats)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
  top = None
  for s in (5, 4, 3, 2):
    q = p[f'P{s}_lateral']
    lat = (
        np.einsum('bhwc,cd->bhwd', np.asarray(feats[f'c{s}'], np.float64), q['kernel'][0, 0])
        + q['bias']
    )
    top = lat if top is None else lat + top.repeat(2, 1).repeat(2, 2)
    a = np.pad(top, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h = top.shape[1]
    q = p[f'P{s}_output']
    want = (
        sum(
            np.einsum('bhwc,cd->bhwd', a[:, i : i + h, j : j + h], q['kernel'][i, j])
            for i in range(3)
            for j in range(3)
        )
        + q['bias']
    )
    np.testing.assert_allclose(out[f'p{s}'], want, rtol=1e-4, atol=1e-4, err_msg=f'p{s}')


@pytest.mark.parametrize('stride', [1, 2])
def test_rpn_matches_torch_reference(stride):
  """Logits and deltas of every level against the release's RPN
  (tests/torch_reference.py), including its TF-SAME padding at
  anchor_stride 2."""
  rng = np.random.default_rng(5)
  levels = [rng.normal(size=(1, s, s, 16)).astype(np.float32) for s in (16, 8, 4, 2, 1)]
  model = rpn_lib.RPN(anchors_per_location=3, anchor_stride=stride, channels=32)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), levels), seed=6)
  out = jax.jit(model.apply)(v, levels)
  ref = tr.RPN(tr.RefSpec(fpn_channels=16, rpn_channels=32, num_anchors=3, anchor_stride=stride))
  with torch.no_grad():
    for name in ('conv_shared', 'conv_class', 'conv_bbox'):
      getattr(ref, name).weight.copy_(to_torch(v['params'][name]['kernel']).permute(3, 2, 0, 1))
      getattr(ref, name).bias.copy_(to_torch(v['params'][name]['bias']))
    pairs = [ref(to_torch(x).permute(0, 3, 1, 2)) for x in levels]
  logits = torch.cat([l for l, _ in pairs], 1).numpy()
  deltas = torch.cat([d for _, d in pairs], 1).numpy()
  assert out['logits'].shape == logits.shape and out['deltas'].shape == deltas.shape
  assert logits.shape[1] == 3 * sum(((s + stride - 1) // stride) ** 2 for s in (16, 8, 4, 2, 1))
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['deltas'], deltas, rtol=1e-4, atol=1e-4)
