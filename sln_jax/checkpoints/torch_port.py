"""Released PyTorch checkpoints <-> Flax variables.

Sources (the release's files, apchenstu/SLN-Amodal):
  * 'sln':      COCOA.pth / D2SA.pth, the whole model (Mask R-CNN keys plus
                ``GLM_modual.base.*``);
  * 'deeplab':  deeplabv2.pth, the GLM alone (``base.*``; also accepted:
                bare ``layer1.*``, ``scale.*``, ``GLM_modual.base.*``);
  * 'maskrcnn': mask_rcnn_coco.pth, Matterport Mask R-CNN with 81 classes.
                By default its class-specific layers and the mask head's
                first and last convs are skipped (``MASKRCNN_SKIP``): they
                cannot fit SLN's shapes. The rest of the mask head loads, as
                in the release's training script.
A ``module.`` prefix (DataParallel) is stripped everywhere.

Layouts: torch conv OIHW -> Flax HWIO; linear (out, in) -> (in, out);
transposed conv (in, out, kh, kw) -> HWIO of ``nn.ConvTranspose(
transpose_kernel=False)`` with both spatial axes flipped; BatchNorm weight,
bias -> params scale, bias; running_mean, running_var -> batch_stats mean,
var; ``num_batches_tracked`` is ignored. Flax module paths follow
docs/architecture.md. Converted leaves are float32 numpy arrays.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The checkpoint layout (kept reachable here: torch_port.release_layout etc.).
from sln_jax.checkpoints.release_layout import (  # noqa: F401  pylint: disable=g-multiple-import
    CONV,
    DECONV,
    EXPANSION,
    GLM_PREFIX,
    LINEAR,
    MASKRCNN_SKIP,
    SOURCES,
    VECTOR,
    Entry,
    release_layout,
)
from sln_jax.errors import UserError, listing
from sln_jax.models import deeplab, sln


def load_torch_state_dict(path: str) -> dict:
  """Reads a .pth file safely (``weights_only=True``) -> {key: torch.Tensor}.

  Accepts a bare state_dict or one wrapped as {'state_dict': ...} or
  {'model': ...}; strips DataParallel ``module.`` prefixes. A file that needs
  pickled code (a whole saved nn.Module, custom classes) is refused.
  """
  import torch  # Conversion-only dependency.

  if not os.path.isfile(path):
    raise UserError('no such file', path=path)
  try:
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError as err:
      if 'mmap' not in str(err):
        raise
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as err:
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    detail = next((l for l in lines if 'Unsupported global' in l), '')
    if not detail:
      raise UserError('not a PyTorch checkpoint (unpickling failed)', path=path) from None
    raise UserError(
        'refusing to load: the file needs pickled code (not a plain '
        f'state_dict of tensors; weights_only=True failed: '
        f'{detail.split(" was not")[0]})',
        path=path,
    ) from None
  except Exception as err:  # pylint: disable=broad-except
    lines = str(err).strip().splitlines()
    raise UserError(
        f'not a readable PyTorch checkpoint ({type(err).__name__}'
        f'{": " + lines[0] if lines else ""})',
        path=path,
    ) from None
  if isinstance(obj, Mapping):
    for wrapper in ('state_dict', 'model'):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise UserError(
        f'expected a state_dict (dict of tensors), found ' f'{type(obj).__name__}', path=path
    )
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise UserError(
          f'entry {key!r} is a {type(value).__name__}, not a tensor',
          path=path,
          field='state_dict',
      )
    while key.startswith('module.'):
      key = key[len('module.') :]
    out[key] = value
  return out


def _canonical_glm_key(key: str) -> str:
  """Maps the accepted DeepLab naming variants onto ``base.*``."""
  for old in ('GLM_modual.base.', 'GLM_modual.scale.', 'scale.'):
    if key.startswith(old):
      key = 'base.' + key[len(old) :]
      break
  if key.startswith(('layer', 'aspp.')):
    key = 'base.' + key
  return key.replace('.aspp.stages.', '.aspp.')


def detect_source(state_dict: Mapping, model_cfg=None) -> str:
  """Guesses 'sln', 'deeplab' or 'maskrcnn' from a state_dict's keys.

  Mask R-CNN keys with ``GLM_modual.*`` are 'sln', DeepLab keys alone are
  'deeplab'. Mask R-CNN keys alone are 'maskrcnn', unless ``model_cfg`` has
  the GLM disabled and the class and mask heads fit it (an SLN trained
  without the GLM).
  """
  state_dict = {re.sub(r'^(module\.)+', '', k): v for k, v in state_dict.items()}
  keys = list(state_dict)
  has_mrcnn = any(k.startswith(('fpn.', 'rpn.', 'classifier.')) for k in keys)
  has_glm = any(k.startswith('GLM_modual.') for k in keys)
  if has_mrcnn and has_glm:
    return 'sln'
  if has_mrcnn:
    cls = state_dict.get('classifier.linear_class.weight')
    conv5 = state_dict.get('mask.conv5.weight')
    if (
        model_cfg is not None
        and not model_cfg.glm.enabled
        and cls is not None
        and conv5 is not None
        and cls.shape[0] == model_cfg.num_classes
        and conv5.shape[0] == 1 + model_cfg.num_layers
    ):
      return 'sln'
    return 'maskrcnn'
  if any(_canonical_glm_key(k).startswith('base.') for k in keys):
    return 'deeplab'
  raise UserError(
      'cannot tell the checkpoint kind from its keys (expected '
      "'fpn.*', 'GLM_modual.*' or DeepLab 'base.*' names)",
      field='source',
  )


def _to_numpy(t) -> np.ndarray:
  """torch.Tensor or array -> numpy (floating types as float32)."""
  if hasattr(t, 'detach'):
    t = t.detach().cpu()
    if t.is_floating_point() and t.element_size() != 4:
      t = t.float()
    t = t.numpy()
  return np.asarray(t)


def to_flax_layout(kind: str, a: np.ndarray) -> np.ndarray:
  """One torch tensor (numpy) of ``kind`` -> the Flax leaf (float32)."""
  if kind == CONV:  # (O, I, H, W) -> (H, W, I, O)
    a = a.transpose(2, 3, 1, 0)
  elif kind == DECONV:  # (I, O, H, W) -> flipped (H, W, I, O)
    a = a.transpose(2, 3, 0, 1)[::-1, ::-1]
  elif kind == LINEAR:  # (O, I) -> (I, O)
    a = a.T
  return np.ascontiguousarray(a, dtype=np.float32)


def to_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
  """Inverse of ``to_flax_layout``."""
  if kind == CONV:
    a = a.transpose(3, 2, 0, 1)
  elif kind == DECONV:
    a = a[::-1, ::-1].transpose(2, 3, 0, 1)
  elif kind == LINEAR:
    a = a.T
  return np.ascontiguousarray(a, dtype=np.float32)


def matches_any(patterns: Sequence[str], *names: str) -> bool:
  return any(re.search(p, n) for p in patterns for n in names)


def set_path(tree: dict, path: Sequence[str], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def torch_to_flax(
    state_dict: Mapping,
    source: str,
    config,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    skip: Sequence[str] | None = None,
    path: str = '',
) -> dict:
  """Converts a release state_dict to {'params': ..., 'batch_stats': ...}.

  Args:
    state_dict: {key: torch.Tensor} (``module.`` prefixes allowed).
    source: 'sln' | 'deeplab' | 'maskrcnn' | 'auto'.
    config: the full config (or ``config.model``).
    allow_missing: regexes (searched in the torch key or the Flax path
      'params/backbone/...') of expected tensors that may be absent.
    allow_unexpected: regexes of extra torch keys to ignore.
    skip: regexes of torch keys present in the file but not converted (their
      Flax leaves are left out and not reported missing). None: the
      source's default (``MASKRCNN_SKIP`` for 'maskrcnn', else nothing).
    path: the file name, for error messages.

  Returns:
    Nested dicts of float32 numpy arrays with only the converted leaves
    (a 'deeplab' source yields only params/glm and batch_stats/glm).

  Raises:
    UserError: one error listing every missing key, unexpected key and
      shape mismatch.
  """
  model_cfg = config.model if hasattr(config, 'model') else config
  sd = {}
  for key, value in state_dict.items():
    while key.startswith('module.'):
      key = key[len('module.') :]
    sd[key] = value
  if source == 'auto':
    source = detect_source(sd, model_cfg)
  if skip is None:
    skip = MASKRCNN_SKIP if source == 'maskrcnn' else ()
  if source == 'deeplab':
    sd = {_canonical_glm_key(k): v for k, v in sd.items()}
  elif source == 'sln':
    sd = {
        (
            'GLM_modual.' + _canonical_glm_key(k[len('GLM_modual.') :])
            if k.startswith('GLM_modual.')
            else k
        ): v
        for k, v in sd.items()
    }
  entries = release_layout(model_cfg, source)
  expected = {e.key for e in entries}
  missing, mismatched = [], []
  out = {'params': {}, 'batch_stats': {}}
  for e in entries:
    if matches_any(skip, e.key):
      continue
    if e.key not in sd:
      if not matches_any(allow_missing, e.key, e.flax_name):
        missing.append(e.key)
      continue
    t = sd[e.key]
    if tuple(t.shape) != e.shape:
      mismatched.append(f'{e.key} {tuple(t.shape)} != expected {e.shape}')
      continue
    set_path(out[e.collection], e.path, to_flax_layout(e.kind, _to_numpy(t)))
  unexpected = [
      k
      for k in sd
      if k not in expected
      and not k.endswith('num_batches_tracked')
      and not matches_any(skip, k)
      and not matches_any(allow_unexpected, k)
  ]
  problems = []
  if missing:
    problems.append(listing('missing', missing))
  if unexpected:
    problems.append(listing('unexpected', unexpected))
  if mismatched:
    problems.append(listing('shape mismatches', mismatched))
  if problems:
    raise UserError(
        f'does not fit the {source!r} layout of this config: ' + '; '.join(problems),
        path=path,
        field='state_dict',
    )
  return out


def _get(tree: Mapping, path: Sequence[str]):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def flax_to_torch(
    variables: Mapping, config, source: str = 'sln', with_num_batches_tracked: bool = True
) -> dict:
  """Flax variables -> release state_dict {key: torch.Tensor} (float32).

  Every leaf of the source's layout must be present. With
  ``with_num_batches_tracked`` each BN also gets a zero
  ``num_batches_tracked`` so a strict ``load_state_dict`` accepts it.
  """
  import torch  # Conversion-only dependency.

  model_cfg = config.model if hasattr(config, 'model') else config
  out, missing = {}, []
  for e in release_layout(model_cfg, source):
    leaf = _get(variables.get(e.collection, {}), e.path)
    if leaf is None:
      missing.append(e.flax_name)
      continue
    a = to_torch_layout(e.kind, np.asarray(leaf))
    if a.shape != e.shape:
      missing.append(f'{e.flax_name} {a.shape} != {e.shape}')
      continue
    out[e.key] = torch.from_numpy(a)
    if with_num_batches_tracked and e.key.endswith('.running_var'):
      out[e.key[: -len('running_var')] + 'num_batches_tracked'] = torch.zeros((), dtype=torch.long)
  if missing:
    raise UserError(listing('missing or misshapen leaves', missing), field='variables')
  return out


def release_activations(variables: Mapping, x: np.ndarray, config) -> dict:
  """The release's intermediate tensors, computed by the converted network.

  Args:
    variables: {'params', 'batch_stats'} from ``torch_to_flax``.
    x: (N, 3, H, W) float32, already mean-subtracted, H and W multiples of 32.
    config: the config the variables were converted for.

  Returns float32 numpy arrays for the parts ``variables`` holds: c1..c5,
  p2..p6 (NCHW, c1 after the stem's max pool), rpn_class_logits (N, A, 2),
  rpn_bbox (N, A, 4) (level P2..P6, then row, column, anchor), glm_logits
  (N, classes, h, w) of x resized bilinearly to model.glm.image_size. Runs
  the SLN model's own submodules (sln_jax.models.sln).
  """

  model = sln.build_model(config)
  params = variables['params']
  g = config.model.glm.image_size
  nchw = lambda a: np.asarray(a, np.float32).transpose(0, 3, 1, 2)

  def features(mdl, img):
    c = mdl.backbone(img)
    p = mdl.fpn(c)
    return c, p, mdl.rpn([p[f'p{s}'] for s in range(2, 7)])

  def glm_logits(mdl, img):
    return mdl.glm(deeplab.resize_bilinear(img, g, g))['logits']

  img = jnp.asarray(x.transpose(0, 2, 3, 1))
  run = jax.jit(lambda v, i, fn: model.apply(v, i, method=fn), static_argnums=2)
  out = {}
  if all(k in params for k in ('backbone', 'fpn', 'rpn')):
    c, p, r = run(variables, img, features)
    out.update({k: nchw(v) for k, v in {**c, **p}.items()})
    out['rpn_class_logits'] = np.asarray(r['logits'], np.float32)
    out['rpn_bbox'] = np.asarray(r['deltas'], np.float32)
  if 'glm' in params and config.model.glm.enabled:
    out['glm_logits'] = nchw(run(variables, img, glm_logits))
  return out
