"""Global Layering Module: DeepLab v2 (dilated ResNet + ASPP), multi-scale, frozen.

kazuto1011/deeplab-pytorch form as used by the release: convs without bias,
BatchNorm eps 1e-5 (frozen), stem conv 7x7/2 pad 3 + BN + ReLU + max pool
3x3/2 pad 1 ceil mode; layers 2..5 with strides (1, 2, 1, 1) and dilations
(1, 1, 2, 4) (output stride 8): the stride sits on the 'reduce' 1x1 conv, the
3x3 conv pads by its dilation, block 1 has a conv + BN shortcut; ASPP = sum of
3x3 convs (bias) with dilations ``atrous_rates`` into ``num_classes``.

Multi-scale (MSC): logits of the input plus logits of the input resized
bilinearly (align_corners=False; size int(side * scale)) to every scale
!= 1.0, upsampled bilinearly to the full-scale logits' size, max-fused.
For a 513 input the logits are 65 x 65.

Module paths: ``layer1_conv``, ``layer1_bn``,
``layer{2..5}_block{k}/{reduce,conv3x3,increase,shortcut}_{conv,bn}`` (k from
1), ``aspp_c{0..3}``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from sln_jax.models.materialize import materialize
from sln_jax.models.norm import NormSpec
from sln_jax.models.resnet import conv

Dtype = Any

frozen_bn = NormSpec()  # the GLM is never trained: inference-mode BN always


def ceil_pool_out(size: int, kernel: int = 3, stride: int = 2, pad: int = 1) -> int:
  """Output size of PyTorch MaxPool2d(kernel, stride, pad, ceil_mode=True)."""
  out = math.ceil((size + 2 * pad - kernel) / stride) + 1
  if (out - 1) * stride >= size + pad:  # last window would start in the padding
    out -= 1
  return out


def max_pool_ceil(x: jax.Array, kernel: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """PyTorch ceil-mode max pool on NHWC ``x`` (padding never wins: -inf)."""
  pads = [(0, 0)]
  for size in x.shape[1:3]:
    out = ceil_pool_out(size, kernel, stride, pad)
    pads.append((pad, (out - 1) * stride + kernel - size - pad))
  x = jnp.pad(x, pads + [(0, 0)], constant_values=-jnp.inf)
  return nn.max_pool(x, (kernel, kernel), strides=(stride, stride), padding='VALID')


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """NHWC bilinear resize == torch F.interpolate(align_corners=False, size=...)."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), 'bilinear', antialias=False)


class DeepLabBottleneck(nn.Module):
  """reduce 1x1/s -> conv3x3 (dilated) -> increase 1x1, + shortcut, ReLU."""

  out_channels: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  bn_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mid = self.out_channels // 4
    d = self.dilation

    def cbr(y, name, features, kernel, stride=1, dil=1, pad=0, relu=True):
      y = conv(
          features,
          kernel,
          stride,
          padding=((pad, pad), (pad, pad)),
          dtype=self.dtype,
          name=f'{name}_conv',
          use_bias=False,
          dilation=dil,
      )(y)
      y = frozen_bn(self.bn_eps, self.dtype, f'{name}_bn')(y)
      return nn.relu(y) if relu else y

    h = cbr(x, 'reduce', mid, 1, self.stride)
    h = cbr(h, 'conv3x3', mid, 3, 1, d, d)
    h = cbr(h, 'increase', self.out_channels, 1, relu=False)
    if self.downsample:
      x = cbr(x, 'shortcut', self.out_channels, 1, self.stride, relu=False)
    return materialize(nn.relu(h + x))  # stored once on XLA:CPU (materialize.py)


class DeepLabV2(nn.Module):
  """Frozen multi-scale DeepLab v2. Input (B, G, G, 3) mean-subtracted RGB.

  Returns {'logits': (B, h, w, num_classes) max-fused float32,
           'features': (B, h, w, num_classes + 1) = [softmax, argmax / 255]},
  both under stop_gradient (the GLM is never trained; no gradient reaches it).
  """

  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  width: int = 64
  num_classes: int = 182
  atrous_rates: Sequence[int] = (6, 12, 18, 24)
  scales: Sequence[float] = (1.0, 0.5, 0.75)
  strides: Sequence[int] = (1, 2, 1, 1)
  dilations: Sequence[int] = (1, 1, 2, 4)
  bn_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = lax.stop_gradient(x.astype(self.dtype))
    stem_conv = conv(
        self.width,
        7,
        2,
        padding=((3, 3), (3, 3)),
        dtype=self.dtype,
        name='layer1_conv',
        use_bias=False,
    )
    stem_bn = frozen_bn(self.bn_eps, self.dtype, 'layer1_bn')
    layers = []
    for i, blocks in enumerate(self.stage_sizes):
      out_ch = self.width * 4 * 2**i
      layers.append(
          [
              DeepLabBottleneck(
                  out_ch,
                  stride=(self.strides[i] if k == 0 else 1),
                  dilation=self.dilations[i],
                  downsample=(k == 0),
                  bn_eps=self.bn_eps,
                  dtype=self.dtype,
                  name=f'layer{i + 2}_block{k + 1}',
              )
              for k in range(blocks)
          ]
      )
    aspp = [
        conv(
            self.num_classes,
            3,
            padding=((r, r), (r, r)),
            dtype=self.dtype,
            name=f'aspp_c{j}',
            dilation=r,
        )
        for j, r in enumerate(self.atrous_rates)
    ]

    def base(y):
      y = max_pool_ceil(nn.relu(stem_bn(stem_conv(y))))
      for blocks in layers:
        for block in blocks:
          y = block(y)
      return sum(c(y) for c in aspp).astype(jnp.float32)

    logits = base(x)
    h, w = logits.shape[1:3]
    for s in self.scales:
      if s == 1.0:
        continue
      xs = resize_bilinear(x, int(x.shape[1] * s), int(x.shape[2] * s))
      logits = jnp.maximum(logits, resize_bilinear(base(xs), h, w))
    logits = lax.stop_gradient(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    label = jnp.argmax(logits, axis=-1).astype(jnp.float32)[..., None] / 255.0
    return {'logits': logits, 'features': jnp.concatenate([probs, label], axis=-1)}
