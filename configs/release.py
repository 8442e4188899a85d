"""The release's preprocessing and post-processing, which converted weights
need to behave as trained (docs/release_compatibility.md). ``apply`` sets on a
config (configs/cocoa_release.py, configs/d2sa_release.py):

  input.resize_mode = 'squash'
      every image squashed to the 1024x1024 canvas, as the release's
      ``scipy.misc.imresize`` (the default keeps the aspect ratio and pads).
  model.glm.legacy_pixel_boxes = True
      detection boxes passed to the GLM crop in pixel units at inference, so
      the GLM features are almost all zero at test time, as in the release.
  model.detection.round_boxes = True
      detection boxes rounded to whole canvas pixels before the mask head.
  model.rpn.legacy_nms_plus_one = True
      proposal NMS on canvas-pixel boxes with one pixel added to every width
      and height (py-faster-rcnn's ``x2 - x1 + 1``).
  eval.mask_paste = 'release'
      the release's mask paste: probabilities byte-scaled by their own minimum
      and maximum, resized by PIL, cut at 128; boxes truncated when scaled back.
  eval.protocol = 'amodalapi'
      the release's evaluator, which skips images without detections.

The release's training quirks (``input.box_jitter``,
``train.legacy_sticky_freeze``) are not set here.
"""

import ml_collections


def apply(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the release's behaviour on ``c`` (in place) and returns it."""
  c.input.resize_mode = 'squash'
  c.model.glm.legacy_pixel_boxes = True
  c.model.detection.round_boxes = True
  c.model.rpn.legacy_nms_plus_one = True
  c.eval.mask_paste = 'release'
  c.eval.protocol = 'amodalapi'
  return c
