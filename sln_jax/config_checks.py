"""Up-front checks of a config (configs/default.py's tree).

Every value that would otherwise fail deep inside tracing, inside tf.data, or
only after a whole training run fails here instead: one ``UserError`` naming
the field, raised by main.py before any data is read or any file written.
Each check states the rule that the code relying on the value assumes.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import ml_collections

from sln_jax import preprocess
from sln_jax.config_values import is_int, is_number
from sln_jax.errors import UserError
from sln_jax.evaluation import metrics as metrics_lib
from sln_jax.evaluation import results as results_lib
from sln_jax.training import schedule as schedule_lib

RESIZE_MODES = preprocess.RESIZE_MODES  # input.resize_mode
DTYPES = ('float32', 'bfloat16')  # model.dtype: the compute dtype
RESNET_STAGES = 4  # C2..C5
FPN_LEVELS = 5  # P2..P6: one anchor scale each
CANVAS_MULTIPLE = 64  # the stride of P6: every level tiles the canvas


def _one_of(value: Any, choices: Sequence[str], field: str) -> None:
  if value not in choices:
    raise UserError(f'{value!r} is not one of {", ".join(choices)}', field=field)


def _int_at_least(value: Any, low: int, field: str) -> None:
  if not is_int(value) or value < low:
    raise UserError(f'{value!r} is not an integer >= {low}', field=field)


def _in_range(
    value: Any,
    low: float,
    high: float,
    field: str,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """low <= value <= high; ``low_open`` / ``high_open`` exclude the ends."""
  ok = (
      is_number(value)
      and (value > low if low_open else value >= low)
      and (value < high if high_open else value <= high)
  )
  if not ok:
    raise UserError(
        f'{value!r} is not in {"(" if low_open else "["}{low}, {high}'
        f'{")" if high_open else "]"}',
        field=field,
    )


def _bool(value: Any, field: str) -> None:
  if not isinstance(value, bool):
    raise UserError(f'{value!r} is not True or False', field=field)


def _int_tuple(value: Any, length: int, field: str) -> None:
  """A tuple of ``length`` integers >= 1."""
  if (
      not isinstance(value, (tuple, list))
      or len(value) != length
      or not all(is_int(v) and v >= 1 for v in value)
  ):
    raise UserError(f'{value!r} is not {length} integers >= 1', field=field)


def _positive_numbers(value: Any, field: str, length: int = -1) -> None:
  """A non-empty tuple of numbers > 0 (exactly ``length`` of them if >= 0)."""
  if (
      not isinstance(value, (tuple, list))
      or not value
      or (length >= 0 and len(value) != length)
      or not all(is_number(v) and v > 0 for v in value)
  ):
    count = f'{length} ' if length >= 0 else ''
    raise UserError(f'{value!r} is not {count}numbers > 0', field=field)


def check_input(i: ml_collections.ConfigDict) -> None:
  """``config.input``."""
  _int_at_least(i.image_size, CANVAS_MULTIPLE, 'input.image_size')
  if i.image_size % CANVAS_MULTIPLE:
    raise UserError(
        f'{i.image_size} is not a multiple of {CANVAS_MULTIPLE} '
        '(the stride of the coarsest FPN level, P6)',
        field='input.image_size',
    )
  _one_of(i.resize_mode, RESIZE_MODES, 'input.resize_mode')
  _int_at_least(i.max_instances, 1, 'input.max_instances')
  _int_at_least(i.gt_mask_size, 1, 'input.gt_mask_size')
  _in_range(i.box_jitter, 0.0, 1.0, 'input.box_jitter')


def check_model(m: ml_collections.ConfigDict) -> None:
  """``config.model``."""
  _one_of(m.dtype, DTYPES, 'model.dtype')
  _int_at_least(m.num_classes, 2, 'model.num_classes')
  _int_at_least(m.num_layers, 1, 'model.num_layers')
  _int_tuple(m.backbone.stage_sizes, RESNET_STAGES, 'model.backbone.stage_sizes')
  _int_at_least(m.backbone.width, 1, 'model.backbone.width')
  _int_at_least(m.fpn_channels, 1, 'model.fpn_channels')
  r = m.rpn
  _positive_numbers(r.anchor_scales, 'model.rpn.anchor_scales', FPN_LEVELS)
  _positive_numbers(r.anchor_ratios, 'model.rpn.anchor_ratios')
  _int_at_least(r.anchor_stride, 1, 'model.rpn.anchor_stride')
  _in_range(r.positive_iou, 0.0, 1.0, 'model.rpn.positive_iou')
  _in_range(r.negative_iou, 0.0, r.positive_iou, 'model.rpn.negative_iou')
  _in_range(r.positive_fraction, 0.0, 1.0, 'model.rpn.positive_fraction', low_open=True)
  _in_range(r.nms_threshold, 0.0, 1.0, 'model.rpn.nms_threshold', low_open=True)
  for name in ('pre_nms_topk', 'post_nms_topk_train', 'post_nms_topk_test', 'anchors_per_image'):
    _int_at_least(r[name], 1, f'model.rpn.{name}')
  o = m.roi
  _int_at_least(o.rois_per_image, 1, 'model.roi.rois_per_image')
  _in_range(o.positive_ratio, 0.0, 1.0, 'model.roi.positive_ratio', low_open=True)
  _in_range(o.fg_iou, 0.0, 1.0, 'model.roi.fg_iou', low_open=True)
  _int_at_least(o.pool_size, 1, 'model.roi.pool_size')
  _int_at_least(o.mask_pool_size, 1, 'model.roi.mask_pool_size')
  if o.mask_size != 2 * o.mask_pool_size:
    raise UserError(
        f'{o.mask_size!r} is not twice model.roi.mask_pool_size '
        f'({o.mask_pool_size}): the mask head upsamples by 2',
        field='model.roi.mask_size',
    )
  _int_at_least(o.sampling_ratio, 1, 'model.roi.sampling_ratio')
  if m.glm.enabled:
    g = m.glm
    _int_tuple(g.stage_sizes, RESNET_STAGES, 'model.glm.stage_sizes')
    _positive_numbers(g.scales, 'model.glm.scales')
    _int_at_least(g.image_size, 1, 'model.glm.image_size')
    _int_at_least(g.num_classes, 1, 'model.glm.num_classes')
  _one_of(m.get('layer_activation', 'sigmoid'), ('sigmoid', 'softmax'), 'model.layer_activation')
  lm = m.get('layering_map')
  if lm is not None and lm.enabled:
    _int_at_least(lm.num_classes, 2, 'model.layering_map.num_classes')
    _int_at_least(lm.channels, 1, 'model.layering_map.channels')
  t = m.detection
  _int_at_least(t.max_detections, 1, 'model.detection.max_detections')
  _in_range(t.min_confidence, 0.0, 1.0, 'model.detection.min_confidence')
  if t.nms_threshold >= 0:  # < 0: no NMS
    _in_range(t.nms_threshold, 0.0, 1.0, 'model.detection.nms_threshold', low_open=True)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a UserError naming the first bad field of ``config`` (input,
  model, loss weights, train stages and counts, eval and predict settings)."""
  check_input(config.input)
  check_model(config.model)
  for term, weight in config.loss.items():
    if not is_number(weight) or weight < 0:
      raise UserError(f'{weight!r} is not a number >= 0', field=f'loss.{term}')
  if config.loss.get('occluded_pos_weight', 1.0) <= 0:
    raise UserError(
        f'{config.loss.occluded_pos_weight!r} is not > 0 (1 = release)',
        field='loss.occluded_pos_weight',
    )
  tc = config.train
  schedule_lib.schedule(config)  # each stage: (name or regex, steps >= 1, lr >= 0)
  _int_at_least(tc.batch_size, 1, 'train.batch_size')
  _int_at_least(tc.warmup_steps, 0, 'train.warmup_steps')
  _one_of(tc.get('optimizer', 'sgd'), ('sgd', 'adamw'), 'train.optimizer')
  _in_range(tc.momentum, 0.0, 1.0, 'train.momentum')
  e = config.eval
  metrics_lib.check_protocol(e.protocol, field='eval.protocol')
  _one_of(e.mask_paste, results_lib.MASK_PASTES, 'eval.mask_paste')
  _in_range(e.mask_threshold, 0.0, 1.0, 'eval.mask_threshold', low_open=True, high_open=True)
  _int_at_least(e.batch_size, 1, 'eval.batch_size')
  _int_at_least(e.host_workers, -1, 'eval.host_workers')
  _bool(e.get('box_prompted', False), 'eval.box_prompted')
  _bool(e.get('report', True), 'eval.report')
  _int_at_least(e.get('report_images', 6), 0, 'eval.report_images')
  _in_range(e.get('report_score', 0.5), 0.0, 1.0, 'eval.report_score')
  _in_range(config.predict.score_threshold, 0.0, 1.0, 'predict.score_threshold')
  for pattern in str(config.get('init_patterns', '')).split(','):
    try:
      re.compile(pattern.strip())
    except re.error as err:
      raise UserError(
          f'{pattern.strip()!r} is not a regular expression ({err})', field='init_patterns'
      ) from None
