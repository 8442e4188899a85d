"""SLN on KINS (KITTI amodal instances); the release has no KINS support,
so this is the COCOA recipe on KINS data.

Raw data in data/kins (annotations/update_{train,test}_2020.json,
training/image_2 and testing/image_2). KINS has no validation split:
evaluation runs on 'test'. Images are about 1242 x 375: the 'pad' resize keeps
the aspect ratio (1024 x ~309 inside the 1024 canvas).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset.name = 'kins'
  c.dataset.manual_dir = 'data/kins'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.category_agnostic = True
  c.model.num_classes = 2
  return c
