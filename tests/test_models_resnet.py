"""ResNet backbone: shapes, TF-SAME padding rule, parity with a torch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sln_jax.models import resnet


@pytest.mark.parametrize(
    'size,kernel,stride,expected',
    [
        (32, 3, 2, (0, 1)),
        (33, 3, 2, (1, 1)),
        (16, 3, 1, (1, 1)),
        (7, 1, 2, (0, 0)),
        (8, 7, 2, (2, 3)),
    ],
)
def test_same_pads_matches_tf_rule(size, kernel, stride, expected):
  assert resnet.same_pads(size, kernel, stride) == expected


def _randomize(variables, seed=0):
  """Random params and plausible BN statistics (var > 0) for a shape tree.

  (Filling shapes from jax.eval_shape on the host is much faster on a CPU
  than compiling Flax's per-parameter initializers.)
  """
  leaves, tree = jax.tree.flatten(variables)
  rng = np.random.default_rng(seed)
  out = [
      jnp.asarray(
          rng.uniform(0.5, 1.5, l.shape) if l.ndim == 1 else rng.normal(0, 0.2, l.shape),
          jnp.float32,
      )
      for l in leaves
  ]
  return jax.tree.unflatten(tree, out)


def _torch_conv(x, p, stride=1, padding=0):
  w = torch.from_numpy(np.array(p['kernel'])).permute(3, 2, 0, 1)
  b = torch.from_numpy(np.array(p['bias']))
  return F.conv2d(x, w, b, stride=stride, padding=padding)


def _torch_bn(x, p, s, eps):
  t = lambda a: torch.from_numpy(np.array(a))
  return F.batch_norm(
      x, t(s['mean']), t(s['var']), t(p['scale']), t(p['bias']), training=False, eps=eps
  )


def _torch_same_pad(x, kernel, stride):
  """Independent TF-SAME padding (torch F.pad order: W then H)."""
  pads = []
  for size in (x.shape[3], x.shape[2]):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    pads += [total // 2, total - total // 2]
  return F.pad(x, pads)


def _torch_resnet(x, v, stage_sizes, eps=1e-3):
  """Matterport ResNet written with torch.nn.functional (NCHW)."""
  p, s = v['params'], v['batch_stats']
  y = F.relu(_torch_bn(_torch_conv(x, p['C1_conv'], 2, 3), p['C1_bn'], s['C1_bn'], eps))
  y = F.max_pool2d(_torch_same_pad(y, 3, 2), 3, 2)
  out = {'c1': y}
  for i, n in enumerate(stage_sizes):
    for b in range(n):
      name = f'C{i + 2}_{b}'
      bp, bs = p[name], s[name]
      stride = 2 if (b == 0 and i > 0) else 1
      h = F.relu(_torch_bn(_torch_conv(y, bp['conv1'], stride), bp['bn1'], bs['bn1'], eps))
      h = F.relu(
          _torch_bn(_torch_conv(_torch_same_pad(h, 3, 1), bp['conv2']), bp['bn2'], bs['bn2'], eps)
      )
      h = _torch_bn(_torch_conv(h, bp['conv3']), bp['bn3'], bs['bn3'], eps)
      if b == 0:
        y = _torch_bn(
            _torch_conv(y, bp['downsample_conv'], stride),
            bp['downsample_bn'],
            bs['downsample_bn'],
            eps,
        )
      y = F.relu(h + y)
    out[f'c{i + 2}'] = y
  return out


def test_resnet_shapes_and_variable_names():
  model = resnet.ResNet(stage_sizes=(1, 2, 1, 1), width=8)
  x = jnp.zeros((2, 64, 64, 3))
  v = _randomize(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  out = jax.jit(model.apply)(v, x)
  assert out['c1'].shape == (2, 16, 16, 8)
  assert out['c2'].shape == (2, 16, 16, 32)
  assert out['c3'].shape == (2, 8, 8, 64)
  assert out['c4'].shape == (2, 4, 4, 128)
  assert out['c5'].shape == (2, 2, 2, 256)
  p = v['params']
  assert set(p['C3_0']) == {
      'conv1',
      'conv2',
      'conv3',
      'bn1',
      'bn2',
      'bn3',
      'downsample_conv',
      'downsample_bn',
  }
  assert set(p['C3_1']) == {'conv1', 'conv2', 'conv3', 'bn1', 'bn2', 'bn3'}
  assert 'bias' in p['C1_conv'] and 'bias' in p['C3_1']['conv2']
  assert set(v['batch_stats']['C1_bn']) == {'mean', 'var'}
  # Stride sits on the first 1x1 conv of block 0.
  assert p['C3_0']['conv1']['kernel'].shape == (1, 1, 32, 16)


def test_resnet_matches_torch_reference():
  stages = (1, 2, 1, 1)
  model = resnet.ResNet(stage_sizes=stages, width=8)
  x = np.random.default_rng(1).normal(0, 50, (1, 64, 64, 3)).astype(np.float32)
  v = _randomize(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(x)))
  out = jax.jit(model.apply)(v, jnp.asarray(x))
  ref = _torch_resnet(torch.from_numpy(x).permute(0, 3, 1, 2), v, stages)
  for k in ('c1', 'c2', 'c3', 'c4', 'c5'):
    r = ref[k].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(
        np.asarray(out[k]), r, rtol=2e-4, atol=2e-4 * np.abs(r).max(), err_msg=k
    )


def test_stem_pool_padding_is_asymmetric_like_torch():
  # After ReLU, TF-SAME zero padding (0 before, 1 after) + VALID max pool.
  rng = np.random.default_rng(2)
  y = np.maximum(rng.normal(size=(1, 8, 8, 3)), 0).astype(np.float32)
  ours = jax.lax.reduce_window(
      resnet.same_pad(jnp.asarray(y), 3, 2),
      -jnp.inf,
      jax.lax.max,
      (1, 3, 3, 1),
      (1, 2, 2, 1),
      'VALID',
  )
  t = torch.from_numpy(y).permute(0, 3, 1, 2)
  ref = F.max_pool2d(F.pad(t, (0, 1, 0, 1)), 3, 2).permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(np.asarray(ours), ref)
  # Symmetric padding would differ on these inputs (the check can fail).
  sym = F.max_pool2d(t, 3, 2, padding=1).permute(0, 2, 3, 1).numpy()
  assert sym.shape == ref.shape and not np.array_equal(sym, ref)


def test_resnet_bfloat16_forward():
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=8, dtype=jnp.bfloat16)
  x = jnp.ones((1, 64, 64, 3))
  v = _randomize(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v))
  out = jax.jit(model.apply)(v, x)
  assert out['c5'].dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(out['c5'].astype(jnp.float32))))
