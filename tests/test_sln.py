"""The whole SLN: full-size tracing and parameter count, tiny-model overfit,
frozen parts, bfloat16 inference and training gradients, and the legacy GLM
flag."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, tiny
from sln_jax import losses
from sln_jax.models import layer_metrics, sln
from tests import box_reference

FAST = {'xla_backend_optimization_level': 0}  # CPU compile time >> run time here


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST)


# ------------------------------------------------------------ release count
def release_state_dict_sizes(
    glm: bool = True, num_classes: int = 2, layers: int = 1
) -> tuple[int, int]:
  """(number of scalars, number of tensors) of the release's COCOA.pth
  state_dict (without num_batches_tracked), from its PyTorch architecture."""
  sizes = []
  conv = lambda o, i, k, bias=True: sizes.extend([o * i * k * k] + ([o] if bias else []))
  bn = lambda c: sizes.extend([c] * 4)  # weight, bias, running_mean, running_var
  # Matterport ResNet-101 (conv biases, BN after every conv).
  conv(64, 3, 7), bn(64)
  inplanes = 64
  for planes, blocks in zip((64, 128, 256, 512), (3, 4, 23, 3)):
    for b in range(blocks):
      conv(planes, inplanes, 1), bn(planes)
      conv(planes, planes, 3), bn(planes)
      conv(planes * 4, planes, 1), bn(planes * 4)
      if b == 0:
        conv(planes * 4, inplanes, 1), bn(planes * 4)
      inplanes = planes * 4
  for cin in (256, 512, 1024, 2048):  # FPN P2..P5 lateral + output
    conv(256, cin, 1), conv(256, 256, 3)
  conv(512, 256, 3), conv(6, 512, 1), conv(12, 512, 1)  # RPN
  conv(1024, 256, 7), bn(1024), conv(1024, 1024, 1), bn(1024)  # classifier
  sizes.extend([num_classes * 1024, num_classes, num_classes * 4 * 1024, num_classes * 4])
  conv(256, 256 + (183 if glm else 0), 3), bn(256)  # mask head
  for _ in range(3):
    conv(256, 256, 3), bn(256)
  sizes.extend([256 * 256 * 4, 256])  # deconv
  conv(1 + layers, 256, 1)
  if glm:  # DeepLab v2 ResNet-101, convs without bias, ASPP with bias
    conv(64, 3, 7, bias=False), bn(64)
    cin = 64
    for cout, blocks in zip((256, 512, 1024, 2048), (3, 4, 23, 3)):
      for k in range(blocks):
        mid = cout // 4
        conv(mid, cin, 1, False), bn(mid)
        conv(mid, mid, 3, False), bn(mid)
        conv(cout, mid, 1, False), bn(cout)
        if k == 0:
          conv(cout, cin, 1, False), bn(cout)
        cin = cout
    for _ in range(4):
      conv(182, 2048, 3)
  return sum(sizes), len(sizes)


def _abstract_batch(cfg, b=1):
  s, g, m = cfg.input.image_size, cfg.model.glm.image_size, cfg.input.max_instances
  k, l = cfg.input.gt_mask_size, cfg.model.num_layers
  sd = jax.ShapeDtypeStruct
  return {
      'image': sd((b, s, s, 3), jnp.uint8),
      'glm_image': sd((b, g, g, 3), jnp.uint8),
      'image_shape': sd((b, 2), jnp.float32),
      'gt_boxes': sd((b, m, 4), jnp.float32),
      'gt_classes': sd((b, m), jnp.int32),
      'gt_valid': sd((b, m), jnp.bool_),
      'gt_layers': sd((b, m, k, k, l), jnp.float32),
  }


def test_full_size_model_traces_and_matches_release_parameter_count():
  cfg = default.get_config()
  model = sln.build_model(cfg)
  shapes = sln.variable_shapes(model, cfg.input.image_size)
  total, tensors = release_state_dict_sizes()
  assert 115e6 < total < 125e6
  assert sln.count_parameters(shapes) == total
  assert len(jax.tree.leaves(shapes)) == tensors
  assert shapes['params']['mask_head']['conv1']['kernel'].shape == (3, 3, 439, 256)
  batch = _abstract_batch(cfg)
  losses, metrics = jax.eval_shape(
      functools.partial(model.apply, method='train_forward'), shapes, batch, jax.random.PRNGKey(0)
  )
  assert set(losses) == {
      'rpn_class',
      'rpn_bbox',
      'head_class',
      'head_bbox',
      'layer',
      'amodal',
      'layering_map',  # 0: the release has no layering-map head
      'total',
  }
  assert all(v.shape == () and v.dtype == jnp.float32 for v in losses.values())
  assert all(v.shape == () for v in metrics.values())
  out = jax.eval_shape(
      functools.partial(model.apply, method='infer'),
      shapes,
      batch['image'],
      batch['glm_image'],
      batch['image_shape'],
  )
  d = cfg.model.detection.max_detections
  assert out['boxes'].shape == (1, d, 4) and out['valid'].dtype == jnp.bool_
  assert out['layer_probs'].shape == (1, d, 32, 32, 1)
  assert out['amodal_probs'].shape == out['visible_probs'].shape == (1, d, 32, 32)
  glm_out = jax.eval_shape(
      functools.partial(model.apply, method=lambda m, x: m.glm(x)),
      shapes,
      jax.ShapeDtypeStruct((1, 513, 513, 3), jnp.float32),
  )
  assert glm_out['logits'].shape == (1, 65, 65, 182)
  assert glm_out['features'].shape == (1, 65, 65, 183)


def test_glm_disabled_removes_it():
  cfg = default.get_config()
  cfg.model.glm.enabled = False
  shapes = sln.variable_shapes(sln.build_model(cfg), cfg.input.image_size)
  assert 'glm' not in shapes['params'] and 'glm' not in shapes['batch_stats']
  assert sln.count_parameters(shapes) == release_state_dict_sizes(glm=False)[0]


# ------------------------------------------------------------ tiny model
S, K = 64, 16


def _scene(num_layers=1):
  """Three overlapping objects, back to front: a rectangle (2), an ellipse
  (1) and a rectangle (0), each in its own colour; the ellipse hides part of
  rectangle 2 and rectangle 0 part of the ellipse. gt_layers: the amodal
  mask (num_layers 1), or the visible and the occluded part (2).
  Returns (batch, amodal (3, S, S) bool, visible (3, S, S) bool)."""
  yy, xx = np.mgrid[:S, :S]
  amodal = np.stack(
      [
          (yy >= 8) & (yy < 30) & (xx >= 6) & (xx < 34),
          ((yy - 30) / 14.0) ** 2 + ((xx - 38) / 16.0) ** 2 <= 1,
          (yy >= 36) & (yy < 58) & (xx >= 10) & (xx < 28),
      ]
  )
  visible = amodal.copy()
  visible[1] &= ~amodal[0]
  visible[2] &= ~(amodal[0] | amodal[1])
  image = np.full((S, S, 3), 30, np.uint8)
  for i, color in ((2, (50, 80, 230)), (1, (40, 200, 60)), (0, (220, 40, 40))):
    image[amodal[i]] = color
  gt_boxes = np.zeros((4, 4), np.float32)
  layers = np.zeros((4, K, K, num_layers), np.float32)
  for i, m in enumerate(amodal):
    ys, xs = np.nonzero(m)
    y1, x1, y2, x2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    gt_boxes[i] = (y1, x1, y2, x2)
    # K x K samples whose corner samples sit on the box edges' pixels.
    sy = np.round(y1 + np.arange(K) * (y2 - y1 - 1) / (K - 1)).astype(int)
    sx = np.round(x1 + np.arange(K) * (x2 - x1 - 1) / (K - 1)).astype(int)
    if num_layers == 1:
      layers[i, :, :, 0] = m[np.ix_(sy, sx)]
    else:
      layers[i, :, :, 0] = visible[i][np.ix_(sy, sx)]
      layers[i, :, :, 1] = (m & ~visible[i])[np.ix_(sy, sx)]
  glm = image[::2, ::2][:33]
  glm = np.pad(glm, ((0, 33 - glm.shape[0]), (0, 33 - glm.shape[1]), (0, 0)), mode='edge')
  batch = {
      'image': image[None],
      'glm_image': glm[None],
      'image_shape': np.array([[S, S]], np.float32),
      'gt_boxes': gt_boxes[None],
      'gt_classes': np.array([[1, 1, 1, 0]], np.int32),
      'gt_valid': np.array([[True, True, True, False]]),
      'gt_layers': layers[None],
  }
  return batch, amodal, visible


def _paste(prob, box):
  """Bilinear paste of an (M, M) probability into its pixel box, >= 0.5."""
  m = prob.shape[0]
  y1, x1, y2, x2 = box
  c = np.arange(S) + 0.5
  ry = np.clip((c - y1) / max(y2 - y1, 1e-3) * m - 0.5, 0, m - 1)
  rx = np.clip((c - x1) / max(x2 - x1, 1e-3) * m - 0.5, 0, m - 1)
  y0, x0 = np.floor(ry).astype(int), np.floor(rx).astype(int)
  ya, xa = np.minimum(y0 + 1, m - 1), np.minimum(x0 + 1, m - 1)
  wy, wx = (ry - y0)[:, None], (rx - x0)[None]
  p = (prob[np.ix_(y0, x0)] * (1 - wx) + prob[np.ix_(y0, xa)] * wx) * (1 - wy) + (
      prob[np.ix_(ya, x0)] * (1 - wx) + prob[np.ix_(ya, xa)] * wx
  ) * wy
  inside = ((c >= y1) & (c < y2))[:, None] & ((c >= x1) & (c < x2))[None]
  return (p >= 0.5) & inside


def _iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_tiny_model_overfits_one_image_in_two_layers_and_frozen_parts_get_no_gradient():
  """Two sem-dist layers end to end: after 400 steps on one scene every
  object's amodal and visible masks are found, the ellipse's hidden part is
  decoded as occluded (amodal, not visible), and the predicted depth layers
  put rectangle 0 in front of the ellipse."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel

  from sln_jax.evaluation import results as results_lib  # pylint: disable=import-outside-toplevel

  cfg = tiny.get_config()
  cfg.model.num_layers = 2
  cfg.model.detection.nms_threshold = 0.5  # one detection per object
  # With the release's unweighted layer loss the occluded layer is learnt
  # late, and whether it is by step 400 hung on float rounding: an equal
  # but reordered BCE expression left 48 of the 107 hidden pixels visible at
  # one of three key offsets (0 at the others). Weighted 10x (as the demo),
  # 0 at all three with either expression.
  cfg.loss.occluded_pos_weight = 10.0
  model = sln.build_model(cfg)
  batch, amodal, visible = _scene(num_layers=2)
  variables = sln.init_variables(model, jax.random.PRNGKey(0), S)
  params, stats = variables['params'], variables['batch_stats']
  # Decayed to the end: at a constant 3e-3 Adam's loss still spikes now and
  # then, and where step 400 lands on a spike decided the outcome.
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, 400, alpha=0.05))

  def step(params, opt, key):
    def loss_fn(p):
      (terms, metrics), new_vars = model.apply(
          {'params': p, 'batch_stats': stats},
          batch,
          key,
          method='train_forward',
          mutable=['batch_stats'],
      )
      return terms['total'], (terms, new_vars)

    grads, (terms, new_vars) = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, terms, grads, new_vars

  opt = tx.init(params)
  key = jax.random.PRNGKey(0)
  step_c = _compile(step, params, opt, key)
  params, opt, terms, grads, new_vars = step_c(params, opt, key)
  first = float(terms['total'])
  # Frozen parts: no gradient reaches the GLM; BN statistics never change.
  glm_grads = jax.tree.leaves(grads['glm'])
  assert glm_grads and all(float(jnp.abs(g).max()) == 0.0 for g in glm_grads)
  assert float(jnp.abs(grads['backbone']['C1_conv']['kernel']).max()) > 0
  jax.tree.map(np.testing.assert_array_equal, new_vars['batch_stats'], stats)
  for i in range(1, 400):
    params, opt, terms, grads, _ = step_c(params, opt, jax.random.PRNGKey(i))
  last = float(terms['total'])
  # Once proposals hit the objects, the mask head (and the GLM input) train.
  assert float(jnp.abs(grads['mask_head']['conv1']['kernel']).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads['glm']))
  assert np.isfinite(last) and last * 5 <= first, (first, last)

  v = {'params': params, 'batch_stats': stats}
  args = (batch['image'], batch['glm_image'], batch['image_shape'])
  out = jax.device_get(_compile(functools.partial(model.apply, method='infer'), v, *args)(v, *args))
  assert out['valid'][0].sum() >= 3
  results = results_lib.detections_to_results(
      1, {k: x[0] for k, x in out.items()}, (1.0, 1.0), (S, S)
  )
  masks = [
      (
          mask_utils.decode(r['segmentation']).astype(bool),
          mask_utils.decode(r['visible_mask']).astype(bool),
          r['depth_layer'],
      )
      for r in results
  ]
  best = [max(range(len(masks)), key=lambda d, g=g: _iou(masks[d][0], amodal[g])) for g in range(3)]
  for g, d in enumerate(best):
    assert _iou(masks[d][0], amodal[g]) >= 0.7, (g, _iou(masks[d][0], amodal[g]))
    assert _iou(masks[d][1], visible[g]) >= 0.7, (g, _iou(masks[d][1], visible[g]))
  hidden = amodal[1] & ~visible[1]  # the ellipse behind rectangle 0
  amodal_1, visible_1, depth_1 = masks[best[1]]
  assert (amodal_1 & hidden).sum() >= 0.6 * hidden.sum()
  assert (visible_1 & hidden).sum() <= 0.25 * hidden.sum()
  assert masks[best[0]][2] < depth_1


def test_bfloat16_and_legacy_pixel_boxes_inference():
  cfg = tiny.get_config()
  cfg.model.dtype = 'bfloat16'
  batch, _, _ = _scene()
  model = sln.build_model(cfg)
  v = sln.init_variables(model, jax.random.PRNGKey(0), S)
  # Untrained: make every ROI a foreground detection.
  v['params']['box_head']['linear_class']['bias'] = jnp.array([0.0, 5.0])
  args = (batch['image'], batch['glm_image'], batch['image_shape'])
  run = lambda m: _compile(functools.partial(m.apply, method='infer'), v, *args)(v, *args)
  out = run(model)
  assert out['boxes'].shape == (1, 8, 4) and out['amodal_probs'].shape == (1, 8, 16, 16)
  # One layer (the release): the visible output is the amodal one.
  np.testing.assert_array_equal(out['visible_probs'], out['amodal_probs'])
  assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(out))
  # Legacy flag: pixel-unit boxes into the GLM crop change the masks only.
  cfg.model.glm.legacy_pixel_boxes = True
  legacy = run(sln.build_model(cfg))
  np.testing.assert_array_equal(legacy['boxes'], out['boxes'])
  valid = np.asarray(out['valid'][0])
  assert valid.all()
  assert not np.allclose(
      np.asarray(legacy['layer_probs'])[0, valid], np.asarray(out['layer_probs'])[0, valid]
  )


def _fixed_proposals(batch, n):
  """(1, n, 4) normalised proposals for :func:`_scene`'s batch: the three
  objects' boxes, the same shifted by a pixel, three boxes off the objects,
  then zeros (the first 9 are valid)."""
  gt = batch['gt_boxes'][0, :3].astype(np.float64) / S
  props = np.zeros((1, n, 4), np.float32)
  props[0, :3] = gt
  props[0, 3:6] = gt + np.array([1, -1, 1, 1]) / S
  props[0, 6:9] = np.array([[0, 40, 6, 46], [58, 50, 63, 63], [0, 0, 5, 5]]) / S
  return props


def _relative_errors(got, want):
  """Per top-level module: ||got - want|| / ||want|| over all its leaves
  (None where ``want`` is all zeros)."""
  out = {}
  for name in want:
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(want[name])])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(got[name])])
    norm = np.linalg.norm(a)
    out[name] = float(np.linalg.norm(b - a) / norm) if norm else None
  return out


def test_bfloat16_training_gradients_are_as_close_to_float32_as_bfloat16_weights_allow(monkeypatch):
  """model.dtype bfloat16 (params float32, compute bfloat16): every loss term
  stays float32 and within 1% of float32's, and each module's gradient is
  as close to the float32 gradient as the gradient moves in float32 when
  only the weights are rounded to bfloat16 (the error bfloat16 compute
  cannot avoid; at this random init the backbone gradient is ill-conditioned:
  ~5% either way). Fixed proposals on the objects make every head's loss
  and gradient non-zero."""
  from sln_jax.ops import proposals  # pylint: disable=import-outside-toplevel

  cfg = tiny.get_config()
  batch, _, _ = _scene()
  n = cfg.model.rpn.post_nms_topk_train
  props = _fixed_proposals(batch, n)
  monkeypatch.setattr(
      proposals, 'generate_proposals', lambda *a, **k: (jnp.asarray(props), jnp.arange(n)[None] < 9)
  )

  def gradient_fn(dtype):
    """(initial params, compiled params -> (gradient, loss terms))."""
    cfg.model.dtype = dtype
    model = sln.build_model(cfg)
    v = sln.init_variables(model, jax.random.PRNGKey(0), S)

    def loss(p):
      terms = model.apply(
          {'params': p, 'batch_stats': v['batch_stats']},
          batch,
          jax.random.PRNGKey(1),
          method='train_forward',
      )[0]
      return terms['total'], terms

    grad = _compile(jax.grad(loss, has_aux=True), v['params'])
    return v['params'], lambda p: jax.device_get(grad(p))

  params, grad32 = gradient_fn('float32')
  want, terms32 = grad32(params)
  got, terms16 = gradient_fn('bfloat16')[1](params)
  floor, _ = grad32(jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params))
  for k, t in terms32.items():
    assert terms16[k].dtype == np.float32
    np.testing.assert_allclose(terms16[k], t, rtol=1e-2, err_msg=k)
  assert all(g.dtype == np.float32 for g in jax.tree.leaves(got))
  err, floor_err = _relative_errors(got, want), _relative_errors(floor, want)
  assert err['glm'] is None and floor_err['glm'] is None  # frozen
  for name in ('backbone', 'fpn', 'rpn', 'box_head', 'mask_head'):
    assert err[name] <= 2 * floor_err[name] + 0.005, (name, err, floor_err)


def test_round_boxes_puts_detections_on_whole_canvas_pixels():
  """model.detection.round_boxes (release QUIRK): boxes rounded half to even
  before the mask head, so the masks are of the rounded boxes."""
  cfg = tiny.get_config()
  batch, _, _ = _scene()
  v = sln.init_variables(sln.build_model(cfg), jax.random.PRNGKey(1), S)
  v['params']['box_head']['linear_class']['bias'] = jnp.array([0.0, 5.0])
  args = (batch['image'], batch['glm_image'], batch['image_shape'])
  run = lambda m: jax.device_get(
      _compile(functools.partial(m.apply, method='infer'), v, *args)(v, *args)
  )
  plain = run(sln.build_model(cfg))
  cfg.model.detection.round_boxes = True
  rounded = run(sln.build_model(cfg))
  np.testing.assert_allclose(rounded['boxes'], np.round(plain['boxes']), atol=1e-4)
  np.testing.assert_allclose(rounded['boxes'], np.round(rounded['boxes']), atol=1e-4)
  assert np.abs(plain['boxes'] - np.round(plain['boxes'])).max() > 0.01  # not already whole
  assert not np.allclose(rounded['amodal_probs'], plain['amodal_probs'])


def _two_image_batch():
  """The scene and its mirror image with only its first object."""
  one, _, _ = _scene()
  other = jax.tree.map(
      lambda x: np.flip(x, axis=2) if x.ndim == 4 and x.shape[-1] == 3 else x, one
  )  # mirrored image, same targets
  other['gt_valid'] = np.array([[True, False, False, False]])  # one object only
  return jax.tree.map(lambda a, b: np.concatenate([a, b]), one, other)


def test_batched_train_forward_equals_mean_of_single_images():
  """What device-count independence rests on: a batch of two images with
  per-image keys gives the mean of each image's terms, metrics and
  gradients run alone with its key."""
  cfg = tiny.get_config()
  model = sln.build_model(cfg)
  batch = _two_image_batch()
  variables = sln.init_variables(model, jax.random.PRNGKey(0), S)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)

  def run(p, b, k):
    def loss(p):
      terms, metrics = model.apply(
          {'params': p, 'batch_stats': variables['batch_stats']}, b, k, method='train_forward'
      )
      return terms['total'], (terms, metrics)

    return jax.grad(loss, has_aux=True)(p)

  run_c = jax.jit(run)
  grads, (terms, metrics) = run_c(variables['params'], batch, keys)
  singles = [
      run_c(variables['params'], jax.tree.map(lambda x: x[i : i + 1], batch), keys[i : i + 1])
      for i in range(2)
  ]
  for name in terms:
    want = np.mean([float(s[1][0][name]) for s in singles])
    np.testing.assert_allclose(float(terms[name]), want, rtol=1e-4, atol=1e-6, err_msg=name)
  for name in metrics:
    want = np.mean([float(s[1][1][name]) for s in singles])
    np.testing.assert_allclose(float(metrics[name]), want, rtol=1e-5, err_msg=name)
  assert float(terms['total']) > 0
  want = jax.tree.map(lambda a, b: (a + b) / 2, singles[0][0], singles[1][0])
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(
        np.asarray(g),
        np.asarray(w),
        rtol=2e-3,
        atol=2e-5 * float(np.abs(w).max() + 1e-12),
        err_msg=jax.tree_util.keystr(path),
    )


def test_train_bn_step_uses_global_batch_statistics_on_any_device_split():
  """model.train_bn: one training step over 2 'devices' of one image each
  (vmap with the data-parallel axis name, as pmap) equals one device with
  both images: BN statistics are those of the global batch. The step moves
  the running statistics of the backbone and heads, trains BN scale/bias,
  and leaves the GLM's BN alone."""
  from sln_jax import parallel  # pylint: disable=import-outside-toplevel
  from sln_jax.training import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
  from sln_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from sln_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel

  cfg = tiny.get_config()
  cfg.model.train_bn = True
  cfg.model.bn_momentum = 0.5
  cfg.train.stages = (('all', 1, 0.05),)
  cfg.train.warmup_steps = 0
  model = sln.build_model(cfg)
  v = sln.init_variables(model, jax.random.PRNGKey(0), S)
  state = state_lib.create_train_state(cfg, v, jax.random.PRNGKey(5))
  mask = optimizer_lib.trainable_mask(v['params'], v['batch_stats'], 'all', train_bn=True)
  assert mask['backbone']['C1_bn']['scale'] and not mask['glm']['layer1_bn']['scale']
  step = jax.vmap(
      step_lib.make_stage_step(model, cfg, v['params'], v['batch_stats'], 'all'),
      axis_name=parallel.AXIS,
  )
  batch = _two_image_batch()
  out = {}
  for devices in (1, 2):
    states = jax.tree.map(lambda x: jnp.stack([x] * devices), state)
    split = jax.tree.map(lambda x: x.reshape((devices, 2 // devices) + x.shape[1:]), batch)
    new, metrics = _compile(step, states, split)(states, split)
    out[devices] = jax.tree.map(lambda x: np.asarray(x[0]), (new, metrics))
  (one, m1), (two, m2) = out[1], out[2]
  np.testing.assert_allclose(m2['loss/total'], m1['loss/total'], rtol=1e-5)
  assert np.isfinite(m1['loss/total'])
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(two.batch_stats), jax.tree.leaves(one.batch_stats)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for (path, a), b, p0 in zip(
      jax.tree_util.tree_leaves_with_path(two.params),
      jax.tree.leaves(one.params),
      jax.tree.leaves(v['params']),
  ):
    np.testing.assert_allclose(
        a - p0, b - p0, rtol=2e-3, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )
  bs0, bs1 = v['batch_stats'], one.batch_stats
  for module in (('backbone', 'C1_bn'), ('backbone', 'C5_0', 'bn3'), ('box_head', 'bn1')):
    before, after = bs0, bs1
    for k in module:
      before, after = before[k], after[k]
    assert not np.allclose(before['mean'], after['mean']), module
  jax.tree.map(np.testing.assert_array_equal, bs1['glm'], bs0['glm'])
  assert not np.array_equal(
      one.params['backbone']['C1_bn']['scale'], v['params']['backbone']['C1_bn']['scale']
  )
  jax.tree.map(np.testing.assert_array_equal, one.params['glm'], v['params']['glm'])


def test_layer_pixel_counts_over_positive_rois_mean_over_images():
  """The per-layer pixel counts behind the training log's layer recall and
  precision, against a numpy loop; non-positive ROIs count nothing."""
  rng = np.random.default_rng(0)
  b, r, m, layers = 2, 3, 4, 2
  logits = rng.normal(size=(b, r, m, m, layers)).astype(np.float32)
  targets = rng.random((b, r, m, m, layers)).astype(np.float32)
  positive = np.array([[True, False, True], [False, False, False]])
  got = jax.jit(layer_metrics.layer_pixel_counts)(logits, targets, positive)
  assert sorted(got) == sorted(
      f'layer{k}_{n}_px' for k in (1, 2) for n in ('hit', 'target', 'pred')
  )
  for k in range(layers):
    hit = tgt = prd = 0
    for i in range(b):
      for j in range(r):
        if positive[i, j]:
          p, t = logits[i, j, ..., k] > 0, targets[i, j, ..., k] >= 0.5
          hit, tgt, prd = hit + np.sum(p & t), tgt + np.sum(t), prd + np.sum(p)
    # Image 1 has no positive ROI: it counts 0 and halves the mean.
    np.testing.assert_allclose(float(got[f'layer{k + 1}_hit_px']), hit / b)
    np.testing.assert_allclose(float(got[f'layer{k + 1}_target_px']), tgt / b)
    np.testing.assert_allclose(float(got[f'layer{k + 1}_pred_px']), prd / b)
    assert 0 < hit < min(tgt, prd)


def test_layer_pixel_counts_of_the_softmax_form_count_the_argmax_class():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(1, 2, 4, 4, 3)).astype(np.float32)
  targets = rng.random((1, 2, 4, 4, 2)).astype(np.float32)
  positive = np.array([[True, True]])
  got = layer_metrics.layer_pixel_counts(logits, targets, positive, 'softmax')
  winner = np.argmax(logits, -1)
  for k in (1, 2):
    p, t = winner == k, targets[..., k - 1] >= 0.5
    np.testing.assert_allclose(float(got[f'layer{k}_hit_px']), np.sum(p & t))
    np.testing.assert_allclose(float(got[f'layer{k}_pred_px']), np.sum(p))


def test_softmax_form_keeps_the_background_channel_and_uses_the_softmax_losses(monkeypatch):
  """``model.layer_activation='softmax'``: the mask head's channel 0 (unused
  by the release) is the outside-the-object class; training calls the
  softmax losses on all 1 + L channels and inference decodes them with
  ``semdist.decode_layer_logits``."""
  seen = {}
  for name in ('softmax_layer_loss', 'softmax_amodal_loss'):
    real = getattr(losses, name)
    monkeypatch.setattr(
        losses,
        name,
        lambda logits, *a, _real=real, _name=name, **k: (
            seen.__setitem__(_name, logits.shape),
            _real(logits, *a, **k),
        )[1],
    )
  cfg = tiny.get_config()
  cfg.model.num_layers = 2
  cfg.model.layer_activation = 'softmax'
  batch, _, _ = _scene(num_layers=2)
  model = sln.build_model(cfg)
  variables = jax.eval_shape(lambda: sln.init_variables(model, jax.random.PRNGKey(0), S))
  assert variables['params']['mask_head']['conv5']['kernel'].shape[-1] == 3
  terms = jax.eval_shape(
      lambda v: model.apply(v, batch, jax.random.PRNGKey(1), method='train_forward')[0], variables
  )
  m = cfg.model.roi.mask_size
  assert seen['softmax_layer_loss'][-3:] == (m, m, 3)
  assert seen['softmax_amodal_loss'][-3:] == (m, m, 3)
  assert set(losses.TERMS) <= set(terms)
  out = jax.eval_shape(
      lambda v: model.apply(
          v, batch['image'], batch['glm_image'], batch['image_shape'], method='infer'
      ),
      variables,
  )
  assert out['layer_probs'].shape[-1] == 2 and out['visible_probs'].shape[-1] == m


def test_occluded_pos_weight_travels_from_the_config_to_the_layer_loss(monkeypatch):
  """``config.loss.occluded_pos_weight`` reaches ``losses.layer_loss``
  (release default 1); a ``loss_weights`` override wins. (The weighting
  itself: tests/test_losses.py against torch's pos_weight.)"""
  seen = []
  real = losses.layer_loss
  monkeypatch.setattr(
      losses,
      'layer_loss',
      lambda *a, occluded_pos_weight=1.0: (
          seen.append(occluded_pos_weight),
          real(*a, occluded_pos_weight=occluded_pos_weight),
      )[1],
  )
  cfg = tiny.get_config()
  cfg.model.num_layers = 2
  batch, _, _ = _scene(num_layers=2)
  for weight, override in ((None, None), (6.0, None), (6.0, 2.5)):
    if weight is not None:
      cfg.loss.occluded_pos_weight = weight
    model = sln.build_model(cfg)
    variables = jax.eval_shape(lambda: sln.init_variables(model, jax.random.PRNGKey(0), S))
    weights = None if override is None else dict(cfg.loss, occluded_pos_weight=override)
    jax.eval_shape(
        lambda v: model.apply(v, batch, jax.random.PRNGKey(1), weights, method='train_forward'),
        variables,
    )
  assert seen == [1.0, 6.0, 2.5]


def test_mask_targets_are_framed_by_the_layer_crop_boxes(monkeypatch):
  """train_forward reads gt_layers in the frame of gt_layer_boxes (the
  tight boxes they were cropped to; gt_boxes when absent), while gt_boxes
  (jittered with input.box_jitter) drive matching and box deltas only."""
  cfg = tiny.get_config()
  model = sln.build_model(cfg)
  batch, _, _ = _scene()
  n = cfg.model.rpn.post_nms_topk_train
  # Proposals on the three objects, so that there are positive ROIs.
  props = np.zeros((1, n, 4), np.float32)
  props[0, :3] = batch['gt_boxes'][0, :3] / S
  props[0, 3:6] = (batch['gt_boxes'][0, :3] + [1, -1, 1, 1]) / S
  valid = np.arange(n)[None] < 6
  monkeypatch.setattr(
      sln.SLN, '_proposals', lambda self, *a: (jnp.asarray(props), jnp.asarray(valid))
  )
  variables = sln.init_variables(model, jax.random.PRNGKey(0), S)
  fwd = lambda v, b: model.apply(v, b, jax.random.PRNGKey(1), method='train_forward')[0]
  same = dict(batch, gt_layer_boxes=batch['gt_boxes'])
  moved = batch['gt_boxes'].copy()
  moved[0, :3] += np.array([3, 3, -3, -3], np.float32)
  run = _compile(fwd, variables, same)
  base = jax.device_get(run(variables, same))
  other = jax.device_get(run(variables, dict(batch, gt_layer_boxes=moved)))
  absent = jax.device_get(_compile(fwd, variables, batch)(variables, batch))
  assert base['layer'] > 0
  for name in base:
    np.testing.assert_array_equal(absent[name], base[name], err_msg=name)
  for name in ('rpn_class', 'rpn_bbox', 'head_class', 'head_bbox'):
    np.testing.assert_array_equal(other[name], base[name], err_msg=name)
  assert other['layer'] != base['layer'] and other['amodal'] != base['amodal']


def _decode_clip(rois, deltas, std, window):
  """numpy apply_box_deltas (y2 = y1 + h) and clip to window (y1, x1, y2, x2)."""
  d = deltas * np.asarray(std)
  h, w = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
  cy, cx = rois[:, 0] + (0.5 + d[:, 0]) * h, rois[:, 1] + (0.5 + d[:, 1]) * w
  h, w = h * np.exp(d[:, 2]), w * np.exp(d[:, 3])
  y1, x1 = cy - 0.5 * h, cx - 0.5 * w
  boxes = np.stack([y1, x1, y1 + h, x1 + w], -1)
  return np.clip(boxes, np.tile(window[:2], 2), np.tile(window[2:], 2)), boxes


@pytest.mark.parametrize('round_boxes', [False, True])
def test_infer_follows_the_documented_pipeline(round_boxes):
  """infer against the pipeline rebuilt from its pieces: detections are the
  valid proposals' foreground ROIs by decreasing score, refined by their
  class's deltas and clipped to the image_shape window (h != w; rounded to
  whole pixels with round_boxes); the masks are the mask head's on exactly
  those boxes (normalised for the GLM crop too); layer = sigmoid(logits),
  amodal = sigmoid(sum of the layer logits), visible = sigmoid(layer 1);
  unused slots are zero."""
  cfg = tiny.get_config()
  m = cfg.model
  m.num_layers = 2
  m.rpn.post_nms_topk_test = 256  # NMS leaves proposal slots empty
  m.detection.max_detections = 256  # room for every foreground ROI
  m.detection.round_boxes = round_boxes
  model = sln.build_model(cfg)
  batch, _, _ = _scene(num_layers=2)
  v = sln.init_variables(model, jax.random.PRNGKey(2), S)
  # Untrained, nearly every ROI is background: about half foreground instead.
  v['params']['box_head']['linear_class']['kernel'] *= 4.0
  v['params']['box_head']['linear_class']['bias'] = jnp.array([0.0, 3.0])
  shape = np.array([[40, 24]], np.float32)
  args = (batch['image'], batch['glm_image'], shape)
  out = jax.device_get(_compile(functools.partial(model.apply, method='infer'), v, *args)(v, *args))

  def pieces(mdl, image):
    pyramid, rpn_out = mdl._features(image)  # pylint: disable=protected-access
    rois, valid = mdl._proposals(rpn_out, S, 256)  # pylint: disable=protected-access
    head = mdl._box_head(pyramid, rois, S)  # pylint: disable=protected-access
    return rois, valid, head['probs'], head['deltas']

  run = functools.partial(model.apply, method=pieces)
  rois, rois_valid, probs, deltas = (
      np.asarray(a, np.float64)[0]
      for a in jax.device_get(_compile(run, v, batch['image'])(v, batch['image']))
  )
  cls = probs.argmax(-1)
  score = probs.max(-1)
  keep = (rois_valid > 0) & (cls > 0)
  assert 30 < keep.sum() < rois_valid.sum() < 256
  assert np.abs(probs[:, 1] - probs[:, 0]).min() > 1e-4  # no near-ties to flip
  window = np.array([0, 0, 40 / S, 24 / S])
  boxes, unclipped = _decode_clip(rois, deltas[np.arange(len(cls)), cls], m.roi.bbox_std, window)
  order = np.flatnonzero(keep)[np.argsort(-score[keep], kind='stable')]
  n = len(order)
  want = boxes[order] * S
  if round_boxes:
    want = np.round(want)
  valid = out['valid'][0]
  assert valid.sum() == n and valid[:n].all()
  np.testing.assert_allclose(out['scores'][0, :n], score[order], rtol=1e-5)
  np.testing.assert_array_equal(out['classes'][0, :n], cls[order])
  np.testing.assert_allclose(out['boxes'][0, :n], want, atol=2e-3)
  assert (unclipped[order, 2] * S > 40.5).any() and (unclipped[order, 3] * S > 24.5).any()
  for name in ('boxes', 'scores', 'classes', 'layer_probs', 'amodal_probs', 'visible_probs'):
    assert not np.any(out[name][0, n:]), name

  def masks(mdl, image, glm_image, boxes):
    pyramid, _ = mdl._features(image)  # pylint: disable=protected-access
    glm = mdl._glm_features(glm_image)  # pylint: disable=protected-access
    return mdl._mask_head(pyramid, glm, boxes, boxes, S)  # pylint: disable=protected-access

  run = functools.partial(model.apply, method=masks)
  boxes = jnp.asarray(out['boxes'] / S, jnp.float32)
  logits = np.asarray(
      jax.device_get(
          _compile(run, v, batch['image'], batch['glm_image'], boxes)(
              v, batch['image'], batch['glm_image'], boxes
          )
      ),
      np.float64,
  )[0, :n]
  sig = lambda x: 1 / (1 + np.exp(-x))
  tol = dict(rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out['layer_probs'][0, :n], sig(logits), **tol)
  np.testing.assert_allclose(out['amodal_probs'][0, :n], sig(logits.sum(-1)), **tol)
  np.testing.assert_allclose(out['visible_probs'][0, :n], sig(logits[..., 0]), **tol)
  assert np.abs(sig(logits.sum(-1)) - sig(logits[..., 0])).max() > 0.05


def test_train_forward_feeds_the_sampled_rois_to_the_heads_and_losses(monkeypatch):
  """Fixed proposals (6 on the objects, 3 off them): the GLM crop reads the
  mask head's ROIs, which are the box head's first slots, normalised; the
  layer and amodal losses count exactly the slots whose IoU with a GT is
  >= fg_iou, and so does the mask head's batch-mode BN (the box head's:
  every sampled slot); head_bbox reads the true class's deltas (class 1
  predicts 2, class 0 nothing), against numpy box targets; and the ROIs
  are constants: no gradient of the head and mask losses reaches the RPN
  through them (as the release's crop_and_resize, which has none for its
  boxes)."""
  from sln_jax.ops import roi_align  # pylint: disable=import-outside-toplevel

  cfg = tiny.get_config()
  model = sln.build_model(cfg)
  batch, _, _ = _scene()
  n = cfg.model.rpn.post_nms_topk_train
  props = _fixed_proposals(batch, n)
  gt = batch['gt_boxes'][0, :3].astype(np.float64) / S
  from sln_jax.ops import proposals  # pylint: disable=import-outside-toplevel
  # The proposals move (by < 0.01 px) with the RPN deltas: a gradient path.
  monkeypatch.setattr(
      proposals,
      'generate_proposals',
      lambda scores, deltas, *a, **k: (
          props + 1e-4 * jnp.tanh(deltas[:, :n]),
          jnp.arange(n)[None] < 9,
      ),
  )
  seen = {}
  real_crop, real_pool = roi_align.crop_and_resize, roi_align.multilevel_crop_and_resize
  real_layer, real_amodal = losses.layer_loss, losses.amodal_loss

  def crop(feats, boxes, size):
    seen['glm'] = boxes
    return real_crop(feats, boxes, size)

  def pool(pyramid, rois, size, **kw):
    seen[f'pool{size}'] = rois
    return real_pool(pyramid, rois, size, **kw)

  def layer(logits, targets, positive, **kw):
    seen['layer_positive'] = positive
    return real_layer(logits, targets, positive, **kw)

  def amodal(logits, targets, positive):
    seen['amodal_positive'] = positive
    return real_amodal(logits, targets, positive)

  real_box, real_mask = sln.SLN._box_head, sln.SLN._mask_head

  def box_head(self, *a, mask=None):
    seen['box_bn_mask'] = mask
    return real_box(self, *a, mask=mask)

  def mask_head(self, *a, mask=None, **kw):
    seen['mask_bn_mask'] = mask
    return real_mask(self, *a, mask=mask, **kw)

  monkeypatch.setattr(sln.SLN, '_box_head', box_head)
  monkeypatch.setattr(sln.SLN, '_mask_head', mask_head)
  monkeypatch.setattr(roi_align, 'crop_and_resize', crop)
  monkeypatch.setattr(roi_align, 'multilevel_crop_and_resize', pool)
  monkeypatch.setattr(losses, 'layer_loss', layer)
  monkeypatch.setattr(losses, 'amodal_loss', amodal)
  v = sln.init_variables(model, jax.random.PRNGKey(0), S)
  bbox = v['params']['box_head']['linear_bbox']
  bbox['kernel'] = jnp.zeros_like(bbox['kernel'])
  bbox['bias'] = jnp.array([0.0] * 4 + [2.0] * 4)  # (class, coordinate)

  def fwd(params, b):
    def heads_loss(p):
      seen.clear()
      terms = model.apply(
          {'params': p, 'batch_stats': v['batch_stats']},
          b,
          jax.random.PRNGKey(1),
          method='train_forward',
      )[0]
      return sum(terms[k] for k in ('head_class', 'head_bbox', 'layer', 'amodal')), (
          terms,
          dict(seen),
      )

    grads, aux = jax.grad(heads_loss, has_aux=True)(params)
    return grads, aux

  grads, (terms, got) = jax.device_get(_compile(fwd, v['params'], batch)(v['params'], batch))
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads['rpn']))
  assert float(np.abs(grads['box_head']['conv1']['kernel']).max()) > 0
  assert float(np.abs(grads['mask_head']['conv1']['kernel']).max()) > 0
  got = {k: np.asarray(x)[0] for k, x in got.items()}
  o = cfg.model.roi
  npos = int(o.rois_per_image * o.positive_ratio)
  box_rois, mask_rois = got[f'pool{o.pool_size}'], got[f'pool{o.mask_pool_size}']
  assert box_rois.shape == (o.rois_per_image, 4) and mask_rois.shape == (npos, 4)
  np.testing.assert_array_equal(mask_rois, box_rois[:npos])
  np.testing.assert_array_equal(got['glm'], mask_rois)
  assert box_rois.max() <= 1.0
  iou = box_reference.iou(box_rois.astype(np.float64), gt)
  positive = iou.max(1) >= o.fg_iou
  sampled = box_rois[:npos, 2] > box_rois[:npos, 0]
  assert positive.sum() == 6 and sampled.sum() > 6  # negatives among the mask slots
  np.testing.assert_array_equal(got['layer_positive'], positive[:npos])
  np.testing.assert_array_equal(got['amodal_positive'], positive[:npos])
  # model.train_bn: the box head's BN counts the sampled ROIs, the mask head's the positives.
  np.testing.assert_array_equal(got['box_bn_mask'], box_rois[:, 2] > box_rois[:, 0])
  np.testing.assert_array_equal(got['mask_bn_mask'], positive[:npos])
  r, g = box_rois[positive].astype(np.float64), gt[iou[positive].argmax(1)]
  rh, rw, gh, gw = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1], g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  t = np.stack(
      [
          (g[:, 0] + 0.5 * gh - r[:, 0] - 0.5 * rh) / rh,
          (g[:, 1] + 0.5 * gw - r[:, 1] - 0.5 * rw) / rw,
          np.log(gh / rh),
          np.log(gw / rw),
      ],
      -1,
  ) / np.asarray(o.bbox_std)
  d = np.abs(2.0 - t)
  want = np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))
  np.testing.assert_allclose(terms['head_bbox'], want, rtol=1e-4)
