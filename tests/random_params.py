"""Deterministic random values for abstract parameter trees (model tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch


def random_params(shapes, seed: int = 0, std: float = 0.3, positive_vectors: bool = True):
  """Tree like ``shapes`` (ShapeDtypeStructs) of float32 arrays: N(0, std),
  except 1-D leaves (BN scales, biases, statistics) from U(0.5, 1.5) when
  ``positive_vectors`` (so BN variances stay positive)."""
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      tree,
      [
          jnp.asarray(
              rng.uniform(0.5, 1.5, l.shape)
              if positive_vectors and l.ndim == 1
              else rng.normal(0, std, l.shape),
              jnp.float32,
          )
          for l in leaves
      ],
  )


def to_torch(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, np.float32))
