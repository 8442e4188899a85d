"""The demo's model trained longer on more scenes (docs/demo.md, "Longer
training").

``configs/synthetic.py`` with 2,000 generated training scenes (into
data/synthetic_long, prepared in data/tfds) and 2,400 steps of 10 images,
four times the demo's: the occluded layer's precision and recall are still
rising when the 600-step demo ends. Same model, loss and evaluation split
size (50 validation scenes of the same generator).
"""

import ml_collections

from configs import synthetic


def get_config() -> ml_collections.ConfigDict:
  c = synthetic.get_config()
  c.dataset.manual_dir = 'data/synthetic_long'
  c.dataset.synthetic.num_train = 2000
  c.input.shuffle_buffer = 2000
  t = c.train
  t.stages = (('all', 1920, 4e-2), ('all', 480, 8e-3))
  t.checkpoint_every = 600
  t.image_summary_every = 600
  return c
