"""The model's BatchNorm: frozen by default, batch mode on request (not the GLM).

``BatchNorm`` owns exactly the variables of ``flax.linen.BatchNorm`` (params
``scale``, ``bias``; batch_stats ``mean``, ``var``; each (C,) float32), so
checkpoints and the PyTorch port do not see which one runs.

* Inference mode (the release; always at inference, and in training unless
  ``model.train_bn``): ``y = (x - mean) * scale / sqrt(var + eps) + bias``
  with the running statistics.
* Batch mode (``batch_mode=True``, from ``model.train_bn``: Matterport's
  TRAIN_BN, for training from scratch or with large batches; it applies
  only while the 'batch_stats' collection is mutable, i.e. in the training
  step, never at inference or initialisation): the
  statistics are the biased mean and variance of the elements selected by
  ``mask`` (all when None) over every axis but the last, summed over the
  devices of ``axis_name`` as counts and sums, so every device normalizes
  with the statistics of the global batch whatever the split. The running
  statistics move by ``momentum`` (new = momentum * old + (1 - momentum) *
  batch), and stay where they are when no element is selected (e.g. a mask
  head with no positive ROI on any device), in which case the running
  statistics normalize.

Statistics are reduced in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class BatchNorm(nn.Module):
  """(..., C) -> (..., C) in ``dtype``; see the module docstring."""

  epsilon: float = 1e-3
  momentum: float = 0.99
  axis_name: Optional[str] = None
  batch_mode: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """``mask``: bool, broadcastable to ``x.shape[:-1]``: elements that count
    in the batch statistics (ignored in inference mode)."""
    c = x.shape[-1]
    f32 = jnp.float32
    scale = self.param('scale', nn.initializers.ones, (c,), f32)
    bias = self.param('bias', nn.initializers.zeros, (c,), f32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), f32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), f32))
    mean, var = ra_mean.value, ra_var.value
    if self.batch_mode and self.is_mutable_collection('batch_stats') and not self.is_initializing():
      mean, var = self._batch_stats(x, mask, ra_mean, ra_var)
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x.astype(f32) * mul + (bias - mean * mul)).astype(self.dtype)

  def _batch_stats(self, x, mask, ra_mean, ra_var):
    f32 = jnp.float32
    axes = tuple(range(x.ndim - 1))
    w = jnp.ones(x.shape[:-1], bool) if mask is None else mask
    w = jnp.broadcast_to(jnp.asarray(w, bool), x.shape[:-1])[..., None].astype(f32)
    # Shifted sums (shift = the running mean, a constant): the variance
    # E[(x-s)^2] - E[x-s]^2 keeps its precision when |mean| >> std.
    shift = jax.lax.stop_gradient(ra_mean.value)
    d = x.astype(f32) - shift
    n = jnp.sum(w)
    s1 = jnp.sum(d * w, axis=axes)
    s2 = jnp.sum(jnp.square(d) * w, axis=axes)
    if self.axis_name is not None:
      n, s1, s2 = jax.lax.psum((n, s1, s2), self.axis_name)
    safe = jnp.maximum(n, 1.0)
    b_mean = s1 / safe
    b_var = jnp.maximum(s2 / safe - jnp.square(b_mean), 0.0)
    b_mean = b_mean + shift
    has = n > 0
    m = self.momentum
    old_mean, old_var = ra_mean.value, ra_var.value
    ra_mean.value = jnp.where(has, m * old_mean + (1 - m) * b_mean, old_mean)
    ra_var.value = jnp.where(has, m * old_var + (1 - m) * b_var, old_var)
    return jnp.where(has, b_mean, old_mean), jnp.where(has, b_var, old_var)


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """How a module's BatchNorms run (a hashable Flax attribute).

  train: batch mode in the training step (``model.train_bn``).
  momentum: running-statistics momentum (``model.bn_momentum``).
  axis_name: the data-parallel axis whose devices share batch statistics
    (set by the training step; None outside a mapped computation).
  """

  train: bool = False
  momentum: float = 0.99
  axis_name: Optional[str] = None

  def __call__(self, eps: float, dtype: Dtype, name: str) -> BatchNorm:
    return BatchNorm(
        epsilon=eps,
        momentum=self.momentum,
        axis_name=self.axis_name,
        batch_mode=self.train,
        dtype=dtype,
        name=name,
    )
