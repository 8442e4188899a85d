"""``materialize``: an exact identity that keeps XLA:CPU from recomputing a value.

XLA:CPU's fusion pass duplicates cheap elementwise producers into every
consumer that can fuse them. A residual stage is such a chain: block k's
output ``relu(bn3(conv3(.)) + x_{k-1})`` is cheap elementwise work over
block k-1's output, so every consumer that is a loop fusion (the next
block's residual add, the ReLU masks and the layout copies of the backward
pass) recomputes all earlier blocks' residual sums instead of reading the
stored output: O(k) work at block k, O(n^2) over a stage. It weighs most
in the 23-block C4 stages (the backbone's, and the GLM's at three scales)
and more in the training step than in inference (``docs/benchmarks.md``).

``jax.lax.optimization_barrier`` does not stop it: XLA:CPU removes barriers
before fusing. A float division is one of the ops XLA will not duplicate,
so ``materialize(x) = x / ones``, ones of x's shape behind a barrier (so
the division is neither simplified away nor turned into a product), forces
one stored copy that every consumer reads; the ones are a broadcast fused
into the division, never stored. ``x / 1`` is ``x`` bit for bit (NaN,
infinities and signed zeros included), in the forward and, as its own
transpose, in the backward pass. Other backends get ``x`` unchanged:
XLA:GPU's priority fusion fuses a producer into all of its consumers or
none, and a block's output always feeds a convolution, so it is stored
anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialize(x: jax.Array) -> jax.Array:
  """``x``, stored once on XLA:CPU instead of recomputed by its consumers
  (any shape and float dtype; a no-op on other backends)."""
  if jax.default_backend() != 'cpu':
    return x
  # Full-shaped: XLA rewrites x / broadcast(scalar) as x * (1 / scalar).
  ones = jax.lax.optimization_barrier(jnp.ones(x.shape, x.dtype))
  return x / ones
