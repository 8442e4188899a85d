"""The embedded default (`make demo`): a small SLN on generated scenes.

Trains from scratch: 600 steps of 10 images, about 0.65 s a step on 2 CPU
cores (README: demo results; the global batch must divide over the devices,
so use --config.train.batch_size=8 on a host with 4 or 8 of them). Data:
generated on first use into data/synthetic (COCOA layout, 400 train / 50 val
images) and prepared as TFDS in data/tfds. Small ResNet (1,1,1,1) at
width 16, FPN 64, 128 x 128 canvas, no GLM (the COCO-Stuff semantics it
provides mean nothing on synthetic shapes), few proposals and ROIs, every
layer trained (there are no pretrained weights to protect) with trainable
BatchNorm (from scratch, frozen BN would be an identity and the network
unnormalized), NMS on at inference so duplicate detections do not cost
precision, the mask head's softmax form (`model.layer_activation`) and the
occluded layer's pixels weighted 3x in its loss (`loss.occluded_pos_weight`;
unweighted, that layer stays off everywhere for most of a 600-step run, so
depth order stays undecided).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  d = c.dataset
  d.name = 'synthetic'
  d.manual_dir = 'data/synthetic'
  d.data_dir = 'data/tfds'
  d.train_split = 'train'
  d.eval_split = 'val'
  d.synthetic.image_size = 128
  d.synthetic.num_train = 400
  d.synthetic.num_val = 50
  d.synthetic.seed = 0

  i = c.input
  i.image_size = 128
  i.max_instances = 8
  i.gt_mask_size = 32
  i.shuffle_buffer = 400

  m = c.model
  m.num_layers = 2  # visible layer + occluded layer: visible masks and depth order
  m.train_bn = True  # batch statistics in training (from scratch)
  m.backbone.stage_sizes = (1, 1, 1, 1)
  m.backbone.width = 16
  m.fpn_channels = 64
  m.rpn.anchor_scales = (8, 16, 32, 64, 128)
  m.rpn.conv_channels = 64
  m.rpn.pre_nms_topk = 300
  m.rpn.post_nms_topk_train = 100
  m.rpn.post_nms_topk_test = 100
  m.rpn.anchors_per_image = 128
  m.roi.rois_per_image = 32
  m.roi.mask_pool_size = 8
  m.roi.mask_size = 16
  m.box_head_channels = 128
  m.mask_head_channels = 64
  m.glm.enabled = False
  m.detection.max_detections = 20
  m.detection.nms_threshold = 0.5

  # One softmax over outside / visible / occluded (the release's sigmoids
  # teach the visible channel to fire on hidden pixels), the occluded
  # layer's pixels weighted 3x (docs/demo.md: "The occluded layer").
  m.layer_activation = 'softmax'
  c.loss.occluded_pos_weight = 3.0

  t = c.train
  t.batch_size = 10  # hosts with 4 or 8 devices: --config.train.batch_size=8
  t.warmup_steps = 50
  t.stages = (('all', 480, 4e-2), ('all', 120, 8e-3))
  t.log_every = 50
  t.checkpoint_every = 200
  t.keep_checkpoints = 2
  t.image_summary_every = 200

  c.eval.batch_size = 10
  return c
