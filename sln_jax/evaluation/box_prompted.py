"""Box-prompted evaluation: masks of the ground-truth boxes, scored per object.

The protocol of the box-prompted amodal methods (C2F-Seg, the amodal SAM
papers): every ground-truth object's box is given, the network predicts the
object's masks inside it (``SLN.infer_boxes``), and the report is the mean
IoU over ground-truth objects of the amodal mask, the visible mask and the
occluded part (amodal minus visible; scored where the ground truth hides at
least ``occlusion.MIN_OCCLUDED_PX`` pixels), as ``occlusion.mask_quality``
scores matched detections (``occlusion.object_quality``), overall and by
the occlusion subsets of ``metrics.SUBSETS`` (ground-truth ``occlude_rate``,
both ends inclusive).

Pairing: an eval batch holds each image's instances in the pipeline's order
(``input_pipeline.pipeline.preprocess_example``: the annotation's instances
sorted by ``depth_rank``, stable, cut to ``input.max_instances``, padded;
``gt_valid`` False on padding and on instances with an empty amodal mask).
:func:`instance_slots` rebuilds that order from the annotation, and
:func:`check_slots` refuses a batch whose depth ranks, validity or boxes do
not fit it. Objects cut by ``input.max_instances`` and objects with an empty
amodal mask get no prompt; they are counted (``unscored_objects``), not
scored.

Coordinates: ``gt_boxes`` are canvas pixels (y1, x1, y2, x2), y2/x2
exclusive (the tight amodal-mask box times ``image_scale``; eval batches are
never jittered); masks are pasted into original pixels as
``loops.evaluate`` pastes detections (``results.detections_to_results``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from sln_jax import host_workers
from sln_jax.errors import UserError
from sln_jax.evaluation import loops, occlusion
from sln_jax.evaluation import metrics as metrics_lib
from sln_jax.evaluation.results_check import as_rle
from sln_jax.files import atomic_output_file
from sln_jax.parallel import AXIS, Batch, PyTree, replicate, shard
from sln_jax.training.step import make_box_prompted_infer_fn
from sln_jax.writers import MetricWriter

# What the model reads from an eval batch.
INPUT_KEYS = ('image', 'glm_image', 'image_shape', 'gt_boxes', 'gt_valid', 'gt_classes')
# What the host reads to pair slots with ground-truth objects.
META_KEYS = ('image_id', 'image_scale', 'is_valid', 'gt_boxes', 'gt_valid', 'gt_depth_rank')
SUBSETS = ('none', 'partial', 'heavy')  # reported besides 'all' (metrics.SUBSETS ranges)
BOX_TOLERANCE_PX = 0.01  # original pixels: float32 canvas boxes divided by image_scale


def instance_slots(ann, max_instances: int) -> np.ndarray:
  """(max_instances,) int: the index into ``ann.instances`` of the object in
  each batch slot, -1 past the last: the pipeline's order (``depth_rank``
  ascending, ties in annotation order, the first ``max_instances``)."""
  ranks = np.asarray([int(i.depth_rank) for i in ann.instances], np.int64)
  order = np.argsort(ranks, kind='stable')[:max_instances]
  out = np.full(max_instances, -1, np.int64)
  out[: len(order)] = order
  return out


def _amodal_box(ann, g: int) -> Optional[np.ndarray]:
  """(4,) float64 (y1, x1, y2, x2) original pixels, y2/x2 exclusive, of
  instance ``g``'s amodal mask; None when the mask is empty."""
  rle = as_rle(
      ann.instances[g].amodal_rle,
      ann.height,
      ann.width,
      'ground truth',
      f'image {int(ann.image_id)}.amodal_rle',
  )
  if not mask_utils.area(rle):
    return None
  x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
  return np.array([y, x, y + h, x + w])


def check_slots(ann, slots: np.ndarray, item: Mapping[str, np.ndarray]) -> np.ndarray:
  """The slots of one eval-batch image that hold a scorable object.

  Args:
    ann: the image's records.ImageAnnotation.
    slots: :func:`instance_slots` (M,).
    item: the image's gt_boxes (M, 4) canvas pixels, gt_valid (M,),
      gt_depth_rank (M,) and image_scale (2,).

  Returns:
    (M,) int: ``slots`` where ``gt_valid``, -1 elsewhere.

  Raises:
    UserError (field dataset.eval_annotations): a slot whose depth rank,
    validity (a non-empty amodal mask) or box (``gt_boxes / image_scale``
    against the amodal mask's box, within BOX_TOLERANCE_PX) is not the
    ground truth's: the prepared eval split and the annotation file differ.
  """
  sy, sx = (float(v) for v in item['image_scale'])
  valid = np.asarray(item['gt_valid'], bool)
  for j, g in enumerate(slots.tolist()):
    where = f'image {int(ann.image_id)}, batch slot {j}'
    if g < 0:
      if valid[j]:
        raise UserError(
            f'{where} holds an object but the ground truth has only '
            f'{len(ann.instances)} instances',
            field='dataset.eval_annotations',
        )
      continue
    rank = int(ann.instances[g].depth_rank)
    if int(item['gt_depth_rank'][j]) != rank:
      raise UserError(
          f'{where} has depth rank {int(item["gt_depth_rank"][j])}, its ground-truth '
          f'instance {g} {rank} (the prepared eval split does not fit the annotations)',
          field='dataset.eval_annotations',
      )
    box = _amodal_box(ann, g)
    if (box is not None) != bool(valid[j]):
      raise UserError(
          f'{where}: gt_valid {bool(valid[j])} but the amodal mask of ground-truth '
          f'instance {g} is {"non-empty" if box is not None else "empty"}',
          field='dataset.eval_annotations',
      )
    if box is not None:
      got = np.asarray(item['gt_boxes'][j], np.float64) / np.array([sy, sx, sy, sx])
      if np.abs(got - box).max() > BOX_TOLERANCE_PX:
        raise UserError(
            f'{where} has box {np.round(got, 2).tolist()} (original pixels), its '
            f'ground-truth instance {g} {box.tolist()}',
            field='dataset.eval_annotations',
        )
  return np.where(valid, slots, -1)


def summarize(
    objects: Sequence[Mapping[str, Any]],
    images: Sequence[Mapping[str, int]],
    min_occluded_px: int = occlusion.MIN_OCCLUDED_PX,
) -> dict:
  """The report of scored objects (``occlusion.prompted_quality`` records,
  scored with ``min_occluded_px``) and per-image counts ({'image_id',
  'beyond_max_instances', 'empty_mask'}).

  Returns ``{'images', 'objects', 'occluded_objects', 'amodal_miou',
  'visible_miou', 'occluded_miou', 'hidden_pixels' (occlusion.quality_means),
  'min_occluded_px', 'unscored_objects': {'beyond_max_instances',
  'empty_mask'}, 'subsets': {none|partial|heavy: {'objects',
  'occluded_objects', 'amodal_miou', 'visible_miou', 'occluded_miou'}}}``;
  a mean over no object is -1. An object belongs to each subset whose
  ``occlude_rate`` range (metrics.SUBSETS, both ends inclusive) holds its
  ground truth's.
  """

  def means(group):
    q = occlusion.quality_means(group)
    return {
        'objects': len(group),
        'occluded_objects': q['occluded'],
        'amodal_miou': q['amodal_miou'],
        'visible_miou': q['visible_miou'],
        'occluded_miou': q['occluded_miou'],
    }

  report = {'images': len(images), **means(objects)}
  report['hidden_pixels'] = occlusion.quality_means(objects)['hidden_pixels']
  report['min_occluded_px'] = int(min_occluded_px)
  report['unscored_objects'] = {
      k: int(sum(i[k] for i in images)) for k in ('beyond_max_instances', 'empty_mask')
  }
  report['subsets'] = {}
  for name in SUBSETS:
    lo, hi = metrics_lib.SUBSETS[name]
    report['subsets'][name] = means([o for o in objects if lo <= o['occlude_rate'] <= hi])
  return report


def format_table(report: Mapping[str, Any]) -> str:
  """The report as a small table: one row for all objects and one per
  occlusion subset (mIoU, -1 printed as '-')."""
  f = lambda v: '    -' if v < 0 else f'{v:.3f}'
  lines = [
      f"box-prompted masks of {report['objects']} ground-truth objects on "
      f"{report['images']} images (occluded part: objects hiding >= "
      f"{report['min_occluded_px']} pixels)",
      f"{'subset':<8} {'objects':>7} {'amodal':>6} {'visible':>7} {'occluded':>8} {'(objects)':>9}",
  ]
  rows = [('all', report)] + list(report['subsets'].items())
  for name, r in rows:
    lines.append(
        f"{name:<8} {r['objects']:>7} {f(r['amodal_miou']):>6} {f(r['visible_miou']):>7} "
        f"{f(r['occluded_miou']):>8} {r['occluded_objects']:>9}"
    )
  unscored = report['unscored_objects']
  if any(unscored.values()):
    lines.append(
        f"not scored: {unscored['beyond_max_instances']} objects past input.max_instances, "
        f"{unscored['empty_mask']} with an empty amodal mask"
    )
  return '\n'.join(lines)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: Any,
    variables: PyTree,
    eval_batches: Iterable[Batch],
    annotations: Sequence,
    step: int = 0,
    writer: Optional[MetricWriter] = None,
) -> dict:
  """Runs ``SLN.infer_boxes`` on every eval image's ground-truth boxes and
  scores each object's masks against its own ground truth.

  Args:
    eval_batches: batches with leading axes (local devices, per-device
      batch), the keys of INPUT_KEYS and META_KEYS (``is_valid`` False on
      padding images); the images ``loops.evaluate`` reads (the same
      ``eval.max_images``, split over the processes the same way).
    annotations: the split's ground truth, list[records.ImageAnnotation].

  Writes ``workdir/box_prompted.json`` (:func:`summarize`'s report) on
  process 0, prints :func:`format_table`, writes the 'all' means as
  ``eval/box_prompted_*`` scalars when given a writer, and returns the
  report.
  """
  gt_by_id = {int(a.image_id): a for a in annotations}
  infer = jax.pmap(make_box_prompted_infer_fn(model), axis_name=AXIS)
  rvars = replicate(variables)
  max_instances = int(config.input.max_instances)
  total = int(config.eval.max_images)
  limit = loops.process_share(total)
  read_limit = -(-total // jax.process_count()) if total >= 0 else -1
  images: list[dict] = []

  def collect(out, meta):
    """Pairs one finished batch's slots with their ground truth and hands
    each image to the host workers (``occlusion.prompted_quality``)."""
    out = loops.flatten_devices(jax.device_get(out))
    for j, image_id in enumerate(meta['image_id']):
      if not meta['is_valid'][j] or (0 <= limit <= len(images)):
        continue
      ann = gt_by_id.get(int(image_id))
      if ann is None:
        raise UserError(
            f'image_id {int(image_id)} of the eval split is not in the ground truth',
            field='dataset.eval_annotations',
        )
      slots = instance_slots(ann, max_instances)
      scored = check_slots(ann, slots, {k: v[j] for k, v in meta.items()})
      images.append(
          {
              'image_id': int(image_id),
              'beyond_max_instances': max(0, len(ann.instances) - max_instances),
              'empty_mask': int(np.sum((slots >= 0) & (scored < 0))),
          }
      )
      workers.submit(
          occlusion.prompted_quality,
          int(image_id),
          {k: v[j] for k, v in out.items()},
          meta['image_scale'][j],
          ann,
          scored,
          mask_threshold=config.eval.mask_threshold,
          mask_paste=config.eval.mask_paste,
          min_occluded_px=occlusion.MIN_OCCLUDED_PX,
      )

  def dispatch():
    """Launches each batch, reading none past ``read_limit`` images."""
    dispatched = 0
    for batch in tqdm(
        eval_batches,
        desc='box-prompted eval',
        unit='batch',
        mininterval=1.0,
        disable=jax.process_index() != 0,
    ):
      out = infer(rvars, shard({k: batch[k] for k in INPUT_KEYS}))
      yield out, loops.flatten_devices({k: batch[k] for k in META_KEYS})
      dispatched += np.size(batch['is_valid'])
      if 0 <= read_limit <= dispatched:
        return

  with host_workers.OrderedWorkers(loops.num_host_workers(config)) as workers:
    loops.finish_in_order(dispatch(), collect, loops.dispatch_lookahead())
    objects = [o for image in workers.results() for o in image]
  objects, images = loops.gather_results(objects, images, workdir)
  # pylint: enable=protected-access
  report = summarize(objects, images, occlusion.MIN_OCCLUDED_PX)
  if jax.process_index() == 0:
    with atomic_output_file(os.path.join(workdir, 'box_prompted.json')) as f:
      json.dump(report, f, indent=1)
    print(f'box-prompted evaluation at step {step}:')
    print(format_table(report), flush=True)
    if writer is not None:
      writer.write_scalars(
          step,
          {
              f'eval/box_prompted_{k}': report[k]
              for k in ('amodal_miou', 'visible_miou', 'occluded_miou')
          },
      )
      writer.flush()
  return report
