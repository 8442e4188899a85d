"""Tiny SLN for tests: 64x64 canvas, ResNet (1,1,1,1) width 8, tiny GLM.

Same tree as configs/default.py (only sizes change), so every code path of
the full model runs, in seconds on a CPU.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.input.image_size = 64
  c.input.max_instances = 4
  c.input.gt_mask_size = 16

  m = c.model
  m.backbone.stage_sizes = (1, 1, 1, 1)
  m.backbone.width = 8
  m.fpn_channels = 16
  m.rpn.anchor_scales = (8, 16, 32, 64, 128)
  m.rpn.conv_channels = 32
  m.rpn.pre_nms_topk = 256
  m.rpn.post_nms_topk_train = 64
  m.rpn.post_nms_topk_test = 32
  m.rpn.anchors_per_image = 64
  m.roi.rois_per_image = 16
  m.roi.mask_pool_size = 8
  m.roi.mask_size = 16
  m.box_head_channels = 32
  m.mask_head_channels = 16

  g = m.glm
  g.stage_sizes = (1, 1, 1, 1)
  g.width = 4
  g.num_classes = 5
  g.atrous_rates = (1, 2, 3, 4)
  g.scales = (1.0, 0.5)
  g.image_size = 33

  m.detection.max_detections = 8

  c.train.batch_size = 1
  c.train.stages = (('all', 100, 1e-2),)
  c.eval.batch_size = 1
  return c
