"""The tensors of the release's PyTorch checkpoints and the Flax leaves they
map to: one ``Entry`` per tensor (torch key and shape, Flax collection and
path, layout kind), listed by ``release_layout`` for a model config.

Keys are the release's (apchenstu/SLN-Amodal): Matterport Mask R-CNN names
(``fpn.C2.0.conv1``, ``classifier.linear_class``, ``mask.conv5``) and
kazuto1011's DeepLab v2 names under the GLM prefix. Shapes are torch's: conv
(out, in, kh, kw), transposed conv (in, out, kh, kw), linear (out, in).
Flax paths follow docs/architecture.md.
"""

from __future__ import annotations

import dataclasses

from sln_jax.errors import UserError

SOURCES = ('sln', 'deeplab', 'maskrcnn')


EXPANSION = 4


GLM_PREFIX = {'sln': 'GLM_modual.base.', 'deeplab': 'base.'}


# Matterport COCO layers that cannot fit SLN (81 classes; 256-channel mask
# head input; 81-class mask output).
MASKRCNN_SKIP = (r'^classifier\.linear_(class|bbox)\.', r'^mask\.conv[15]\.')


# Leaf kinds: how a torch tensor maps onto a Flax leaf.
CONV, DECONV, LINEAR, VECTOR = 'conv', 'deconv', 'linear', 'vector'


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torch tensor <-> one Flax leaf."""

  key: str  # torch key (canonical, without 'module.')
  collection: str  # 'params' | 'batch_stats'
  path: tuple  # Flax path inside the collection
  kind: str  # CONV | DECONV | LINEAR | VECTOR
  shape: tuple  # torch shape

  @property
  def flax_name(self) -> str:
    return '/'.join((self.collection,) + self.path)


class _Layout:
  """Accumulates entries for one source."""

  def __init__(self):
    self.entries: list[Entry] = []

  def conv(self, key, path, cout, cin, k, bias=True):
    self.entries.append(
        Entry(f'{key}.weight', 'params', path + ('kernel',), CONV, (cout, cin, k, k))
    )
    if bias:
      self.entries.append(Entry(f'{key}.bias', 'params', path + ('bias',), VECTOR, (cout,)))

  def deconv(self, key, path, cin, cout, k):
    self.entries.append(
        Entry(f'{key}.weight', 'params', path + ('kernel',), DECONV, (cin, cout, k, k))
    )
    self.entries.append(Entry(f'{key}.bias', 'params', path + ('bias',), VECTOR, (cout,)))

  def linear(self, key, path, cout, cin):
    self.entries.append(Entry(f'{key}.weight', 'params', path + ('kernel',), LINEAR, (cout, cin)))
    self.entries.append(Entry(f'{key}.bias', 'params', path + ('bias',), VECTOR, (cout,)))

  def bn(self, key, path, ch):
    for tname, coll, fname in (
        ('weight', 'params', 'scale'),
        ('bias', 'params', 'bias'),
        ('running_mean', 'batch_stats', 'mean'),
        ('running_var', 'batch_stats', 'var'),
    ):
      self.entries.append(Entry(f'{key}.{tname}', coll, path + (fname,), VECTOR, (ch,)))


def _mask_rcnn_layout(lay: _Layout, m) -> None:
  """Backbone, FPN, RPN, box head and mask head (release keys)."""
  w = m.backbone.width
  lay.conv('fpn.C1.0', ('backbone', 'C1_conv'), w, 3, 7)
  lay.bn('fpn.C1.1', ('backbone', 'C1_bn'), w)
  cin = w
  for s, blocks in enumerate(m.backbone.stage_sizes):
    planes, cout = w * 2**s, w * 2**s * EXPANSION
    for b in range(blocks):
      key, path = f'fpn.C{s + 2}.{b}', ('backbone', f'C{s + 2}_{b}')
      lay.conv(f'{key}.conv1', path + ('conv1',), planes, cin, 1)
      lay.bn(f'{key}.bn1', path + ('bn1',), planes)
      lay.conv(f'{key}.conv2', path + ('conv2',), planes, planes, 3)
      lay.bn(f'{key}.bn2', path + ('bn2',), planes)
      lay.conv(f'{key}.conv3', path + ('conv3',), cout, planes, 1)
      lay.bn(f'{key}.bn3', path + ('bn3',), cout)
      if b == 0:
        lay.conv(f'{key}.downsample.0', path + ('downsample_conv',), cout, cin, 1)
        lay.bn(f'{key}.downsample.1', path + ('downsample_bn',), cout)
      cin = cout
  f = m.fpn_channels
  for s in (5, 4, 3, 2):
    lay.conv(f'fpn.P{s}_conv1', ('fpn', f'P{s}_lateral'), f, w * 2 ** (s - 2) * EXPANSION, 1)
    lay.conv(f'fpn.P{s}_conv2.1', ('fpn', f'P{s}_output'), f, f, 3)
  a, r = len(m.rpn.anchor_ratios), m.rpn.conv_channels
  lay.conv('rpn.conv_shared', ('rpn', 'conv_shared'), r, f, 3)
  lay.conv('rpn.conv_class', ('rpn', 'conv_class'), 2 * a, r, 1)
  lay.conv('rpn.conv_bbox', ('rpn', 'conv_bbox'), 4 * a, r, 1)
  c, k = m.box_head_channels, m.num_classes
  lay.conv('classifier.conv1', ('box_head', 'conv1'), c, f, m.roi.pool_size)
  lay.bn('classifier.bn1', ('box_head', 'bn1'), c)
  lay.conv('classifier.conv2', ('box_head', 'conv2'), c, c, 1)
  lay.bn('classifier.bn2', ('box_head', 'bn2'), c)
  lay.linear('classifier.linear_class', ('box_head', 'linear_class'), k, c)
  lay.linear('classifier.linear_bbox', ('box_head', 'linear_bbox'), 4 * k, c)
  mc = m.mask_head_channels
  mask_in = f + (m.glm.num_classes + 1 if m.glm.enabled else 0)
  for i in (1, 2, 3, 4):
    lay.conv(f'mask.conv{i}', ('mask_head', f'conv{i}'), mc, mask_in if i == 1 else mc, 3)
    lay.bn(f'mask.bn{i}', ('mask_head', f'bn{i}'), mc)
  lay.deconv('mask.deconv', ('mask_head', 'deconv'), mc, mc, 2)
  lay.conv('mask.conv5', ('mask_head', 'conv5'), 1 + m.num_layers, mc, 1)


def _glm_layout(lay: _Layout, g, prefix: str) -> None:
  """DeepLab v2 (kazuto1011 keys) under ``prefix``."""
  w = g.width
  lay.conv(f'{prefix}layer1.conv1.conv', ('glm', 'layer1_conv'), w, 3, 7, bias=False)
  lay.bn(f'{prefix}layer1.conv1.bn', ('glm', 'layer1_bn'), w)
  cin = w
  for s, blocks in enumerate(g.stage_sizes):
    cout = w * 2**s * EXPANSION
    mid = cout // EXPANSION
    for k in range(1, blocks + 1):
      key = f'{prefix}layer{s + 2}.block{k}'
      path = ('glm', f'layer{s + 2}_block{k}')
      parts = [
          ('reduce', mid, cin if k == 1 else cout, 1),
          ('conv3x3', mid, mid, 3),
          ('increase', cout, mid, 1),
      ]
      if k == 1:
        parts.append(('shortcut', cout, cin, 1))
      for name, co, ci, ks in parts:
        lay.conv(f'{key}.{name}.conv', path + (f'{name}_conv',), co, ci, ks, bias=False)
        lay.bn(f'{key}.{name}.bn', path + (f'{name}_bn',), co)
    cin = cout
  for j in range(len(g.atrous_rates)):
    lay.conv(f'{prefix}aspp.c{j}', ('glm', f'aspp_c{j}'), g.num_classes, cin, 3)


def release_layout(model_cfg, source: str = 'sln') -> list[Entry]:
  """Every tensor of a release checkpoint of ``source`` for ``config.model``.

  'sln' includes the GLM only when ``model.glm.enabled``; 'deeplab' is the
  GLM alone; 'maskrcnn' is the Mask R-CNN part (no skipping applied here).
  """
  if source not in SOURCES:
    raise UserError(f'unknown source {source!r}; one of {SOURCES}', field='source')
  lay = _Layout()
  if source in ('sln', 'maskrcnn'):
    _mask_rcnn_layout(lay, model_cfg)
  if source == 'deeplab' or (source == 'sln' and model_cfg.glm.enabled):
    _glm_layout(lay, model_cfg.glm, GLM_PREFIX[source])
  return lay.entries
