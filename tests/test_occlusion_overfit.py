"""Overfit check of SLN's occlusion outputs (issue: occlusion that is learnt).

Two scenes with the same three shapes in the same places, painted in
opposite depth orders, so shape alone cannot tell which object is in
front: only the pixels of the overlaps can. The tiny model in the demo's
form (softmax layers, occluded pixels weighted 3x) is trained on both to
convergence and scored by the real decode, paste, depth layering and
occlusion metric (``evaluation.occlusion``): every overlapping pair must
be ordered right and the occluded parts found (occluded-part mIoU >= 0.8).
"""

import functools

import jax
import numpy as np
import optax

from configs import tiny
from input_pipeline import records
from sln_jax.evaluation import occlusion
from sln_jax.evaluation import results as results_lib
from sln_jax.models import sln

S, K = 64, 16
FAST = {'xla_backend_optimization_level': 0}  # CPU compile time >> run time here
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230))


def _shapes() -> np.ndarray:
  """(3, S, S) bool: a rectangle, an ellipse and a rectangle, each pair
  overlapping."""
  yy, xx = np.mgrid[:S, :S]
  return np.stack(
      [
          (yy >= 8) & (yy < 30) & (xx >= 6) & (xx < 34),
          ((yy - 30) / 14.0) ** 2 + ((xx - 38) / 16.0) ** 2 <= 1,
          (yy >= 26) & (yy < 58) & (xx >= 12) & (xx < 30),
      ]
  )


def _scene(order):
  """The shapes painted back to front in reverse ``order`` (order[0] in
  front). Returns the training batch element, amodal (3, S, S) and visible
  (3, S, S) masks, and the depth rank of each shape."""
  amodal = _shapes()
  rank = np.empty(3, int)
  rank[list(order)] = np.arange(3)
  visible = amodal.copy()
  for i in range(3):
    for j in range(3):
      if rank[j] < rank[i]:
        visible[i] &= ~amodal[j]
  image = np.full((S, S, 3), 30, np.uint8)
  for i in reversed(order):
    image[amodal[i]] = COLOURS[i]
  boxes = np.zeros((4, 4), np.float32)
  layers = np.zeros((4, K, K, 2), np.float32)
  for i, m in enumerate(amodal):
    ys, xs = np.nonzero(m)
    y1, x1, y2, x2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    boxes[i] = (y1, x1, y2, x2)
    sy = np.round(y1 + np.arange(K) * (y2 - y1 - 1) / (K - 1)).astype(int)
    sx = np.round(x1 + np.arange(K) * (x2 - x1 - 1) / (K - 1)).astype(int)
    layers[i, :, :, 0] = visible[i][np.ix_(sy, sx)]
    layers[i, :, :, 1] = (m & ~visible[i])[np.ix_(sy, sx)]
  element = {
      'image': image,
      'glm_image': np.zeros((33, 33, 3), np.uint8),
      'image_shape': np.array([S, S], np.float32),
      'gt_boxes': boxes,
      'gt_classes': np.array([1, 1, 1, 0], np.int32),
      'gt_valid': np.array([True, True, True, False]),
      'gt_layers': layers,
  }
  return element, amodal, visible, rank


def test_two_scenes_with_opposite_depth_orders_are_learnt_to_the_pixel():
  scenes = [_scene((0, 1, 2)), _scene((2, 1, 0))]
  batch = {k: np.stack([s[0][k] for s in scenes]) for k in scenes[0][0]}
  cfg = tiny.get_config()
  cfg.model.num_layers = 2
  cfg.model.glm.enabled = False
  cfg.model.layer_activation = 'softmax'
  cfg.model.detection.nms_threshold = 0.5
  cfg.loss.occluded_pos_weight = 3.0
  model = sln.build_model(cfg)
  variables = sln.init_variables(model, jax.random.PRNGKey(0), S)
  params, stats = variables['params'], variables['batch_stats']
  steps = 500
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.05))

  def step(params, opt, key):
    def loss_fn(p):
      terms, _ = model.apply(
          {'params': p, 'batch_stats': stats}, batch, key, method='train_forward'
      )
      return terms['total']

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  opt = tx.init(params)
  key = jax.random.PRNGKey(0)
  step_c = jax.jit(step).lower(params, opt, key).compile(compiler_options=FAST)
  for i in range(steps):
    params, opt, loss = step_c(params, opt, jax.random.PRNGKey(i))
  assert np.isfinite(float(loss))

  v = {'params': params, 'batch_stats': stats}
  args = (batch['image'], batch['glm_image'], batch['image_shape'])
  infer = jax.jit(functools.partial(model.apply, method='infer'))
  out = jax.device_get(infer(v, *args))
  gt, dets = [], []
  for b, (_, amodal, visible, rank) in enumerate(scenes):
    gt.append(
        records.ImageAnnotation(
            b + 1,
            f'{b + 1}.png',
            S,
            S,
            [
                records.InstanceAnnotation(
                    amodal_rle=records.encode_mask(amodal[i]),
                    visible_rle=records.encode_mask(visible[i]),
                    occluded_rle=records.encode_mask(amodal[i] & ~visible[i]),
                    depth_rank=int(rank[i]),
                    occlude_rate=float(1 - visible[i].sum() / amodal[i].sum()),
                    is_stuff=False,
                    category_id=1,
                )
                for i in range(3)
            ],
        )
    )
    dets += results_lib.detections_to_results(
        b + 1, {k: x[b] for k, x in out.items()}, (1.0, 1.0), (S, S)
    )
  report = occlusion.occlusion_metrics(gt, dets)
  masks = report['masks']
  assert masks['matched'] == 6, report
  # Three overlapping pairs per scene, each ordered the other way round in
  # the other scene.
  assert report['depth_order']['pairs'] == 6, report
  assert report['depth_order']['accuracy'] == 1.0, report
  assert report['depth_order_votes']['accuracy'] == 1.0, report
  assert masks['occluded'] >= 4 and masks['occluded_miou'] >= 0.8, report
  assert masks['amodal_miou'] >= 0.85 and masks['visible_miou'] >= 0.85, report
