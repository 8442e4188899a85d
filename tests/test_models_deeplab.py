"""GLM (DeepLab v2): ceil-mode pool, bilinear resize, parity with torch, frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sln_jax.models import deeplab
from tests.random_params import random_params
from tests.random_params import to_torch as _t


def _fill(shapes, seed=0):
  return random_params(shapes, seed, std=0.3)


@pytest.mark.parametrize('size', [257, 128, 192, 9, 10])
def test_ceil_mode_pool_matches_torch(size):
  x = np.random.default_rng(size).normal(size=(1, size, size + 1, 2)).astype(np.float32)
  ours = deeplab.max_pool_ceil(jnp.asarray(x))
  ref = F.max_pool2d(_t(x).permute(0, 3, 1, 2), 3, 2, 1, ceil_mode=True)
  np.testing.assert_array_equal(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy())
  assert deeplab.ceil_pool_out(size) == ref.shape[2]


@pytest.mark.parametrize(
    'src,dst',
    [
        ((513, 513), (256, 256)),
        ((513, 513), (384, 384)),
        ((33, 33), (65, 65)),
        ((49, 49), (65, 65)),
        ((20, 30), (7, 45)),
    ],
)
def test_bilinear_resize_matches_torch_align_corners_false(src, dst):
  x = np.random.default_rng(0).normal(size=(1,) + src + (3,)).astype(np.float32)
  ours = deeplab.resize_bilinear(jnp.asarray(x), *dst)
  ref = (
      F.interpolate(_t(x).permute(0, 3, 1, 2), size=dst, mode='bilinear', align_corners=False)
      .permute(0, 2, 3, 1)
      .numpy()
  )
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_output_size_513_is_65_and_variable_names():
  model = deeplab.DeepLabV2(stage_sizes=(1, 2, 1, 1), width=4, num_classes=7)
  x = jax.ShapeDtypeStruct((1, 513, 513, 3), jnp.float32)
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(model.apply, v, x)
  assert out['logits'].shape == (1, 65, 65, 7)
  assert out['features'].shape == (1, 65, 65, 8)
  p = v['params']
  assert set(p['layer3_block1']) == {
      f'{n}_{k}' for n in ('reduce', 'conv3x3', 'increase', 'shortcut') for k in ('conv', 'bn')
  }
  assert set(p['layer3_block2']) == {
      f'{n}_{k}' for n in ('reduce', 'conv3x3', 'increase') for k in ('conv', 'bn')
  }
  assert 'bias' not in p['layer1_conv'] and 'bias' in p['aspp_c3']
  assert p['aspp_c0']['kernel'].shape == (3, 3, 128, 7)


def _torch_deeplab(x, v, stage_sizes, rates, strides=(1, 2, 1, 1), dil=(1, 1, 2, 4)):
  p, s = v['params'], v['batch_stats']
  conv = lambda y, q, st=1, pad=0, d=1: F.conv2d(
      y,
      _t(q['kernel']).permute(3, 2, 0, 1),
      _t(q['bias']) if 'bias' in q else None,
      stride=st,
      padding=pad,
      dilation=d,
  )
  bn = lambda y, q, r: F.batch_norm(
      y, _t(r['mean']), _t(r['var']), _t(q['scale']), _t(q['bias']), training=False, eps=1e-5
  )
  y = F.relu(bn(conv(x, p['layer1_conv'], 2, 3), p['layer1_bn'], s['layer1_bn']))
  y = F.max_pool2d(y, 3, 2, 1, ceil_mode=True)
  for i, n in enumerate(stage_sizes):
    for k in range(1, n + 1):
      bp, bs = p[f'layer{i + 2}_block{k}'], s[f'layer{i + 2}_block{k}']
      st = strides[i] if k == 1 else 1
      h = F.relu(bn(conv(y, bp['reduce_conv'], st), bp['reduce_bn'], bs['reduce_bn']))
      h = F.relu(
          bn(conv(h, bp['conv3x3_conv'], 1, dil[i], dil[i]), bp['conv3x3_bn'], bs['conv3x3_bn'])
      )
      h = bn(conv(h, bp['increase_conv']), bp['increase_bn'], bs['increase_bn'])
      if k == 1:
        y = bn(conv(y, bp['shortcut_conv'], st), bp['shortcut_bn'], bs['shortcut_bn'])
      y = F.relu(h + y)
  return sum(conv(y, p[f'aspp_c{j}'], 1, r, r) for j, r in enumerate(rates))


def test_multiscale_glm_matches_torch_reference():
  stages, rates = (1, 2, 1, 1), (1, 2, 3, 4)
  model = deeplab.DeepLabV2(
      stage_sizes=stages, width=4, num_classes=5, atrous_rates=rates, scales=(1.0, 0.5, 0.75)
  )
  x = np.random.default_rng(3).normal(0, 40, (1, 65, 65, 3)).astype(np.float32)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  out = jax.jit(model.apply)(v, x)
  xt = _t(x).permute(0, 3, 1, 2)
  logits = _torch_deeplab(xt, v, stages, rates)
  size = logits.shape[2:]
  for sc in (0.5, 0.75):
    xs = F.interpolate(xt, size=(int(65 * sc), int(65 * sc)), mode='bilinear', align_corners=False)
    up = F.interpolate(
        _torch_deeplab(xs, v, stages, rates), size=size, mode='bilinear', align_corners=False
    )
    logits = torch.maximum(logits, up)
  ref = logits.permute(0, 2, 3, 1).numpy()
  assert out['logits'].shape == ref.shape == (1, 9, 9, 5)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(np.asarray(out['logits']) / scale, ref / scale, atol=1e-4)
  probs = torch.softmax(logits, 1).permute(0, 2, 3, 1).numpy()
  feats = np.asarray(out['features'])
  np.testing.assert_allclose(feats[..., :5], probs, atol=1e-4)
  np.testing.assert_allclose(feats[..., 5], ref.argmax(-1) / 255.0, atol=1e-7)


def test_glm_is_frozen_and_bf16_runs():
  model = deeplab.DeepLabV2(
      stage_sizes=(1, 1, 1, 1), width=4, num_classes=5, atrous_rates=(1, 2, 3, 4), scales=(1.0, 0.5)
  )
  x = jnp.asarray(np.random.default_rng(4).normal(0, 40, (1, 33, 33, 3)), jnp.float32)
  v = _fill(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  loss = lambda p, x: jnp.sum(
      model.apply({'params': p, 'batch_stats': v['batch_stats']}, x)['logits'] ** 2
  )
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(v['params'], x)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gp))
  assert float(jnp.abs(gx).max()) == 0.0
  bf = deeplab.DeepLabV2(
      stage_sizes=(1, 1, 1, 1),
      width=4,
      num_classes=5,
      atrous_rates=(1, 2, 3, 4),
      scales=(1.0, 0.5),
      dtype=jnp.bfloat16,
  )
  out = jax.jit(bf.apply)(v, x)
  assert out['logits'].dtype == jnp.float32 and out['logits'].shape == (1, 5, 5, 5)
  assert bool(jnp.all(jnp.isfinite(out['features'])))
