"""materialize: an exact identity that keeps XLA:CPU from recomputing residual chains."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sln_jax.models import deeplab, resnet
from sln_jax.models.materialize import materialize


def _max_fusion_operands(compiled_text: str) -> int:
  return max(
      m.group(1).count('%') for m in re.finditer(r'= \S+ fusion\((.*?)\), kind', compiled_text)
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_values_and_gradient_are_bit_identical(dtype):
  special = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -1e-40, 3.5, -7.25e30]
  x = jnp.asarray(
      np.concatenate([special, np.random.default_rng(0).normal(size=55)]), dtype
  ).reshape(8, 8)
  y = jax.jit(materialize)(x)
  assert y.dtype == x.dtype
  np.testing.assert_array_equal(
      np.asarray(y).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
      np.asarray(x).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
  )
  w = jnp.asarray(np.random.default_rng(1).normal(size=(8, 8)), dtype)
  finite = jnp.where(jnp.isfinite(x), x, 0)
  g = jax.jit(jax.grad(lambda v: jnp.sum(materialize(v) * w).astype(jnp.float32)))(finite)
  np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _resnet_grad(blocks: int, identity: bool, monkeypatch):
  if identity:
    monkeypatch.setattr(resnet, 'materialize', lambda x: x)
  model = resnet.ResNet(stage_sizes=(1, 1, blocks, 1), width=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  v = model.init(jax.random.PRNGKey(0), x)

  def loss(params, stats, image):
    out = model.apply({'params': params, 'batch_stats': stats}, image)
    return sum(jnp.sum(out[k] ** 2) for k in ('c2', 'c3', 'c4', 'c5')), out

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  text = step.lower(v['params'], v['batch_stats'], x).compile().as_text()
  monkeypatch.undo()
  return step(v['params'], v['batch_stats'], x), _max_fusion_operands(text)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU workaround')
def test_residual_stage_fusions_do_not_grow_with_depth(monkeypatch):
  """Without materialize, XLA:CPU fuses every earlier block's residual sum
  into each consumer (fusions with O(blocks) operands, O(blocks^2) work);
  with it the largest fusion of a training step does not depend on the
  stage depth, and every output and gradient is bit-identical."""
  out6, n6 = _resnet_grad(6, False, monkeypatch)
  out12, n12 = _resnet_grad(12, False, monkeypatch)
  assert n12 == n6, (n6, n12)
  ref12, _ = _resnet_grad(12, True, monkeypatch)
  for a, b in zip(jax.tree.leaves(out12), jax.tree.leaves(ref12)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU workaround')
def test_glm_residual_stage_is_materialized_in_inference():
  """The GLM runs forward only (frozen); its bottlenecks materialize too."""

  def largest(blocks):
    model = deeplab.DeepLabV2(
        stage_sizes=(1, 1, blocks, 1), width=8, num_classes=3, atrous_rates=(6, 12), scales=(1.0,)
    )
    x = jnp.zeros((1, 65, 65, 3))
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    text = jax.jit(model.apply).lower(v, x).compile().as_text()
    return _max_fusion_operands(text)

  assert largest(12) == largest(4)


def test_other_backends_get_the_value_unchanged(monkeypatch):
  """XLA:GPU/TPU store a block's output anyway (it feeds a convolution): no
  division is traced there."""
  x = jnp.arange(6.0).reshape(2, 3)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert materialize(x) is x
  assert 'div' not in str(jax.make_jaxpr(lambda v: materialize(v))(x))
  monkeypatch.undo()
  assert 'div' in str(jax.make_jaxpr(lambda v: materialize(v))(x))  # fresh trace
