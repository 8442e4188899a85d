"""SLN on COCOA (amodal COCO 2014) as released: ResNet-101 FPN + GLM.

Raw data in data/cocoa (annotations/COCO_amodal_{train,val,test}2014.json and
{train,val,test}2014/ images); prepared TFDS data in data/tfds. Category-
agnostic (one foreground class), evaluated on val with the COCO protocol
(``--config.eval.protocol=amodalapi`` to compare with published numbers).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset.name = 'cocoa'
  c.dataset.manual_dir = 'data/cocoa'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val'
  c.dataset.category_agnostic = True
  c.model.num_classes = 2
  return c
