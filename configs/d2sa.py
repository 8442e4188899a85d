"""SLN on D2S amodal (MVTec D2SA): ResNet-101 FPN + GLM, as released.

Raw data in data/d2sa (annotations/D2S_amodal_*.json and images/). SLN is
category-agnostic (one foreground class, ``model.num_classes = 2``); the
ground truth keeps D2SA's 60 category ids, so a class-aware variant
(``--config.dataset.category_agnostic=False --config.model.num_classes=61``)
trains on them and evaluation then also writes per_category.json.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset.name = 'd2sa'
  c.dataset.manual_dir = 'data/d2sa'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val'
  c.dataset.category_agnostic = True
  c.model.num_classes = 2
  return c
