"""SLN on COCOA-cls (COCOA with COCO's classes, from the D2SA authors), class-aware.

Raw data in data/cocoa next to COCOA, whose images it shares:
annotations/COCO_amodal_{train,val}2014_with_classes.json (or the release's
COCOA_annotations_detectron/ folder) and {train,val}2014/ images; prepared
TFDS data in data/tfds. Evaluated on val with the COCO protocol, per class.

Classes: the input pipeline uses each instance's ``category_id`` as its class
index and the detections carry the class index back as ``category_id``, so
``model.num_classes`` is 91 (background 0 plus COCO's sparse ids 1..90) and no
mapping is needed either way. The 11 ids COCO leaves unused are classes that
never occur in training; a contiguous 81-class head would save their 11 rows
of the box head but need a map in both directions.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset.name = 'cocoa_cls'
  c.dataset.manual_dir = 'data/cocoa'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val'
  c.dataset.category_agnostic = False
  c.model.num_classes = 91
  return c
