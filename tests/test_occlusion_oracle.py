"""Oracle of the inference side of SLN's occlusion outputs (issue: occlusion
that is learnt, stages c and d).

Ground-truth layer maps of generated scenes, sampled on each object's box at
the mask head's output size as a perfect network would give them, go
through the real decode / paste (``detections_to_results``), pixel votes and
chained depth layers, and the real depth-order metric. Depth order must be
exact and the occluded parts (amodal minus visible) must come back close to
the truth, so a failure to learn them lies before this point (targets, loss,
the mask head), not in decoding.
"""

import numpy as np
from pycocotools import mask as mask_utils
import pytest
from scipy import ndimage

from input_pipeline import readers, synthetic
from sln_jax import semdist
from sln_jax.evaluation import occlusion, results


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('scenes'))
  synthetic.generate_split(out, 'val', 30, image_size=128, seed=5)
  return readers.load_annotations(
      'cocoa', synthetic.annotation_path(out, 'val'), synthetic.images_dir(out, 'val')
  )


def _decode(rle) -> np.ndarray:
  return mask_utils.decode(rle).astype(bool)


def _sample(channel: np.ndarray, box, m: int) -> np.ndarray:
  """(m, m) bilinear samples of ``channel`` on the box's first .. last pixel
  rows and columns (the geometry of the training targets and of the
  'aligned' paste)."""
  y1, x1, y2, x2 = box
  ys = y1 + np.arange(m) * (y2 - 1 - y1) / (m - 1)
  xs = x1 + np.arange(m) * (x2 - 1 - x1) / (m - 1)
  grid = np.meshgrid(ys, xs, indexing='ij')
  return ndimage.map_coordinates(channel.astype(np.float64), grid, order=1, mode='constant')


def _oracle_results(ann, mask_size: int, num_layers: int) -> list[dict]:
  """COCO results of a network whose layer probabilities are the ground
  truth's layer channels on each object's amodal box."""
  amodal = np.stack([_decode(i.amodal_rle) for i in ann.instances])
  occluded = np.stack([_decode(i.occluded_rle) for i in ann.instances])
  ranks = np.array([i.depth_rank for i in ann.instances])
  channels = semdist.layer_channels(semdist.layer_index_map(amodal, occluded, ranks), num_layers)
  boxes, probs = [], []
  for n, mask in enumerate(amodal):
    ys, xs = np.nonzero(mask)
    box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    boxes.append(box)
    probs.append(np.stack([_sample(c, box, mask_size) for c in channels[n]], -1))
  probs = np.stack(probs)
  dets = {
      'boxes': np.array(boxes, np.float64),
      'scores': np.ones(len(boxes)),
      'classes': np.ones(len(boxes), np.int32),
      'valid': np.ones(len(boxes), bool),
      'layer_probs': probs,
      'amodal_probs': np.clip(probs.sum(-1), 0, 1),
      'visible_probs': probs[..., 0],
  }
  return results.detections_to_results(ann.image_id, dets, (1.0, 1.0), (ann.height, ann.width))


@pytest.mark.parametrize(
    'mask_size,num_layers,min_iou', [(16, 2, 0.85), (32, 2, 0.95), (28, 3, 0.95)]
)
def test_ground_truth_layers_give_exact_depth_order_and_occluded_parts(
    scenes, mask_size, num_layers, min_iou
):
  all_results, ious = [], []
  for ann in scenes:
    got = _oracle_results(ann, mask_size, num_layers)
    all_results += got
    amodal = [_decode(i.amodal_rle) for i in ann.instances]
    for r in got:
      a, v = _decode(r['segmentation']), _decode(r['visible_mask'])
      n = int(np.argmax([(a & g).sum() / (a | g).sum() for g in amodal]))
      truth = _decode(ann.instances[n].occluded_rle) & amodal[n]
      if truth.sum() >= 20:
        ious.append(((a & ~v) & truth).sum() / ((a & ~v) | truth).sum())
  depth = occlusion.depth_order_accuracy(scenes, all_results)
  assert depth['pairs'] >= 100  # the scenes overlap enough to test the order
  assert depth['accuracy'] == 1.0 and depth['undecided'] == 0, depth
  assert len(ious) >= 50 and np.mean(ious) >= min_iou, (len(ious), np.mean(ious))
