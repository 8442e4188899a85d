"""config_checks: every shipped config passes; each bad value is one
UserError naming its field (before main.py reads data or writes files)."""

import importlib

import pytest

from configs import default
from sln_jax import config_checks
from sln_jax.errors import UserError

CONFIGS = ('default', 'cocoa', 'd2sa', 'kins', 'synthetic', 'synthetic_long', 'tiny')


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_configs_pass(name):
  config_checks.check_config(importlib.import_module(f'configs.{name}').get_config())


def set_path(config, field, value):
  *parents, leaf = field.split('.')
  for p in parents:
    config = config[p]
  config[leaf] = value


# (field, bad value, the field the error must name); each was a traceback or
# a silent misbehaviour before the check.
BAD = [
    ('model.dtype', 'bf16', 'model.dtype'),
    ('input.resize_mode', 'stretch', 'input.resize_mode'),
    ('input.image_size', 100, 'input.image_size'),  # not a multiple of 64: P6 shape mismatch
    ('input.image_size', 0, 'input.image_size'),
    ('input.max_instances', 0, 'input.max_instances'),  # trained on no objects at all
    ('model.num_layers', 0, 'model.num_layers'),
    ('model.num_layers', True, 'model.num_layers'),  # a bool is not a count
    ('model.backbone.stage_sizes', (1, 1), 'model.backbone.stage_sizes'),
    ('model.backbone.stage_sizes', (1, 0, 1, 1), 'model.backbone.stage_sizes'),
    ('model.rpn.anchor_scales', (8, 16, 32, 64), 'model.rpn.anchor_scales'),
    ('model.rpn.anchor_ratios', (), 'model.rpn.anchor_ratios'),
    ('model.rpn.negative_iou', 0.8, 'model.rpn.negative_iou'),  # above positive_iou 0.7
    ('model.rpn.nms_threshold', 0.0, 'model.rpn.nms_threshold'),
    ('model.roi.positive_ratio', 1.5, 'model.roi.positive_ratio'),
    ('model.roi.mask_size', 20, 'model.roi.mask_size'),
    ('model.glm.scales', (), 'model.glm.scales'),
    ('model.detection.max_detections', 0, 'model.detection.max_detections'),
    ('model.detection.nms_threshold', 1.5, 'model.detection.nms_threshold'),
    ('loss.layer', -1.0, 'loss.layer'),
    ('loss.occluded_pos_weight', 0.0, 'loss.occluded_pos_weight'),
    ('train.stages', (('heads(', 10, 0.1),), 'train.stages'),  # neither a stage nor a regex
    ('train.stages', (('heads', 'ten', 0.1),), 'train.stages'),
    ('train.stages', (('heads', 10, -0.1),), 'train.stages'),
    ('train.stages', (), 'train.stages'),
    ('train.batch_size', 0, 'train.batch_size'),
    ('train.momentum', 1.5, 'train.momentum'),
    ('eval.protocol', 'cocoa', 'eval.protocol'),
    ('eval.mask_paste', 'nearest', 'eval.mask_paste'),
    ('eval.mask_threshold', 1.0, 'eval.mask_threshold'),
    ('eval.batch_size', 0, 'eval.batch_size'),
    ('eval.host_workers', -2, 'eval.host_workers'),
    ('predict.score_threshold', -0.1, 'predict.score_threshold'),
    ('train.num_steps', -5, 'train.num_steps'),  # ran the whole schedule
    ('train.num_steps', 0, 'train.num_steps'),
    ('init_patterns', 'backbone/.*,(', 'init_patterns'),  # re.error after the data was built
    ('model.layer_activation', 'relu', 'model.layer_activation'),
]


@pytest.mark.parametrize('field,value,named', BAD)
def test_bad_value_names_its_field(field, value, named):
  c = default.get_config()
  set_path(c, field, value)
  with pytest.raises(UserError) as err:
    config_checks.check_config(c)
  assert err.value.field == named and '\n' not in str(err.value), str(err.value)


def test_edge_values_pass():
  """The ends each rule allows: no NMS (< 0), a zero loss weight, a GLM
  with any scales when it is off, the smallest canvas."""
  c = default.get_config()
  c.model.detection.nms_threshold = -1.0
  c.loss.amodal = 0.0
  c.model.glm.enabled = False
  c.model.glm.scales = ()
  c.input.image_size = 64
  c.model.rpn.negative_iou = c.model.rpn.positive_iou
  config_checks.check_config(c)
