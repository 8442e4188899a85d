"""models.norm.BatchNorm against flax.linen.BatchNorm and numpy: inference
mode, batch mode (outputs, gradients, running statistics), masks, empty
masks, statistics shared over a named axis, precision far from zero."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sln_jax.models.norm import BatchNorm, NormSpec

C, EPS, MOM = 6, 1e-3, 0.9


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'params': {
          'scale': jnp.asarray(rng.uniform(0.5, 2, C), jnp.float32),
          'bias': jnp.asarray(rng.normal(size=C), jnp.float32),
      },
      'batch_stats': {
          'mean': jnp.asarray(rng.normal(size=C), jnp.float32),
          'var': jnp.asarray(rng.uniform(0.5, 2, C), jnp.float32),
      },
  }


def _x(shape, seed=1, loc=3.0, scale=2.0):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def test_same_variables_as_flax_batchnorm():
  x = jnp.zeros((2, 3, 3, C))
  ours = BatchNorm().init(jax.random.PRNGKey(0), x)
  flax_bn = nn.BatchNorm(use_running_average=True).init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), flax_bn
  )
  # NormSpec builds the module it describes.
  bn = NormSpec(train=True, momentum=0.5, axis_name='d')(1e-5, jnp.bfloat16, 'bn')
  assert (bn.batch_mode, bn.momentum, bn.axis_name, bn.epsilon, bn.name) == (
      True,
      0.5,
      'd',
      1e-5,
      'bn',
  )


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize('batch_mode', [False, True])
def test_inference_mode_equals_flax(dtype, tol, batch_mode):
  """Frozen (the release), and batch mode outside a training step (the
  collection is not mutable: evaluation), both use the running statistics."""
  v, x = _variables(), _x((2, 4, 4, C)).astype(dtype)
  want = nn.BatchNorm(use_running_average=True, epsilon=EPS, dtype=dtype).apply(v, x)
  got = BatchNorm(epsilon=EPS, batch_mode=batch_mode, dtype=dtype).apply(v, x)
  assert got.dtype == dtype
  np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
  )


def test_frozen_module_leaves_statistics_alone_even_when_mutable():
  v, x = _variables(), _x((2, 4, 4, C))
  _, new = BatchNorm(epsilon=EPS).apply(v, x, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, new['batch_stats'], v['batch_stats'])


def test_batch_mode_equals_flax_outputs_gradients_and_running_stats():
  v, x = _variables(), _x((3, 5, 4, C))
  cot = _x(x.shape, seed=7, loc=0.0, scale=1.0)

  def run(module, params, x):
    y, new = module.apply(
        {'params': params, 'batch_stats': v['batch_stats']}, x, mutable=['batch_stats']
    )
    return jnp.sum(y * cot), (y, new['batch_stats'])

  ours = BatchNorm(epsilon=EPS, momentum=MOM, batch_mode=True)
  ref = nn.BatchNorm(use_running_average=False, epsilon=EPS, momentum=MOM)
  (g_p, g_x), (y, stats) = jax.grad(functools.partial(run, ours), (0, 1), has_aux=True)(
      v['params'], x
  )
  (r_p, r_x), (ry, rstats) = jax.grad(functools.partial(run, ref), (0, 1), has_aux=True)(
      v['params'], x
  )
  np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, r_x, rtol=1e-4, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), g_p, r_p)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), stats, rstats)
  # numpy: biased batch variance, running = MOM * old + (1 - MOM) * batch.
  xs = np.asarray(x).reshape(-1, C)
  np.testing.assert_allclose(
      stats['var'], MOM * v['batch_stats']['var'] + (1 - MOM) * xs.var(0), rtol=1e-5
  )


def _masked_reference(v, x, mask):
  """numpy: statistics of the selected rows, applied to every row."""
  xs, sel = np.asarray(x, np.float64).reshape(-1, C), np.asarray(mask).reshape(-1)
  mean, var = xs[sel].mean(0), xs[sel].var(0)
  p, s = v['params'], v['batch_stats']
  y = (xs - mean) / np.sqrt(var + EPS) * np.asarray(p['scale']) + np.asarray(p['bias'])
  return (
      y.reshape(x.shape),
      MOM * np.asarray(s['mean']) + (1 - MOM) * mean,
      MOM * np.asarray(s['var']) + (1 - MOM) * var,
  )


def test_masked_statistics_count_only_selected_rois():
  v, x = _variables(), _x((5, 3, 3, C))
  mask = np.array([True, False, True, True, False])
  bn = BatchNorm(epsilon=EPS, momentum=MOM, batch_mode=True)
  y, new = bn.apply(v, x, mask[:, None, None], mutable=['batch_stats'])
  want_y, want_mean, want_var = _masked_reference(
      v, x, np.broadcast_to(mask[:, None, None], (5, 3, 3))
  )
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new['batch_stats']['mean'], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['batch_stats']['var'], want_var, rtol=1e-5, atol=1e-6)
  # Changing an unselected ROI changes nothing for the selected ones.
  x2 = x.at[1].set(1e3)
  y2, _ = bn.apply(v, x2, mask[:, None, None], mutable=['batch_stats'])
  np.testing.assert_allclose(y2[mask], y[mask], rtol=1e-6)


def test_empty_mask_keeps_running_statistics_and_uses_them():
  v, x = _variables(), _x((4, 3, 3, C))
  y, new = BatchNorm(epsilon=EPS, momentum=MOM, batch_mode=True).apply(
      v, x, np.zeros((4, 1, 1), bool), mutable=['batch_stats']
  )
  jax.tree.map(np.testing.assert_array_equal, new['batch_stats'], v['batch_stats'])
  want = nn.BatchNorm(use_running_average=True, epsilon=EPS).apply(v, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(y)).all()


def test_statistics_over_a_named_axis_equal_one_global_batch():
  """Three 'devices' (vmap with an axis name, as pmap's psum) holding 4, 0
  and 2 selected ROIs normalize exactly as one device holding all of them;
  gradients included."""
  v = _variables()
  x = _x((3, 4, 2, 2, C))  # (devices, ROIs, P, P, C)
  mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], bool)
  cot = _x(x.shape, seed=9, loc=0.0, scale=1.0)

  def loss(x, mask, cot, axis_name):
    y, new = BatchNorm(epsilon=EPS, momentum=MOM, batch_mode=True, axis_name=axis_name).apply(
        v, x, mask[:, None, None], mutable=['batch_stats']
    )
    return jnp.sum(y * cot), (y, new['batch_stats'])

  sharded = jax.vmap(jax.grad(functools.partial(loss, axis_name='d'), has_aux=True), axis_name='d')
  gx, (y, stats) = sharded(x, mask, cot)
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  gx1, (y1, stats1) = jax.grad(functools.partial(loss, axis_name=None), has_aux=True)(
      flat(x), flat(mask), flat(cot)
  )
  np.testing.assert_allclose(flat(y), y1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(flat(gx), gx1, rtol=1e-4, atol=1e-5)
  for k in ('mean', 'var'):
    for d in range(3):  # every device holds the same statistics
      np.testing.assert_allclose(stats[k][d], stats1[k], rtol=1e-5, atol=1e-6)


def test_variance_precise_far_from_zero():
  """Activations with |mean| >> std: the shifted sums keep the variance
  (E[x^2] - E[x]^2 in float32 would lose it entirely at 1e4)."""
  v = _variables()
  v['batch_stats']['mean'] = jnp.full((C,), 1e4 + 0.3, jnp.float32)
  x = _x((8, 8, 8, C), loc=1e4, scale=1.0)
  _, new = BatchNorm(epsilon=EPS, momentum=0.0, batch_mode=True).apply(
      v, x, mutable=['batch_stats']
  )
  want = np.asarray(x, np.float64).reshape(-1, C).var(0)
  np.testing.assert_allclose(new['batch_stats']['var'], want, rtol=1e-3)
