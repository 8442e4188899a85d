"""Feature pyramid (release form, NHWC).

P5..P2: lateral 1x1 conv on C5..C2; top-down the *lateral* sums are
upsampled x2 (nearest) and added; then a 3x3 SAME output conv per level.
P6 = P5 subsampled by 2 (max pool kernel 1 stride 2 == P5[:, ::2, ::2]).
Module paths: ``P{2..5}_lateral`` [fpn.P{s}_conv1], ``P{2..5}_output``
[fpn.P{s}_conv2.1].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sln_jax.models.resnet import conv

Dtype = Any


def upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of NHWC ``x`` (F.upsample scale 2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
  """Input {'c2'..'c5'} -> {'p2'..'p6'}, each (B, H/2^k, W/2^k, channels)."""

  channels: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    top = None
    laterals = {}
    for s in (5, 4, 3, 2):
      lat = conv(self.channels, 1, dtype=self.dtype, name=f'P{s}_lateral')(feats[f'c{s}'])
      top = lat if top is None else lat + upsample2x(top)
      laterals[s] = top
    out = {}
    for s in (2, 3, 4, 5):
      out[f'p{s}'] = conv(
          self.channels, 3, padding=((1, 1), (1, 1)), dtype=self.dtype, name=f'P{s}_output'
      )(laterals[s])
    out['p6'] = out['p5'][:, ::2, ::2]
    return out
