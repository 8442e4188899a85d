"""PyTorch reference of the released SLN network (tests and conversion only).

Reproduces the layer layout and the exact ``state_dict`` key names of the
release (apchenstu/SLN-Amodal: a Matterport-style Mask R-CNN whose mask head
also reads a DeepLab v2 "GLM", the release's model.py and deeplabv2.py), written
from the published facts, with width/depth knobs so tests can build tiny
versions. Tensors are NCHW. Everything runs in inference mode.

Keys (release): ``fpn.C1.{0,1}``, ``fpn.C{2..5}.{b}.{conv,bn}{1,2,3}``,
``fpn.C{s}.0.downsample.{0,1}``, ``fpn.P{2..5}_conv1``, ``fpn.P{2..5}_conv2.1``,
``rpn.conv_{shared,class,bbox}``, ``classifier.{conv1,bn1,conv2,bn2,
linear_class,linear_bbox}``, ``mask.{conv1..4,bn1..4,deconv,conv5}``,
``GLM_modual.base.layer1.conv1.{conv,bn}``,
``GLM_modual.base.layer{2..5}.block{k}.{reduce,conv3x3,increase,shortcut}``
``.{conv,bn}``,
``GLM_modual.base.aspp.c{0..3}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class RefSpec:
  """Architecture knobs; defaults are the release's full-size network."""

  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  width: int = 64
  bn_eps: float = 1e-3
  fpn_channels: int = 256
  rpn_channels: int = 512
  num_anchors: int = 3  # anchors per location (ratios)
  anchor_stride: int = 1
  pool_size: int = 7
  box_channels: int = 1024
  num_classes: int = 2
  mask_channels: int = 256
  num_layers: int = 1  # L; mask conv5 has 1 + L outputs
  glm_stage_sizes: Sequence[int] = (3, 4, 23, 3)
  glm_width: int = 64
  glm_classes: int = 182
  glm_rates: Sequence[int] = (6, 12, 18, 24)
  glm_scales: Sequence[float] = (1.0, 0.5, 0.75)
  glm_bn_eps: float = 1e-5
  samepad_release_swap: bool = True

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> 'RefSpec':
    """Builds the spec from ``config.model`` (ml_collections)."""
    m = model_cfg
    kw = dict(
        stage_sizes=tuple(m.backbone.stage_sizes),
        width=m.backbone.width,
        bn_eps=m.backbone.bn_eps,
        fpn_channels=m.fpn_channels,
        rpn_channels=m.rpn.conv_channels,
        num_anchors=len(m.rpn.anchor_ratios),
        anchor_stride=m.rpn.anchor_stride,
        pool_size=m.roi.pool_size,
        box_channels=m.box_head_channels,
        num_classes=m.num_classes,
        mask_channels=m.mask_head_channels,
        num_layers=m.num_layers,
        glm_stage_sizes=tuple(m.glm.stage_sizes),
        glm_width=m.glm.width,
        glm_classes=m.glm.num_classes,
        glm_rates=tuple(m.glm.atrous_rates),
        glm_scales=tuple(m.glm.scales),
        glm_bn_eps=m.glm.bn_eps,
    )
    kw.update(overrides)
    return cls(**kw)


class SamePad2d(nn.Module):
  """TF 'SAME' zero padding as the release computes it.

  QUIRK (release): the amount computed from the height is applied to the
  width and vice versa. Harmless for square inputs and for 3x3/1 convs
  (always 1 on each side); it only differs from TF 'SAME' for the stem's
  3x3/2 max pool when its input height and width have different parity.
  ``release_swap=False`` gives true TF 'SAME'.
  """

  def __init__(self, kernel_size: int, stride: int, release_swap: bool = True):
    super().__init__()
    self.k, self.s, self.swap = kernel_size, stride, release_swap

  def _amount(self, size: int):
    out = math.ceil(size / self.s)
    total = max((out - 1) * self.s + self.k - size, 0)
    return total // 2, total - total // 2

  def forward(self, x):
    ph = self._amount(x.shape[2])
    pw = self._amount(x.shape[3])
    if self.swap:
      ph, pw = pw, ph
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1]), 'constant', 0.0)


def _bn(ch: int, eps: float) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(ch, eps=eps)


class Bottleneck(nn.Module):
  """Matterport bottleneck: stride on conv1, biased convs, SAME 3x3."""

  def __init__(self, cin: int, planes: int, stride: int, downsample: bool, eps: float):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride)
    self.bn1 = _bn(planes, eps)
    self.padding2 = SamePad2d(3, 1)
    self.conv2 = nn.Conv2d(planes, planes, 3)
    self.bn2 = _bn(planes, eps)
    self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1)
    self.bn3 = _bn(planes * EXPANSION, eps)
    self.downsample = None
    if downsample:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, planes * EXPANSION, 1, stride=stride), _bn(planes * EXPANSION, eps)
      )

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = F.relu(self.bn2(self.conv2(self.padding2(h))))
    h = self.bn3(self.conv3(h))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(h + shortcut)


class FPN(nn.Module):
  """ResNet C1..C5 and the FPN tops (release module ``fpn``)."""

  def __init__(self, spec: RefSpec):
    super().__init__()
    w, eps = spec.width, spec.bn_eps
    self.C1 = nn.Sequential(
        nn.Conv2d(3, w, 7, stride=2, padding=3),
        _bn(w, eps),
        nn.ReLU(),
        SamePad2d(3, 2, spec.samepad_release_swap),
        nn.MaxPool2d(3, 2),
    )
    cin = w
    for s, blocks in enumerate(spec.stage_sizes):
      planes = w * 2**s
      layers = []
      for b in range(blocks):
        stride = 2 if (b == 0 and s > 0) else 1
        down = b == 0 and (stride != 1 or cin != planes * EXPANSION)
        layers.append(Bottleneck(cin, planes, stride, down, eps))
        cin = planes * EXPANSION
      setattr(self, f'C{s + 2}', nn.Sequential(*layers))
    self.P6 = nn.MaxPool2d(1, 2)
    for s in (5, 4, 3, 2):
      cs = w * 2 ** (s - 2) * EXPANSION
      setattr(self, f'P{s}_conv1', nn.Conv2d(cs, spec.fpn_channels, 1))
      setattr(
          self,
          f'P{s}_conv2',
          nn.Sequential(SamePad2d(3, 1), nn.Conv2d(spec.fpn_channels, spec.fpn_channels, 3)),
      )

  def bottom_up(self, x) -> dict:
    """x (N,3,H,W) -> c1..c5 (any H, W)."""
    out = {}
    h = x
    for s in range(1, 6):
      h = getattr(self, f'C{s}')(h)
      out[f'c{s}'] = h
    return out

  def forward(self, x) -> dict:
    """x (N,3,H,W), H and W multiples of 32 -> c1..c5, p2..p6."""
    out = self.bottom_up(x)
    top = self.P5_conv1(out['c5'])
    tops = {5: top}
    for s in (4, 3, 2):
      top = getattr(self, f'P{s}_conv1')(out[f'c{s}']) + F.interpolate(
          top, scale_factor=2, mode='nearest'
      )
      tops[s] = top
    for s in (2, 3, 4, 5):
      out[f'p{s}'] = getattr(self, f'P{s}_conv2')(tops[s])
    out['p6'] = self.P6(out['p5'])
    return out


class RPN(nn.Module):
  """Shared 3x3 conv + 1x1 class / box convs (release module ``rpn``)."""

  def __init__(self, spec: RefSpec):
    super().__init__()
    a, s = spec.num_anchors, spec.anchor_stride
    self.padding = SamePad2d(3, s)
    self.conv_shared = nn.Conv2d(spec.fpn_channels, spec.rpn_channels, 3, stride=s)
    self.conv_class = nn.Conv2d(spec.rpn_channels, 2 * a, 1)
    self.conv_bbox = nn.Conv2d(spec.rpn_channels, 4 * a, 1)

  def forward(self, p):
    """(N,C,H,W) -> logits (N, H*W*A, 2), deltas (N, H*W*A, 4); order row,
    column, anchor."""
    h = F.relu(self.conv_shared(self.padding(p)))
    n = p.shape[0]
    logits = self.conv_class(h).permute(0, 2, 3, 1).reshape(n, -1, 2)
    deltas = self.conv_bbox(h).permute(0, 2, 3, 1).reshape(n, -1, 4)
    return logits, deltas


class Classifier(nn.Module):
  """Box head on pooled ROIs (release module ``classifier``)."""

  def __init__(self, spec: RefSpec):
    super().__init__()
    c = spec.box_channels
    self.conv1 = nn.Conv2d(spec.fpn_channels, c, spec.pool_size)
    self.bn1 = _bn(c, spec.bn_eps)
    self.conv2 = nn.Conv2d(c, c, 1)
    self.bn2 = _bn(c, spec.bn_eps)
    self.linear_class = nn.Linear(c, spec.num_classes)
    self.linear_bbox = nn.Linear(c, spec.num_classes * 4)
    self.channels = c

  def forward(self, pooled):
    """pooled (R, C, P, P) -> class logits (R, K), deltas (R, K, 4)."""
    h = F.relu(self.bn1(self.conv1(pooled)))
    h = F.relu(self.bn2(self.conv2(h)))
    h = h.view(-1, self.channels)
    return self.linear_class(h), self.linear_bbox(h).view(h.shape[0], -1, 4)


class Mask(nn.Module):
  """Layered mask head (release module ``mask``); conv1 reads the GLM crop
  (first ``glm_classes + 1`` channels) concatenated with the FPN ROI
  features, in that order (as the release concatenates them)."""

  def __init__(self, spec: RefSpec):
    super().__init__()
    c = spec.mask_channels
    cin = spec.glm_classes + 1 + spec.fpn_channels
    self.padding = SamePad2d(3, 1)
    self.conv1 = nn.Conv2d(cin, c, 3)
    self.bn1 = _bn(c, spec.bn_eps)
    for i in (2, 3, 4):
      setattr(self, f'conv{i}', nn.Conv2d(c, c, 3))
      setattr(self, f'bn{i}', _bn(c, spec.bn_eps))
    self.deconv = nn.ConvTranspose2d(c, c, 2, stride=2)
    self.conv5 = nn.Conv2d(c, 1 + spec.num_layers, 1)

  def forward(self, roi_features, glm_features):
    """roi (R, C, S, S), glm (R, G+1, S, S) -> logits (R, 1+L, 2S, 2S)."""
    h = torch.cat([glm_features, roi_features], dim=1)
    for i in (1, 2, 3, 4):
      conv, bn = getattr(self, f'conv{i}'), getattr(self, f'bn{i}')
      h = F.relu(bn(conv(self.padding(h))))
    return self.conv5(F.relu(self.deconv(h)))


class ConvBn(nn.Sequential):
  """DeepLab conv (no bias) + BN (+ ReLU); keys ``conv``, ``bn``."""

  def __init__(self, cin, cout, k, stride, pad, dil, relu, eps):
    super().__init__()
    self.add_module('conv', nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
    self.add_module('bn', _bn(cout, eps))
    if relu:
      self.add_module('relu', nn.ReLU())


class DeepLabBlock(nn.Module):
  """MSRA bottleneck with stride on ``reduce``; shortcut conv in block 1."""

  def __init__(self, cin, cout, stride, dilation, shortcut, eps):
    super().__init__()
    mid = cout // EXPANSION
    self.reduce = ConvBn(cin, mid, 1, stride, 0, 1, True, eps)
    self.conv3x3 = ConvBn(mid, mid, 3, 1, dilation, dilation, True, eps)
    self.increase = ConvBn(mid, cout, 1, 1, 0, 1, False, eps)
    self.shortcut = ConvBn(cin, cout, 1, stride, 0, 1, False, eps) if shortcut else None

  def forward(self, x):
    h = self.increase(self.conv3x3(self.reduce(x)))
    return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ASPP(nn.Module):
  """Sum of dilated 3x3 convs (with bias); keys ``c0..c{n-1}``."""

  def __init__(self, cin, classes, rates):
    super().__init__()
    for i, r in enumerate(rates):
      self.add_module(f'c{i}', nn.Conv2d(cin, classes, 3, 1, r, r, bias=True))

  def forward(self, x):
    return sum(m(x) for m in self.children())


class DeepLabV2(nn.Sequential):
  """Dilated ResNet (output stride 8) + ASPP; keys ``layer1..5``, ``aspp``."""

  def __init__(self, spec: RefSpec):
    super().__init__()
    w, eps = spec.glm_width, spec.glm_bn_eps
    stem = nn.Sequential()
    stem.add_module('conv1', ConvBn(3, w, 7, 2, 3, 1, True, eps))
    stem.add_module('pool', nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    self.add_module('layer1', stem)
    strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
    cin = w
    for s, blocks in enumerate(spec.glm_stage_sizes):
      cout = w * 2**s * EXPANSION
      layer = nn.Sequential()
      for k in range(blocks):
        layer.add_module(
            f'block{k + 1}',
            DeepLabBlock(
                cin if k == 0 else cout,
                cout,
                strides[s] if k == 0 else 1,
                dilations[s],
                k == 0,
                eps,
            ),
        )
      self.add_module(f'layer{s + 2}', layer)
      cin = cout
    self.add_module('aspp', ASPP(cin, spec.glm_classes, spec.glm_rates))


class MSC(nn.Module):
  """Multi-scale inputs, logits max-fused at the scale-1 resolution."""

  def __init__(self, spec: RefSpec):
    super().__init__()
    self.base = DeepLabV2(spec)
    self.scales = tuple(spec.glm_scales)

  def forward(self, x):
    ref = None
    logits = []
    for p in self.scales:
      h = (
          x
          if p == 1.0
          else F.interpolate(
              x,
              size=(int(x.shape[2] * p), int(x.shape[3] * p)),
              mode='bilinear',
              align_corners=False,
          )
      )
      out = self.base(h)
      if ref is None:
        ref = out.shape[2:]
      if out.shape[2:] != ref:
        out = F.interpolate(out, size=ref, mode='bilinear', align_corners=False)
      logits.append(out)
    return torch.stack(logits).max(dim=0)[0]


class SLNReference(nn.Module):
  """The released whole model (COCOA.pth / D2SA.pth layout)."""

  def __init__(self, spec: RefSpec, with_glm: bool = True):
    super().__init__()
    self.spec = spec
    self.fpn = FPN(spec)
    self.rpn = RPN(spec)
    self.classifier = Classifier(spec)
    self.mask = Mask(spec)
    if with_glm:
      self.GLM_modual = MSC(spec)

  @torch.no_grad()
  def stages(self, x) -> dict:
    """x (N,3,H,W) mean-subtracted -> c1..c5, p2..p6, rpn_class_logits
    (N,A,2), rpn_bbox (N,A,4) (levels P2..P6, then row, column, anchor)."""
    out = self.fpn(x)
    logits, deltas = zip(*(self.rpn(out[f'p{s}']) for s in range(2, 7)))
    out['rpn_class_logits'] = torch.cat(logits, 1)
    out['rpn_bbox'] = torch.cat(deltas, 1)
    return out

  @torch.no_grad()
  def glm_logits(self, x, size: int = 513):
    """Max-fused GLM logits for x resized (bilinear) to size x size."""
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return self.GLM_modual(x)


def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> None:
  """Fills every parameter and BN statistic with seeded random values.

  Conv/linear weights get variance ~1/fan_in (activations stay O(1) through
  deep stacks); BN gets non-trivial scale, bias, running mean and variance.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in module.modules():
      if isinstance(mod, nn.BatchNorm2d):
        n = mod.num_features
        mod.weight.copy_(0.5 + torch.rand(n, generator=g))
        mod.bias.copy_(0.2 * torch.randn(n, generator=g))
        mod.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
      elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        w = mod.weight
        # ConvTranspose2d weights are (in, out, kh, kw); stride = kernel.
        fan_in = w.shape[0] if isinstance(mod, nn.ConvTranspose2d) else w[0].numel()
        w.copy_(scale * torch.randn(w.shape, generator=g) / math.sqrt(fan_in))
        if mod.bias is not None:
          mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
  module.eval()


def synthetic_state_dict(
    spec: RefSpec, with_glm: bool = True, seed: int = 0, random: bool = True
) -> dict:
  """A release-layout state_dict without building the torch model (fast even
  at full size): keys and shapes come from a model on the 'meta' device.
  Values are random, or uninitialised memory with ``random=False`` (for
  timing only)."""
  with torch.device('meta'):
    model = SLNReference(spec, with_glm=with_glm)
  g = torch.Generator().manual_seed(seed)
  out = {}
  for k, v in model.state_dict().items():
    if k.endswith('num_batches_tracked'):
      out[k] = torch.zeros((), dtype=torch.long)
    elif not random:
      out[k] = torch.empty(v.shape)
    elif k.endswith('running_var'):
      out[k] = 0.5 + torch.rand(v.shape, generator=g)
    else:
      out[k] = torch.randn(v.shape, generator=g) * 0.01
  return out
