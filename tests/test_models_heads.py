"""Box head and layered mask head: shapes, dtypes, numerics against torch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sln_jax.models import heads
from sln_jax.models.norm import NormSpec
from tests.random_params import random_params
from tests.random_params import to_torch as _t


def _fill(shapes, seed=0):
  return random_params(shapes, seed, std=0.2)


def _conv(x, p, padding=0):
  return F.conv2d(x, _t(p['kernel']).permute(3, 2, 0, 1), _t(p['bias']), padding=padding)


def _bn(x, p, s, eps=1e-3):
  return F.batch_norm(
      x, _t(s['mean']), _t(s['var']), _t(p['scale']), _t(p['bias']), training=False, eps=eps
  )


def test_box_head_matches_torch():
  x = np.random.default_rng(1).normal(size=(5, 7, 7, 16)).astype(np.float32)
  model = heads.BoxHead(num_classes=3, channels=32)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  out = jax.jit(model.apply)(v, x)
  assert out['logits'].shape == (5, 3) and out['deltas'].shape == (5, 3, 4)
  assert out['probs'].dtype == jnp.float32
  p, s = v['params'], v['batch_stats']
  h = F.relu(_bn(_conv(_t(x).permute(0, 3, 1, 2), p['conv1']), p['bn1'], s['bn1']))
  h = F.relu(_bn(_conv(h, p['conv2']), p['bn2'], s['bn2'])).view(-1, 32)
  logits = F.linear(h, _t(p['linear_class']['kernel']).T, _t(p['linear_class']['bias']))
  deltas = F.linear(h, _t(p['linear_bbox']['kernel']).T, _t(p['linear_bbox']['bias']))
  np.testing.assert_allclose(out['logits'], logits.numpy(), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(out['deltas'], deltas.view(5, 3, 4).numpy(), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(out['probs'], torch.softmax(logits, 1).numpy(), atol=1e-5)


def test_mask_head_matches_torch_glm_channels_first():
  rng = np.random.default_rng(2)
  fpn = rng.normal(size=(3, 8, 8, 16)).astype(np.float32)
  glm = rng.uniform(size=(3, 8, 8, 6)).astype(np.float32)
  model = heads.MaskHead(num_layers=2, channels=8)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), fpn, glm))
  p, s = v['params'], v['batch_stats']
  assert p['conv1']['kernel'].shape == (3, 3, 22, 8)
  assert p['deconv']['kernel'].shape == (2, 2, 8, 8)
  assert p['conv5']['kernel'].shape == (1, 1, 8, 3)
  out = jax.jit(model.apply)(v, fpn, glm)
  assert out.shape == (3, 16, 16, 2) and out.dtype == jnp.float32
  # torch reference, release order torch.cat((glm, fpn), 1); ConvTranspose2d
  # weight (in, out, kh, kw) = our HWIO kernel flipped spatially.
  h = torch.cat([_t(glm), _t(fpn)], -1).permute(0, 3, 1, 2)
  for k in range(1, 5):
    h = F.relu(_bn(_conv(h, p[f'conv{k}'], padding=1), p[f'bn{k}'], s[f'bn{k}']))
  w = _t(np.asarray(p['deconv']['kernel'])[::-1, ::-1]).permute(2, 3, 0, 1)
  h = F.relu(F.conv_transpose2d(h, w, _t(p['deconv']['bias']), stride=2))
  ref = _conv(h, p['conv5']).permute(0, 2, 3, 1).numpy()[..., 1:]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


def test_mask_head_without_glm_and_bf16():
  fpn = jnp.ones((2, 8, 8, 16))
  model = heads.MaskHead(num_layers=1, channels=8, dtype=jnp.bfloat16)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), fpn))
  assert v['params']['conv1']['kernel'].shape == (3, 3, 16, 8)
  out = jax.jit(model.apply)(v, fpn)
  assert out.shape == (2, 16, 16, 1) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  box = heads.BoxHead(num_classes=2, channels=16, dtype=jnp.bfloat16)
  x = jnp.ones((4, 7, 7, 16))
  vb = _fill(jax.eval_shape(box.init, jax.random.PRNGKey(0), x))
  ob = jax.jit(box.apply)(vb, x)
  assert ob['deltas'].shape == (4, 2, 4) and ob['logits'].dtype == jnp.float32


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_upsample2x_equals_flax_conv_transpose(dtype):
  """Same parameters, same outputs and gradients as the transposed conv it
  replaces (so converted checkpoints and the release's deconv carry over)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7, 6))
  up = heads.Upsample2x(4, dtype=dtype)
  ref = nn.ConvTranspose(
      4,
      (2, 2),
      strides=(2, 2),
      padding='VALID',
      transpose_kernel=False,
      dtype=dtype,
      param_dtype=jnp.float32,
  )
  params = ref.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params
  )  # non-zero bias
  assert jax.tree.map(jnp.shape, up.init(jax.random.PRNGKey(1), x)) == jax.tree.map(
      jnp.shape, params
  )
  got, want = up.apply(params, x), ref.apply(params, x)
  assert got.shape == (3, 10, 14, 4) and got.dtype == want.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
  )
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))
  g_up = jax.grad(loss(up), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_up), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 10
    )


def test_heads_batch_mode_bn_counts_only_the_masked_rois():
  """model.train_bn: the box and mask heads hand their ROI mask to every BN,
  so the selected ROIs' outputs and the new running statistics are those of
  the selected ROIs run alone, whatever the other ROIs hold."""
  rng = np.random.default_rng(4)
  mask = np.array([True, False, True, True, False])
  norm = NormSpec(train=True, momentum=0.5)
  box_in = (rng.normal(size=(5, 7, 7, 16)).astype(np.float32),)
  mask_in = (
      rng.normal(size=(5, 8, 8, 16)).astype(np.float32),
      rng.uniform(size=(5, 8, 8, 6)).astype(np.float32),
  )
  for model, args in (
      (heads.BoxHead(num_classes=3, channels=8, norm=norm), box_in),
      (heads.MaskHead(num_layers=2, channels=8, norm=norm), mask_in),
  ):
    v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), *args))
    junk = []
    for a in args:  # unselected ROIs: large, other values
      a = a.copy()
      a[~mask] = 40 + 30 * rng.normal(size=a[~mask].shape)
      junk.append(a)
    got, got_stats = model.apply(v, *junk, mask=jnp.asarray(mask), mutable=['batch_stats'])
    want, want_stats = model.apply(v, *[a[mask] for a in args], mutable=['batch_stats'])
    assert not np.allclose(jax.tree.leaves(got_stats)[0], jax.tree.leaves(v['batch_stats'])[0])
    for g, w in zip(jax.tree.leaves(jax.tree.map(lambda a: a[mask], got)), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    for g, w in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('context', [False, True])
def test_mask_head_roi_context_reaches_across_the_roi(context):
  """Four 3x3 convs see 9 x 9 input cells; on a 16 x 16 ROI a change in one
  corner cannot reach the far corner's mask, unless ``roi_context`` pools
  the whole ROI into every pixel. Also: channel 0 kept with
  ``background_channel``."""
  head = heads.MaskHead(num_layers=2, channels=8, roi_context=context, background_channel=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 4))
  params = head.init(jax.random.PRNGKey(1), x)
  assert params['params']['conv3']['kernel'].shape[2] == (24 if context else 8)
  y = head.apply(params, x)
  assert y.shape == (1, 32, 32, 3)
  moved = head.apply(params, x.at[0, 0, 0].add(5.0))
  far = np.abs(np.asarray(moved - y))[0, -8:, -8:]
  if context:
    assert far.max() > 1e-4
  else:
    assert far.max() == 0
