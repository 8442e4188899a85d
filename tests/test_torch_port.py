"""Weight port: release PyTorch state_dicts -> Flax, checked against a
PyTorch reference of the release (tests/torch_reference.py), stage by stage."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from configs import default
from sln_jax.checkpoints import orbax_io, partial_load, torch_port
from sln_jax.errors import UserError
from sln_jax.models import deeplab, fpn, heads, resnet, rpn, sln
from tests import torch_reference as tr

RTOL = 1e-4


def tiny_config():
  """Small widths; two blocks in one stage so non-first blocks are covered."""
  c = default.get_config()
  m = c.model
  m.backbone.stage_sizes = (1, 2, 1, 1)
  m.backbone.width = 8
  m.fpn_channels = 16
  m.rpn.conv_channels = 16
  m.box_head_channels = 32
  m.mask_head_channels = 16
  m.num_layers = 2
  g = m.glm
  g.stage_sizes = (1, 1, 2, 1)
  g.width = 4
  g.num_classes = 5
  g.atrous_rates = (1, 2, 3, 4)
  g.scales = (1.0, 0.75)  # 0.75: int(41 * 0.75) = 30, odd resizes
  g.image_size = 41
  return c


def rel_err(flax_out, torch_out) -> float:
  a = np.asarray(flax_out, np.float64)
  b = torch_out.detach().numpy().astype(np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(t):
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def sub(variables, name):
  return {c: t[name] for c, t in variables.items() if name in t}


def flax_modules(m):
  g = m.glm
  return dict(
      backbone=resnet.ResNet(tuple(m.backbone.stage_sizes), m.backbone.width, m.backbone.bn_eps),
      fpn=fpn.FPN(m.fpn_channels),
      rpn=rpn.RPN(len(m.rpn.anchor_ratios), m.rpn.anchor_stride, m.rpn.conv_channels),
      box_head=heads.BoxHead(m.num_classes, m.box_head_channels, m.backbone.bn_eps),
      mask_head=heads.MaskHead(m.num_layers, m.mask_head_channels, m.backbone.bn_eps),
      glm=deeplab.DeepLabV2(
          tuple(g.stage_sizes),
          g.width,
          g.num_classes,
          tuple(g.atrous_rates),
          tuple(g.scales),
          bn_eps=g.bn_eps,
      ),
  )


@pytest.fixture(scope='module')
def setup():
  cfg = tiny_config()
  ref = tr.SLNReference(tr.RefSpec.from_config(cfg.model))
  tr.randomize_(ref, seed=0)
  variables = torch_port.torch_to_flax(ref.state_dict(), 'sln', cfg)
  return cfg, ref, variables


def test_layout_matches_reference_state_dict_full_size():
  cfg = default.get_config()
  with torch.device('meta'):
    ref = tr.SLNReference(tr.RefSpec.from_config(cfg.model))
  want = [
      (k, tuple(v.shape))
      for k, v in ref.state_dict().items()
      if not k.endswith('num_batches_tracked')
  ]
  got = [(e.key, e.shape) for e in torch_port.release_layout(cfg.model, 'sln')]
  assert got == want
  assert sum(np.prod(s) for _, s in got) == 120_179_766
  assert {'mask.conv1.weight': (256, 439, 3, 3)}.items() <= dict(got).items()
  glm = [k for k, _ in got if k.startswith('GLM_modual.base.')]
  deeplab_keys = [e.key for e in torch_port.release_layout(cfg.model, 'deeplab')]
  assert deeplab_keys == [k[len('GLM_modual.') :] for k in glm]


def test_converted_tree_matches_sln_variables(setup):
  """Same leaves and shapes as the whole Flax model's variables."""
  cfg, _, variables = setup
  want = sln.variable_shapes(sln.build_model(cfg), 64)
  want = jax.tree.map(lambda a: a.shape, dict(want))
  assert jax.tree.map(np.shape, variables) == want


@pytest.mark.parametrize('hw', [(96, 128)])
def test_backbone_fpn_rpn_parity(setup, hw):
  cfg, ref, variables = setup
  mods = flax_modules(cfg.model)
  x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 50
  want = ref.stages(x)

  @jax.jit
  def run(v, img):
    c = mods['backbone'].apply(v['backbone'], img)
    p = mods['fpn'].apply(v['fpn'], c)
    return c, p, mods['rpn'].apply(v['rpn'], [p[f'p{s}'] for s in range(2, 7)])

  c, p, r = run({k: sub(variables, k) for k in ('backbone', 'fpn', 'rpn')}, nhwc(x))
  for k in ('c1', 'c2', 'c3', 'c4', 'c5'):
    assert rel_err(nchw(c[k]), want[k]) <= RTOL, k
  for k in ('p2', 'p3', 'p4', 'p5', 'p6'):
    assert rel_err(nchw(p[k]), want[k]) <= RTOL, k
  sizes = [(hw[0] >> s, hw[1] >> s) for s in range(2, 6)]
  sizes.append(tuple(-(-d // 2) for d in sizes[-1]))  # P6 = P5[::2, ::2]
  assert want['rpn_class_logits'].shape[1] == 3 * sum(h * w for h, w in sizes)
  assert rel_err(r['logits'], want['rpn_class_logits']) <= RTOL
  assert rel_err(r['deltas'], want['rpn_bbox']) <= RTOL


@pytest.mark.parametrize('hw', [(97, 73), (66, 130)])
def test_backbone_parity_odd_sizes(setup, hw):
  """Odd sizes: stem max pool SAME padding (1, 1) instead of (0, 1)."""
  cfg, ref, variables = setup
  x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(2)) * 50
  with torch.no_grad():
    want = ref.fpn.bottom_up(x)
  c = jax.jit(flax_modules(cfg.model)['backbone'].apply)(sub(variables, 'backbone'), nhwc(x))
  for k in ('c1', 'c2', 'c3', 'c4', 'c5'):
    assert rel_err(nchw(c[k]), want[k]) <= RTOL, k


def test_backbone_mixed_parity_is_tf_same(setup):
  """Stem output 49 x 64: the Flax model pads TF-SAME per axis; the release's
  SamePad2d swaps the H and W amounts there (QUIRK), giving 24 rows, not 25."""
  cfg, ref, variables = setup
  x = torch.randn(1, 3, 98, 128, generator=torch.Generator().manual_seed(3))
  c1 = jax.jit(flax_modules(cfg.model)['backbone'].apply)(sub(variables, 'backbone'), nhwc(x))['c1']
  assert ref.fpn.C1(x).shape[2:] == (24, 32)
  ref.fpn.C1[3].swap = False
  try:
    want = ref.fpn.C1(x)
  finally:
    ref.fpn.C1[3].swap = True
  assert want.shape[2:] == (25, 32)
  assert rel_err(nchw(c1), want) <= RTOL


def test_glm_parity(setup):
  cfg, ref, variables = setup
  g = cfg.model.glm
  x = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(4)) * 50
  want = ref.glm_logits(x, g.image_size)
  img = F.interpolate(x, size=(g.image_size,) * 2, mode='bilinear', align_corners=False)
  got = jax.jit(flax_modules(cfg.model)['glm'].apply)(sub(variables, 'glm'), nhwc(img))
  assert want.shape == (1, g.num_classes, 6, 6)
  assert rel_err(nchw(got['logits']), want) <= RTOL
  # The resize used by the activations equals torch's bilinear resize.
  resized = deeplab.resize_bilinear(nhwc(x), g.image_size, g.image_size)
  assert rel_err(nchw(resized), img) <= 1e-5


def test_box_head_parity(setup):
  cfg, ref, variables = setup
  m = cfg.model
  pooled = torch.randn(
      4,
      m.fpn_channels,
      m.roi.pool_size,
      m.roi.pool_size,
      generator=torch.Generator().manual_seed(5),
  )
  with torch.no_grad():
    logits, deltas = ref.classifier(pooled)
  got = flax_modules(m)['box_head'].apply(sub(variables, 'box_head'), nhwc(pooled))
  assert rel_err(got['logits'], logits) <= RTOL
  assert rel_err(got['deltas'], deltas) <= RTOL


def test_mask_head_parity(setup):
  cfg, ref, variables = setup
  m = cfg.model
  gen = torch.Generator().manual_seed(6)
  roi = torch.randn(3, m.fpn_channels, 8, 8, generator=gen)
  glm = torch.rand(3, m.glm.num_classes + 1, 8, 8, generator=gen)
  with torch.no_grad():
    want = ref.mask(roi, glm)
  got = flax_modules(m)['mask_head'].apply(sub(variables, 'mask_head'), nhwc(roi), nhwc(glm))
  assert want.shape == (3, 1 + m.num_layers, 16, 16)
  assert rel_err(nchw(got), want[:, 1:]) <= RTOL


@pytest.mark.parametrize('kernel', [2, 3])
def test_transposed_conv_layout(kernel):
  """torch (in, out, kh, kw) -> flipped HWIO for transpose_kernel=False."""
  import flax.linen as nn

  tconv = torch.nn.ConvTranspose2d(3, 5, kernel, stride=2)
  tr.randomize_(tconv, seed=7)
  x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(8))
  with torch.no_grad():
    want = tconv(x)
  kernel_hwio = torch_port.to_flax_layout(torch_port.DECONV, tconv.weight.detach().numpy())
  mod = nn.ConvTranspose(
      5, (kernel, kernel), strides=(2, 2), padding='VALID', transpose_kernel=False
  )
  got = mod.apply({'params': {'kernel': kernel_hwio, 'bias': tconv.bias.detach().numpy()}}, nhwc(x))
  assert rel_err(nchw(got), want) <= 1e-5
  unflipped = tconv.weight.detach().numpy().transpose(2, 3, 0, 1)
  bad = mod.apply({'params': {'kernel': unflipped, 'bias': tconv.bias.detach().numpy()}}, nhwc(x))
  assert rel_err(nchw(bad), want) > 1e-2
  back = torch_port.to_torch_layout(torch_port.DECONV, kernel_hwio)
  np.testing.assert_array_equal(back, tconv.weight.detach().numpy())


def test_export_round_trip(setup):
  cfg, ref, variables = setup
  sd = torch_port.flax_to_torch(variables, cfg)
  orig = ref.state_dict()
  assert list(sd) == list(orig)
  for k, v in orig.items():
    assert torch.equal(sd[k], v.float() if v.is_floating_point() else v), k
  fresh = tr.SLNReference(tr.RefSpec.from_config(cfg.model))
  fresh.load_state_dict(sd, strict=True)
  deeplab_sd = torch_port.flax_to_torch(variables, cfg, source='deeplab')
  assert all(k.startswith('base.') for k in deeplab_sd)
  torch.testing.assert_close(
      deeplab_sd['base.aspp.c3.weight'], orig['GLM_modual.base.aspp.c3.weight']
  )
  with pytest.raises(UserError, match='mask_head/conv5'):
    torch_port.flax_to_torch(
        {
            'params': {k: v for k, v in variables['params'].items() if k != 'mask_head'},
            'batch_stats': variables['batch_stats'],
        },
        cfg,
    )


def test_mismatches_reported_in_one_error(setup):
  cfg, ref, _ = setup
  sd = dict(ref.state_dict())
  del sd['rpn.conv_bbox.bias']
  sd['fpn.extra.weight'] = torch.zeros(3)
  sd['classifier.linear_class.weight'] = torch.zeros(81, 32)
  with pytest.raises(UserError) as err:
    torch_port.torch_to_flax(sd, 'sln', cfg, path='w.pth')
  msg = str(err.value)
  assert msg.startswith('w.pth: state_dict:')
  for part in (
      '1 missing: rpn.conv_bbox.bias',
      '1 unexpected: fpn.extra.weight',
      'classifier.linear_class.weight (81, 32) != expected (2, 32)',
  ):
    assert part in msg
  out = torch_port.torch_to_flax(
      sd,
      'sln',
      cfg,
      allow_missing=[r'params/rpn/conv_bbox/bias'],
      allow_unexpected=[r'^fpn\.extra\.'],
      skip=[r'linear_class'],
  )
  assert 'bias' not in out['params']['rpn']['conv_bbox']
  assert 'linear_class' not in out['params']['box_head']


def test_load_refuses_pickled_code_and_unwraps(setup, tmp_path):
  cfg, ref, variables = setup
  torch.save(ref.classifier, tmp_path / 'module.pth')
  with pytest.raises(UserError, match='needs pickled code'):
    torch_port.load_torch_state_dict(str(tmp_path / 'module.pth'))
  (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(UserError, match='junk.pth'):
    torch_port.load_torch_state_dict(str(tmp_path / 'junk.pth'))
  with pytest.raises(UserError, match='no such file'):
    torch_port.load_torch_state_dict(str(tmp_path / 'absent.pth'))
  wrapped = {'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}, 'epoch': 3}
  torch.save(wrapped, tmp_path / 'wrapped.pth')
  sd = torch_port.load_torch_state_dict(str(tmp_path / 'wrapped.pth'))
  assert set(sd) == set(ref.state_dict())
  got = torch_port.torch_to_flax(sd, 'auto', cfg)
  jax.tree.map(np.testing.assert_array_equal, got, variables)
  # The release's files predate the zip format (PyTorch 0.4).
  torch.save(ref.state_dict(), tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
  sd = torch_port.load_torch_state_dict(str(tmp_path / 'legacy.pth'))
  assert list(sd) == list(ref.state_dict())


@pytest.mark.parametrize('prefix', ['base.', 'module.base.', '', 'scale.'])
def test_deeplab_source(setup, prefix):
  cfg, ref, variables = setup
  sd = {prefix + k: v for k, v in ref.GLM_modual.base.state_dict().items()}
  assert torch_port.detect_source(sd) == 'deeplab'
  got = torch_port.torch_to_flax(sd, 'auto', cfg)
  assert set(got['params']) == {'glm'} and set(got['batch_stats']) == {'glm'}
  jax.tree.map(
      np.testing.assert_array_equal, got, {c: {'glm': t['glm']} for c, t in variables.items()}
  )


def test_maskrcnn_source_skips_unfitting_layers(setup):
  """Matterport COCO layout: 81 classes, 256-channel mask input."""
  cfg, _, _ = setup
  spec = tr.RefSpec.from_config(cfg.model, num_classes=81)
  coco = tr.SLNReference(spec, with_glm=False)
  coco.mask.conv1 = torch.nn.Conv2d(spec.fpn_channels, spec.mask_channels, 3)
  coco.mask.conv5 = torch.nn.Conv2d(spec.mask_channels, 81, 1)
  tr.randomize_(coco, seed=9)
  sd = coco.state_dict()
  assert torch_port.detect_source(sd, cfg.model) == 'maskrcnn'
  got = torch_port.torch_to_flax(sd, 'auto', cfg)
  assert 'glm' not in got['params']
  assert 'conv1' not in got['params']['mask_head']
  assert 'conv5' not in got['params']['mask_head']
  assert set(got['params']['box_head']) == {'conv1', 'bn1', 'conv2', 'bn2'}
  np.testing.assert_array_equal(
      got['params']['mask_head']['conv2']['kernel'],
      sd['mask.conv2.weight'].numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      got['batch_stats']['mask_head']['bn1']['var'], sd['mask.bn1.running_var'].numpy()
  )
  with pytest.raises(UserError, match='shape mismatches'):
    torch_port.torch_to_flax(sd, 'maskrcnn', cfg, skip=())


def test_orbax_round_trip_and_partial_load(setup, tmp_path):
  cfg, _, variables = setup
  orbax_io.save_orbax(variables, str(tmp_path / 'ckpt'))
  loaded = orbax_io.load_orbax(str(tmp_path / 'ckpt'))
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)

  zeros = jax.tree.map(lambda a: jnp.zeros(np.shape(a), jnp.float32), variables)
  zeros['params']['box_head']['linear_class']['kernel'] = jnp.zeros((32, 7))
  report = partial_load.LoadReport()
  out = partial_load.partial_load(
      zeros, [(str(tmp_path / 'ckpt'), [r'^params/(backbone|box_head)/'])], report
  )
  np.testing.assert_array_equal(
      out['params']['backbone']['C1_conv']['kernel'],
      variables['params']['backbone']['C1_conv']['kernel'],
  )
  assert not np.any(out['params']['fpn']['P2_output']['kernel'])
  assert not np.any(out['batch_stats']['backbone']['C1_bn']['mean'])
  assert report.shape_mismatch == ['params/box_head/linear_class/kernel (32, 2) != (32, 7)']
  assert all(n.startswith(('params/backbone/', 'params/box_head/')) for n in report.loaded)
  # Leaves the regexes leave out keep their values and are listed as such
  # (the checkpoint holds them).
  assert 'params/fpn/P2_output/kernel' in report.excluded
  assert 'batch_stats/backbone/C1_bn/mean' in report.excluded
  assert not report.missing
  assert not any(n.startswith('params/box_head/') for n in report.excluded)
  assert 'left out by init_patterns: ' in report.summary()
  assert 'absent from the checkpoint' not in report.summary()
  with pytest.raises(UserError, match='nothing loaded'):
    partial_load.partial_load(
        zeros, [str(tmp_path / 'ckpt'), (str(tmp_path / 'ckpt'), ['^params/nothing'])]
    )
  with pytest.raises(UserError, match='no such checkpoint'):
    orbax_io.load_orbax(str(tmp_path / 'absent'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(UserError, match='not an Orbax checkpoint'):
    orbax_io.load_orbax(str(tmp_path / 'empty'))
  for directory, _, names in os.walk(tmp_path / 'ckpt'):  # a copy cut short
    for name in names if os.path.basename(directory) == 'd' else ():
      with open(os.path.join(directory, name), 'r+b') as f:
        f.truncate(os.path.getsize(f.name) // 2)
  with pytest.raises(UserError, match=r'ckpt: cannot be read \(.*damaged or incomplete'):
    orbax_io.load_orbax(str(tmp_path / 'ckpt'))


def test_read_failures_are_told_from_other_errors():
  def chained(outer, inner):
    try:
      try:
        raise inner
      except Exception as err:  # pylint: disable=broad-except
        raise outer from err
    except Exception as err:  # pylint: disable=broad-except
      return err

  damaged = ValueError('OUT_OF_RANGE: Error reading "params.a/0" in OCDBT database')
  assert orbax_io.is_read_failure(chained(Exception('Encountered error while reading'), damaged))
  assert orbax_io.is_read_failure(
      FileNotFoundError('Metadata file (named _METADATA) does not exist')
  )
  assert orbax_io.is_read_failure(json.JSONDecodeError('Expecting value', '', 0))
  assert not orbax_io.is_read_failure(RuntimeError('RESOURCE_EXHAUSTED: Out of memory'))
  assert not orbax_io.is_read_failure(chained(Exception('x'), ValueError('UNAVAILABLE: try again')))
  assert not orbax_io.is_read_failure(ValueError('Dict key mismatch'))


def test_init_from_accepts_a_training_step_directory(tmp_path):
  """<workdir>/checkpoints/<step> holds the tree in default/: init_from may
  name either."""
  tree = {'params': {'a': np.arange(3, dtype=np.float32)}}
  orbax_io.save_orbax(tree, str(tmp_path / 'step' / 'default'))
  with open(tmp_path / 'step' / '_CHECKPOINT_METADATA', 'w') as f:
    f.write('{}')
  np.testing.assert_array_equal(
      orbax_io.load_orbax(str(tmp_path / 'step'))['params']['a'], [0, 1, 2]
  )


def test_partial_load_lists_model_leaves_it_did_not_load(setup, tmp_path):
  """A checkpoint without the GLM (glm.enabled=False) and with a mask head of
  another num_layers: the model leaves left at their initial values are
  listed; strict (evaluate / predict) makes them one error naming them."""
  _, _, variables = setup
  ckpt = {c: {k: v for k, v in t.items() if k != 'glm'} for c, t in variables.items()}
  ckpt = jax.tree.map(lambda x: x, ckpt)
  ckpt['params']['mask_head']['conv5']['bias'] = np.zeros((5,), np.float32)
  orbax_io.save_orbax(ckpt, str(tmp_path / 'ckpt'))
  zeros = jax.tree.map(lambda a: jnp.zeros(np.shape(a), jnp.float32), variables)
  glm = sorted(
      '/'.join((c,) + p)
      for c, t in variables.items()
      for p in partial_load._flatten(t.get('glm', {}), ('glm',))
  )  # pylint: disable=protected-access
  report = partial_load.LoadReport()
  out = partial_load.partial_load(zeros, [str(tmp_path / 'ckpt')], report)
  assert sorted(report.missing) == glm and len(glm) > 10
  conv5 = np.shape(variables['params']['mask_head']['conv5']['bias'])
  assert report.shape_mismatch == [f'params/mask_head/conv5/bias (5,) != {conv5}']
  assert report.not_loaded() == report.missing + report.shape_mismatch
  assert not report.excluded
  assert not report.not_in_target
  summary = report.summary()
  assert f'{len(glm) + 1} model arrays keep their initial values' in summary
  assert f'{len(glm)} absent from the checkpoint: params/glm/' in summary
  assert '(+' in summary and '1 with other shapes' in summary
  np.testing.assert_array_equal(
      out['params']['mask_head']['conv1']['kernel'],
      variables['params']['mask_head']['conv1']['kernel'],
  )
  assert not np.any(out['params']['glm']['layer1_conv']['kernel'])
  first = report.missing[0]

  # A later source that holds the leaf with the model's shape wins; each
  # leaf counts once, each source says how many it gave.
  full = str(tmp_path / 'full')
  orbax_io.save_orbax(variables, full)
  report = partial_load.LoadReport()
  partial_load.partial_load(zeros, [str(tmp_path / 'ckpt'), full], report, strict=True)
  assert not report.not_loaded()
  total = len(jax.tree.leaves(variables))
  assert len(report.loaded) == len(set(report.loaded)) == total
  assert report.sources == [(str(tmp_path / 'ckpt'), total - len(glm) - 1), (full, total)]
  assert report.summary() == (
      f'loaded {total} arrays ({tmp_path / "ckpt"}: '
      f'{total - len(glm) - 1}, {full}: {total}; later ones win)'
  )

  with pytest.raises(UserError) as err:
    partial_load.partial_load(zeros, [str(tmp_path / 'ckpt')], strict=True)
  assert err.value.field == 'init_from'
  assert err.value.path == str(tmp_path / 'ckpt')
  message = str(err.value)
  assert f'{len(glm) + 1} of the model' in message and '\n' not in message
  assert f'{len(glm)} absent from the checkpoint: {first}, ' in message
  assert '1 with other shapes: params/mask_head/conv5/bias' in message


def test_full_size_conversion_time_and_memory():
  """About 120 million numbers in the release layout: < 30 s, < 4 GB."""
  cfg = default.get_config()
  sd = tr.synthetic_state_dict(tr.RefSpec.from_config(cfg.model), random=False)
  tracemalloc.start()
  start = time.perf_counter()
  out = torch_port.torch_to_flax(sd, 'auto', cfg)
  seconds = time.perf_counter() - start
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  n = sum(a.size for a in jax.tree.leaves(out))
  assert n == 120_179_766
  assert seconds < 30 and peak < 4 * 2**30, (seconds, peak)
  w = sd['classifier.conv1.weight'].numpy()
  np.testing.assert_array_equal(
      out['params']['box_head']['conv1']['kernel'], w.transpose(2, 3, 1, 0)
  )
