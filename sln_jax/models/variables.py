"""Variables of an SLN (``sln_jax.models.sln.SLN``): their shapes without
computation, the release's initialisation, and their count."""

from __future__ import annotations

import functools
import math
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np


def variable_shapes(model: Any, image_size: int):
  """ShapeDtypeStruct tree of {'params', 'batch_stats'} (no computation)."""
  g = int(model.config.glm.image_size)
  return jax.eval_shape(
      functools.partial(model.init, method='infer'),
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8),
      jax.ShapeDtypeStruct((1, g, g, 3), jnp.uint8),
      jax.ShapeDtypeStruct((1, 2), jnp.float32),
  )


def _leaf_init(path: tuple[str, ...], shape: tuple[int, ...]):
  """(kind, scale) of one variable, the release's initialize_weights rule."""
  name, parent = path[-1], (path[-2] if len(path) > 1 else '')
  if path[0] == 'batch_stats':
    return ('const', 1.0 if name == 'var' else 0.0)
  if name == 'kernel':
    if parent.startswith('linear_'):
      return ('normal', 0.01)
    receptive = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    return ('uniform', math.sqrt(6.0 / (fan_in + fan_out)))  # xavier uniform
  return ('const', 1.0 if name == 'scale' else 0.0)


def init_variables(model: Any, rng: jax.Array, image_size: int):
  """Initial {'params', 'batch_stats'} for an S = ``image_size`` canvas.

  As the release's ``initialize_weights``: conv kernels xavier-uniform,
  linear kernels N(0, 0.01), biases 0, BN scale 1 / bias 0, running mean 0 /
  var 1. The random numbers come from two draws of ``rng`` (one small jitted
  function), sliced on the host: compiling Flax's per-parameter
  initializers (``model.init``) is far slower on a CPU.
  """
  flat = traverse_util.flatten_dict(dict(variable_shapes(model, image_size)))
  specs = {k: _leaf_init(k, v.shape) for k, v in flat.items()}
  sizes = {
      kind: sum(math.prod(flat[k].shape) for k, s in specs.items() if s[0] == kind)
      for kind in ('uniform', 'normal')
  }

  @jax.jit
  def draw(key):
    ku, kn = jax.random.split(key)
    return (
        jax.random.uniform(ku, (sizes['uniform'],), jnp.float32, -1.0, 1.0),
        jax.random.normal(kn, (sizes['normal'],), jnp.float32),
    )

  uni, norm = jax.device_get(draw(rng))
  pools, offsets = {'uniform': uni, 'normal': norm}, {'uniform': 0, 'normal': 0}
  out = {}
  for k, (kind, scale) in specs.items():
    shape = flat[k].shape
    if kind == 'const':
      out[k] = np.full(shape, scale, np.float32)
      continue
    n = math.prod(shape)
    chunk = pools[kind][offsets[kind] : offsets[kind] + n]
    offsets[kind] += n
    out[k] = (chunk * np.float32(scale)).reshape(shape)
  # device_put copies; jnp.asarray / jnp.full would compile a program per shape.
  return traverse_util.unflatten_dict(jax.device_put(out))


def count_parameters(variables) -> int:
  """Number of scalars in ``variables`` (params + batch_stats: BN running
  statistics included, as in a PyTorch state_dict without
  num_batches_tracked). Works on arrays and ShapeDtypeStructs."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(variables)))
