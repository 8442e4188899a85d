"""The weight port checked against the original release's own PyTorch code.

``ReleaseNetwork`` imports the release's modules from a checkout of
apchenstu/SLN-Amodal (nothing is copied from it) and builds its network as
its ``amodal_test.py`` does: ``modal.modals`` ResNet-101 FPN, RPN, box head
and mask head (conv1 reading GLM + FPN channels, conv5 writing 1 + L
layers), ``modal.deeplabv2`` multi-scale GLM. ``compare`` converts a
release state_dict with ``sln_jax.checkpoints.torch_port`` and measures, per tensor, max
|ours - release| / max |release| on one input: c1..c5, p2..p6, RPN logits
and deltas, GLM logits, and the two heads on the same pooled ROI features
(the release pools with a compiled PyTorch 0.4 extension that current
PyTorch cannot load, so pooling is bypassed; ``ops.roi_align`` is tested
against TensorFlow's ``crop_and_resize``). Tensors are NCHW as in PyTorch.

``release_evaluation`` runs the release's own amodal evaluator
(``evaluate/amodalevalCOCOA.py``, as its ``print_result`` does: every
occlusion subset and thing/stuff part) on a COCOA annotation file and a
results list, for comparison with ``sln_jax.evaluation.metrics`` (``amodalapi``).

CLI: ``scripts/check_release_parity.py``. torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import types
from typing import Callable, Iterator, Mapping, Sequence
import warnings

import numpy as np

from sln_jax.errors import UserError

_RELEASE_FILES = (
    'modal/modals.py',
    'modal/deeplabv2.py',
    'modal/resnet_deeplab.py',
    'modal/msc_deeplab.py',
)


class ReleaseNetwork:
  """The release's modules behind the interface ``compare`` uses (NCHW).

  Same interface as ``tests/torch_reference.SLNReference``: ``stages(x)``,
  ``glm_logits(x, size)``, ``classifier(pooled) -> (logits, deltas)``,
  ``mask(roi, glm) -> logits``, plus ``state_dict`` / ``load_state_dict``.
  """

  def __init__(self, release_dir: str, model_cfg):
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn  # pylint: disable=g-import-not-at-top
    from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

    self._torch, self._F = torch, F
    m = model_cfg
    if (
        tuple(m.backbone.stage_sizes) != (3, 4, 23, 3)
        or m.backbone.width != 64
        or not m.glm.enabled
    ):
      raise UserError(
          'the release is ResNet-101 FPN with the GLM; use a full-size '
          'config (configs/cocoa.py, d2sa.py, default.py)',
          field='config.model',
      )
    modals, deeplabv2 = _import_release(release_dir)
    self._modals = modals

    class Release(nn.Module):
      """Attribute names = the release MaskRCNN's (state_dict keys)."""

      def __init__(self):
        super().__init__()
        resnet = modals.ResNet('resnet101', stage5=True)
        self.fpn = modals.FPN(*resnet.stages(), out_channels=m.fpn_channels)
        self.rpn = modals.RPN(len(m.rpn.anchor_ratios), m.rpn.anchor_stride, m.fpn_channels)
        image_shape = (1024, 1024, 3)  # only used by the bypassed ROI pooling
        self.classifier = modals.Classifier(
            m.fpn_channels, m.roi.pool_size, image_shape, m.num_classes
        )
        self.mask = modals.Mask(m.fpn_channels, m.roi.mask_pool_size, image_shape, 1)
        # As amodal_test.py: conv1 reads GLM (classes + argmax) + FPN
        # channels, conv5 writes 1 + num_layers channels.
        self.mask.conv1 = nn.Conv2d(m.glm.num_classes + 1 + m.fpn_channels, m.mask_head_channels, 3)
        self.mask.conv5 = nn.Conv2d(m.mask_head_channels, 1 + m.num_layers, 1)
        self.GLM_modual = deeplabv2.DeepLabV2_ResNet101_MSC(m.glm.num_classes)

    try:
      self.net = Release().eval()
    except (AttributeError, TypeError) as err:
      raise UserError(
          f'the release modules are not as expected ({err})',
          path=release_dir,
          field='--release_dir',
      ) from None

  def state_dict(self):
    return self.net.state_dict()

  def load_state_dict(self, state: Mapping, path: str = '') -> None:
    """Loads ``state`` (release keys); a misfit is a UserError naming ``path``."""
    missing, unexpected = self.net.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
      raise UserError(
          f'does not fit the release network ({len(missing)} missing, e.g. '
          f'{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})',
          path=path,
          field='state_dict',
      )

  def stages(self, x) -> dict:
    f, out = self.net.fpn, {}
    h = x
    for k in range(1, 6):
      h = getattr(f, f'C{k}')(h)
      out[f'c{k}'] = h
    out.update({f'p{k + 2}': p for k, p in enumerate(f(x))})
    rpn = [self.net.rpn(out[f'p{k}']) for k in range(2, 7)]
    out['rpn_class_logits'] = self._torch.cat([r[0] for r in rpn], 1)
    out['rpn_bbox'] = self._torch.cat([r[2] for r in rpn], 1)
    return out

  def glm_logits(self, x, size: int):
    # As the release's MaskRCNN.predict: bilinear resize, then the MSC GLM.
    x = self._F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return self.net.GLM_modual(x)

  def classifier(self, pooled):
    with _pooled_as(self._modals, pooled):
      logits, _, deltas = self.net.classifier([None], None)
    return logits, deltas

  def mask(self, roi, glm):
    with _pooled_as(self._modals, roi):
      logits, _ = self.net.mask([None], None, glm)
    return logits


@contextlib.contextmanager
def _pooled_as(modals, pooled) -> Iterator[None]:
  """Within the block the release's ``pyramid_roi_align`` returns ``pooled``."""
  saved = modals.pyramid_roi_align
  modals.pyramid_roi_align = lambda inputs, pool_size, image_shape: pooled
  try:
    yield
  finally:
    modals.pyramid_roi_align = saved


def _import_release(release_dir: str):
  """(modal.modals, modal.deeplabv2) of the checkout, importable on PyTorch 2."""
  for rel in _RELEASE_FILES:
    if not os.path.isfile(os.path.join(release_dir, rel)):
      raise UserError(
          f'not a checkout of apchenstu/SLN-Amodal (no {rel})',
          path=release_dir,
          field='--release_dir',
      )
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  if not hasattr(F, 'upsample'):  # the release's name for F.interpolate
    F.upsample = F.interpolate
  warnings.filterwarnings('ignore', message='.*functional.upsample. is deprecated')
  # modal.modals imports the compiled crop_and_resize extension (PyTorch 0.4
  # cffi), which is never called here (ROI pooling is bypassed): a stand-in
  # module is in place while the release imports.
  names = ('roialign', 'roialign.roi_align', 'roialign.roi_align.crop_and_resize')
  saved = {name: sys.modules.get(name) for name in names}
  for name in names:
    sys.modules[name] = types.ModuleType(name)
  sys.modules[names[-1]].CropAndResizeFunction = None
  sys.path.insert(0, os.path.abspath(release_dir))
  try:
    from modal import deeplabv2, modals  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise UserError(
        f'cannot import the release modules ({err})', path=release_dir, field='--release_dir'
    ) from None
  finally:
    sys.path.remove(os.path.abspath(release_dir))
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  return modals, deeplabv2


def random_release_state(net, seed: int) -> dict:
  """Seeded random values for every tensor of ``net.state_dict()``: conv and
  linear weights with variance 1/fan_in, BN scales and variances in
  [0.75, 1.25], biases and means N(0, 0.1^2)."""
  import torch  # pylint: disable=g-import-not-at-top

  g = torch.Generator().manual_seed(seed)
  out = {}
  for name, t in net.state_dict().items():
    if not t.is_floating_point():
      out[name] = t.clone()
    elif name.endswith('running_var') or (name.endswith('weight') and t.ndim == 1):
      out[name] = 0.75 + 0.5 * torch.rand(t.shape, generator=g)
    elif name.endswith('running_mean') or name.endswith('bias'):
      out[name] = 0.1 * torch.randn(t.shape, generator=g)
    else:
      fan_in = t.shape[0] if 'deconv' in name else t[0].numel()
      out[name] = torch.randn(t.shape, generator=g) / fan_in**0.5
  return out


def compare(
    net,
    state: Mapping,
    config,
    x: np.ndarray,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:
  """Relative error of sln_jax against ``net`` for every compared tensor.

  Args:
    net: the release network (``ReleaseNetwork`` or an object with its
      interface) holding ``state``.
    state: its state_dict in the release's key layout.
    config: the matching config (``config.model``).
    x: (1, 3, H, W) float32 input, already mean-subtracted.

  Returns {tensor name: max |ours - release| / max |release|}.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from sln_jax.checkpoints import torch_port  # pylint: disable=g-import-not-at-top
  from sln_jax.models import sln  # pylint: disable=g-import-not-at-top

  m = config.model
  progress('converting')
  variables = torch_port.torch_to_flax(state, 'sln', config)
  progress('running sln_jax')
  ours = torch_port.release_activations(variables, x, config)
  g = torch.Generator().manual_seed(seed + 1)
  p, q = m.roi.pool_size, m.roi.mask_pool_size
  pooled = torch.randn(8, m.fpn_channels, p, p, generator=g)
  roi = torch.randn(8, m.fpn_channels, q, q, generator=g)
  glm = torch.rand(8, m.glm.num_classes + 1, q, q, generator=g) if m.glm.enabled else None
  model = sln.build_model(config)
  nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))
  box = model.apply(variables, nhwc(pooled), method=lambda mdl, a: mdl.box_head(a))
  masks = model.apply(
      variables,
      nhwc(roi),
      None if glm is None else nhwc(glm),
      method=lambda mdl, a, b: mdl.mask_head(a, b),
  )
  ours['box_logits'] = np.asarray(box['logits'])
  ours['box_deltas'] = np.asarray(box['deltas'])
  ours['mask_layer_logits'] = np.asarray(masks).transpose(0, 3, 1, 2)

  progress('running the release')
  xt = torch.from_numpy(x)
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in net.stages(xt).items()}
    if m.glm.enabled:
      ref['glm_logits'] = net.glm_logits(xt, m.glm.image_size).numpy()
    logits, deltas = net.classifier(pooled)
    ref['box_logits'], ref['box_deltas'] = logits.numpy(), deltas.numpy()
    ref['mask_layer_logits'] = net.mask(roi, glm)[:, 1:].numpy()  # channel 0 unused
  errors = {}
  for name, want in ref.items():
    got = ours[name]
    if got.shape != want.shape:
      raise AssertionError(f'{name}: shape {got.shape} != release {want.shape}')
    want64 = want.astype(np.float64)
    errors[name] = float(np.abs(got - want64).max() / max(np.abs(want64).max(), 1e-12))
  return errors


# ----------------------------------------------------------------- evaluator
_RELEASE_EVAL_FILE = 'evaluate/amodalevalCOCOA.py'


@contextlib.contextmanager
def _numpy_2018() -> Iterator[None]:
  """What the release's evaluator needs of numpy that numpy 2 removed:
  ``np.float`` and a float ``num`` for ``np.linspace``; restored on exit."""
  had_float = hasattr(np, 'float')
  saved_float, linspace = getattr(np, 'float', None), np.linspace
  np.float = float
  np.linspace = lambda start, stop, num=50, **kw: linspace(start, stop, int(num), **kw)
  try:
    yield
  finally:
    np.linspace = linspace
    if had_float:
      np.float = saved_float
    else:
      del np.float


def load_release_evaluator(release_dir: str):
  """The release's ``AmodalEval`` class (COCOA), loaded from its file."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = os.path.join(release_dir, _RELEASE_EVAL_FILE)
  if not os.path.isfile(path):
    raise UserError(
        f'not a checkout of apchenstu/SLN-Amodal (no {_RELEASE_EVAL_FILE})',
        path=release_dir,
        field='--release_dir',
    )
  spec = importlib.util.spec_from_file_location('sln_release_amodaleval', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.AmodalEval
  except (ImportError, AttributeError, SyntaxError) as err:
    raise UserError(
        f'cannot load the release evaluator ({err})', path=path, field='--release_dir'
    ) from None


class _ReleaseGt:
  """The release's ``amodalGt`` (its Dataset, whose ``.dataset`` is its
  modified COCO) over a COCOA annotation file: images and per-annotator
  annotations with ``regions``."""

  def __init__(self, data: Mapping):
    self.imgs = {im['id']: im for im in data['images']}
    self.anns = {a['id']: a for a in data['annotations']}
    self.dataset = self

  def getImgIds(self):  # pylint: disable=invalid-name
    return list(self.imgs)

  def getAnnIds(self, imgIds=()):  # pylint: disable=invalid-name
    wanted = set(imgIds)
    return [a['id'] for a in self.anns.values() if a['image_id'] in wanted]

  def loadAnns(self, ids):  # pylint: disable=invalid-name
    return [self.anns[i] for i in ids]


def release_evaluation(
    amodal_eval, annotations: Mapping, results: Sequence[Mapping], visible: bool = False
) -> dict:
  """Runs the release's own amodal evaluator as its training script does
  (``print_result``: every occlusion subset and thing/stuff part), on every
  image of ``annotations`` (the release's ``[:-1]`` slice is not applied).

  Args:
    amodal_eval: the release's ``AmodalEval`` (``load_release_evaluator``).
    annotations: a COCOA annotation file's JSON.
    results: COCO results; ``segmentation`` (or ``visible_mask`` when
      ``visible``) is scored. With ``visible`` the GT is each region's
      ``visible_mask`` (or its amodal mask when unoccluded).

  Returns ``{subset: {part: {AP, AP50, AP75, AR1, AR10, AR100}}}`` in the
  layout of ``sln_jax.evaluation.metrics.evaluate``'s branches.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top

  from sln_jax.evaluation import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  key = 'visible_mask' if visible else 'segmentation'
  dets = [
      {'image_id': r['image_id'], 'category_id': 1, 'score': r['score'], 'segmentation': r[key]}
      for r in results
  ]
  gt = _ReleaseGt(copy.deepcopy(annotations))
  parts = {'both': 0, 'things': 1, 'stuff': 2}  # Params.onlyThings
  out = {s: {} for s in metrics_lib.SUBSETS}
  with _numpy_2018(), contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = {'images': list(gt.imgs.values()), 'annotations': [], 'categories': [{'id': 1}]}
    coco.createIndex()
    ev = amodal_eval(gt, coco.loadRes(copy.deepcopy(dets)), None)
    ev.params.useAmodalGT = ev.params.useAmodalDT = int(not visible)
    for part, only_things in parts.items():
      for subset, rng in metrics_lib.SUBSETS.items():
        ev.params.onlyThings = only_things
        ev.params.occRng = list(rng)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        out[subset][part] = dict(zip(metrics_lib.metric_names(), map(float, ev.stats[:6])))
  return out
