"""ResNet backbone in the release's Matterport form (NHWC).

Differences from torchvision/FAIR ResNets, all as in the release:
  * every conv has a bias; BatchNorm is frozen (running statistics in the
    'batch_stats' collection, inference mode), epsilon 1e-3, unless
    ``model.train_bn`` (``norm.NormSpec``);
  * stem: conv 7x7/2 padding 3 -> BN -> ReLU -> TF-"SAME" zero padding ->
    max pool 3x3/2 VALID (``same_pad``: on even sizes 0 before, 1 after);
  * bottleneck: the stride sits on the first 1x1 conv, the 3x3 conv is
    TF-SAME padded (1 each side), expansion 4; block 0 of every stage has a
    conv 1x1 + BN shortcut.

Module paths (the checkpoint port relies on them): ``C1_conv``, ``C1_bn``,
``C{2..5}_{b}/conv{1,2,3}``, ``bn{1,2,3}``, ``downsample_conv``,
``downsample_bn``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sln_jax.models.cpu_conv import conv_general_dilated
from sln_jax.models.materialize import materialize
from sln_jax.models.norm import NormSpec

Dtype = Any


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' (before, after) padding of one axis, as the release's SamePad2d.

  out = ceil(size / stride); total = max((out - 1) * stride + kernel - size, 0);
  before = total // 2, after = total - before. For kernel 3 stride 2 this is
  (0, 1) on even sizes and (1, 1) on odd sizes; kernel 3 stride 1 gives (1, 1).
  (The release computes the H amount from W and vice versa; identical on the
  square canvases used here.)
  """
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def same_pad(x: jax.Array, kernel: int, stride: int) -> jax.Array:
  """Zero-pads the H and W axes of NHWC ``x`` TF-SAME style (static shapes)."""
  ph = same_pads(x.shape[1], kernel, stride)
  pw = same_pads(x.shape[2], kernel, stride)
  return jnp.pad(x, ((0, 0), ph, pw, (0, 0)))


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: Any = 'VALID',
    dtype: Dtype = jnp.float32,
    name: str | None = None,
    use_bias: bool = True,
    dilation: int = 1,
) -> nn.Conv:
  """nn.Conv with square kernel/stride, float32 params and compute ``dtype``
  (kernel gradients as matrix products on XLA:CPU: ``cpu_conv``)."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=padding,
      kernel_dilation=(dilation, dilation),
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      conv_general_dilated=conv_general_dilated,
      name=name,
  )


class Bottleneck(nn.Module):
  """Matterport bottleneck: 1x1/s -> 3x3 (SAME) -> 1x1 (x4), shortcut add, ReLU."""

  planes: int
  stride: int = 1
  downsample: bool = False
  bn_eps: float = 1e-3
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bn = lambda name: self.norm(self.bn_eps, self.dtype, name)
    y = conv(self.planes, 1, self.stride, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(bn('bn1')(y))
    y = same_pad(y, 3, 1)
    y = conv(self.planes, 3, dtype=self.dtype, name='conv2')(y)
    y = nn.relu(bn('bn2')(y))
    y = conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(y)
    y = bn('bn3')(y)
    if self.downsample:
      x = conv(self.planes * 4, 1, self.stride, dtype=self.dtype, name='downsample_conv')(x)
      x = bn('downsample_bn')(x)
    return materialize(nn.relu(y + x))  # stored once on XLA:CPU (materialize.py)


class ResNet(nn.Module):
  """Matterport ResNet. Input (B, H, W, 3) mean-subtracted, H and W multiples of 32.

  Returns {'c1': (B, H/4, W/4, width) after the max pool,
           'c{k}': (B, H/2^k, W/2^k, width * 2^(k-2) * 4) for k = 2..5}.
  """

  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  width: int = 64
  bn_eps: float = 1e-3
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = x.astype(self.dtype)
    x = conv(self.width, 7, 2, padding=((3, 3), (3, 3)), dtype=self.dtype, name='C1_conv')(x)
    x = nn.relu(self.norm(self.bn_eps, self.dtype, 'C1_bn')(x))
    # Zero padding is harmless before the max pool: inputs are >= 0 after ReLU
    # and every window holds at least one real value.
    x = same_pad(x, 3, 2)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    out = {'c1': x}
    for i, blocks in enumerate(self.stage_sizes):
      stage = i + 2
      for b in range(blocks):
        x = Bottleneck(
            planes=self.width * 2**i,
            stride=(2 if (b == 0 and stage > 2) else 1),
            downsample=(b == 0),
            bn_eps=self.bn_eps,
            norm=self.norm,
            dtype=self.dtype,
            name=f'C{stage}_{b}',
        )(x)
      out[f'c{stage}'] = x
    return out
