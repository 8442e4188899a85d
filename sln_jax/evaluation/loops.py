"""The evaluate and predict modes: ``SLN.infer`` over an eval split or an
image folder, with the host turning detections into COCO results.

No TensorFlow here: the eval batches come from ``input_pipeline.sources.build``
and are passed in (``sln_jax.modes``). Batches have leading axes (local
devices, per-device batch) as in docs/architecture.md. Detections are boxes
normalized to the canvas (y1, x1, y2, x2); results are in original-image
pixels (``sln_jax.evaluation.results``).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from sln_jax import host_workers
from sln_jax.errors import UserError
from sln_jax.evaluation import metrics as metrics_lib
from sln_jax.evaluation import occlusion, render, results_check
from sln_jax.evaluation import report as report_lib
from sln_jax.evaluation import results as results_lib
from sln_jax.files import atomic_output_file, make_dirs
from sln_jax.parallel import AXIS, Batch, PyTree, replicate, shard
from sln_jax.training.step import make_infer_fn
from sln_jax.writers import MetricWriter


def flatten_devices(tree: PyTree) -> PyTree:
  """(devices, B, ...) -> (devices * B, ...)."""
  return jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:]), tree)


def gather_results(results: list, seen: list, workdir: str) -> tuple[list, list]:
  """Every process's (results, scored image ids), merged on every process
  (through files in ``workdir``, removed afterwards)."""
  if jax.process_count() == 1:
    return results, seen
  part = os.path.join(workdir, f'.results_part{jax.process_index()}.json')
  with atomic_output_file(part) as f:
    json.dump({'results': results, 'seen': seen}, f)
  multihost_utils.sync_global_devices('sln_eval_results')
  merged, merged_seen = [], []
  for k in range(jax.process_count()):
    with open(os.path.join(workdir, f'.results_part{k}.json')) as f:
      got = json.load(f)
    merged.extend(got['results'])
    merged_seen.extend(got['seen'])
  multihost_utils.sync_global_devices('sln_eval_results_read')
  os.remove(part)
  return merged, merged_seen


def process_share(total: int) -> int:
  """This process's part of ``total`` items split over the processes (the
  first ``total mod P`` processes take one more); -1 (no limit) stays -1."""
  if total < 0:
    return total
  procs = jax.process_count()
  return total // procs + int(jax.process_index() < total % procs)


def dispatch_lookahead() -> int:
  """Batches evaluate() and predict() dispatch before reading a batch's
  detections.

  1 on an accelerator: the device runs batch i + 1 while the host pastes
  batch i's masks and encodes its RLEs. 0 on a CPU backend, where the two
  share the same cores, so overlapping them slows the evaluation down
  (docs/benchmarks.md, "Host post-processing").
  """
  return 0 if jax.local_devices()[0].platform == 'cpu' else 1


def num_host_workers(config: ml_collections.ConfigDict) -> int:
  """``eval.host_workers``, with -1 resolved for this backend
  (``host_workers.default_workers``)."""
  n = int(config.eval.host_workers)
  return host_workers.default_workers(jax.local_devices()[0].platform) if n < 0 else n


def finish_in_order(
    dispatched: Iterable[tuple], finish: Callable[..., None], lookahead: int
) -> None:
  """Calls ``finish(*item)`` on every item of ``dispatched``, in order, once
  ``lookahead`` later items have been dispatched (or the items run out).

  ``dispatched`` yields each item right after launching its (asynchronous)
  device work, so with ``lookahead`` 1 the device computes item i + 1 while
  the host finishes item i; 0 finishes each item before the next launch.
  """
  pending = collections.deque()
  for item in dispatched:
    pending.append(item)
    while len(pending) > lookahead:
      finish(*pending.popleft())
  while pending:
    finish(*pending.popleft())


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: Any,
    variables: PyTree,
    eval_batches: Iterable[Batch],
    annotations: Sequence,
    step: int = 0,
    writer: Optional[MetricWriter] = None,
    images_dir: Optional[str] = None,
    categories: Optional[Sequence[dict]] = None,
) -> dict:
  """Runs ``SLN.infer`` over the eval split and scores it.

  Args:
    eval_batches: batches with leading axes (local devices, per-device batch)
      and ``is_valid`` (False on padding images).
    annotations: the split's ground truth, list[records.ImageAnnotation].
    images_dir: the split's images, for the report's pictures (None: a
      report without pictures).
    categories: the annotation file's [{'id', 'name'}]
      (``readers.load_categories``): with ``dataset.category_agnostic``
      False, the categories scored (None: those the ground truth carries).

  Writes ``workdir/results.json`` (COCO results, original pixels) and
  ``workdir/metrics.json`` (the schema of ``metrics.evaluate``; plus
  ``per_category.json``, ``metrics.evaluate``'s ``per_category``, when not
  category-agnostic, ``depth_order.json``:
  ``occlusion.depth_order_accuracy``, and ``occlusion.json``:
  ``occlusion.occlusion_metrics``), with ``eval.report`` the HTML report
  in ``workdir/report`` (``report.write_report``), prints the tables and
  returns the metrics.
  """
  gt_by_id = {int(a.image_id): a for a in annotations}
  infer = jax.pmap(make_infer_fn(model), axis_name=AXIS)
  rvars = replicate(variables)
  # eval.max_images is split over the processes (each reads its own shard);
  # every process reads the same number of batches (up to ``read_limit``).
  total = int(config.eval.max_images)
  limit = process_share(total)
  read_limit = -(-total // jax.process_count()) if total >= 0 else -1
  seen = []

  def collect(dets, meta):
    """Hands one finished batch's detections to the host workers, which turn
    them into COCO results (``workers.results()``: per image, in order)."""
    dets = flatten_devices(jax.device_get(dets))
    for j, image_id in enumerate(meta['image_id']):
      if not meta['is_valid'][j] or (0 <= limit <= len(seen)):
        continue
      ann = gt_by_id.get(int(image_id))
      if ann is None:
        raise UserError(
            f'image_id {int(image_id)} of the eval split is not in the ground truth',
            field='dataset.eval_annotations',
        )
      seen.append(int(image_id))
      workers.submit(
          results_lib.detections_to_results,
          int(image_id),
          {k: v[j] for k, v in dets.items()},
          meta['image_scale'][j],
          (ann.height, ann.width),
          mask_threshold=config.eval.mask_threshold,
          mask_paste=config.eval.mask_paste,
      )

  def dispatch():
    """Launches each batch; no batch is read past the one that reaches
    read_limit (batches have one size, so every process stops at the same
    batch)."""
    dispatched = 0
    for batch in tqdm(
        eval_batches, desc='eval', unit='batch', mininterval=1.0, disable=jax.process_index() != 0
    ):
      dets = infer(rvars, shard({k: batch[k] for k in ('image', 'glm_image', 'image_shape')}))
      yield dets, flatten_devices({k: batch[k] for k in ('image_id', 'image_scale', 'is_valid')})
      dispatched += np.size(batch['is_valid'])
      if 0 <= read_limit <= dispatched:
        return

  with host_workers.OrderedWorkers(num_host_workers(config)) as workers:
    finish_in_order(dispatch(), collect, dispatch_lookahead())
    results = [r for image in workers.results() for r in image]
  # Scored against the images that were run (a sliced split such as
  # 'val[:10]' or eval.max_images covers part of the annotation file).
  results, seen = gather_results(results, seen, workdir)
  gt = [gt_by_id[i] for i in sorted(set(seen))]
  # Once for the three scorings; the RLEs are pycocotools' own encoding.
  checked = results_check.check_results(results, gt, check_counts=False)
  curves, per_category = {}, {}
  metrics = metrics_lib.evaluate(
      gt,
      checked,
      protocol=config.eval.protocol,
      category_agnostic=config.dataset.category_agnostic,
      curves=curves,
      categories=categories,
      per_category=per_category,
      results_path='the eval results (model class indices as category ids)',
  )
  if jax.process_index() == 0:
    with atomic_output_file(os.path.join(workdir, 'results.json')) as f:
      json.dump(results, f)
    with atomic_output_file(os.path.join(workdir, 'metrics.json')) as f:
      json.dump(metrics, f, indent=1)
    occluded = occlusion.occlusion_metrics(gt, checked)
    with atomic_output_file(os.path.join(workdir, 'depth_order.json')) as f:
      json.dump(occluded['depth_order'], f, indent=1)
    with atomic_output_file(os.path.join(workdir, 'occlusion.json')) as f:
      json.dump(occluded, f, indent=1)
    if not config.dataset.category_agnostic:
      with atomic_output_file(os.path.join(workdir, 'per_category.json')) as f:
        json.dump(per_category, f, indent=1)
    print(
        f'evaluation at step {step} on {len(gt)} images '
        f'({config.dataset.name}/{config.dataset.eval_split}, '
        f'protocol {config.eval.protocol}):'
    )
    print(metrics_lib.format_table(metrics))
    if per_category:
      print(metrics_lib.format_per_category(per_category))
    print(occlusion.format_occlusion(occluded), flush=True)
    if config.eval.get('report', False):
      index = report_lib.write_report(
          os.path.join(workdir, 'report'),
          gt,
          checked,
          metrics,
          curves,
          occluded,
          images_dir=images_dir,
          score_threshold=config.eval.report_score,
          gallery_size=config.eval.report_images,
          title=f'SLN evaluation: {config.dataset.name}/{config.dataset.eval_split}',
          per_category=per_category,
          details=[
              f'workdir {workdir}, step {step}, protocol {config.eval.protocol}',
              f'model.layer_activation {config.model.layer_activation}, '
              f'eval.mask_paste {config.eval.mask_paste}',
          ],
      )
      print(f'report: {index}', flush=True)
    if writer is not None:
      scalars = {
          f'eval/{branch}_{metric}': value
          for branch, table in metrics.items()
          for metric, value in table['all']['both'].items()
      }
      writer.write_scalars(step, scalars)
      writer.flush()
  return metrics


# --------------------------------------------------------------------- predict


def predict(
    config: ml_collections.ConfigDict,
    model: Any,
    variables: PyTree,
    preprocess_image: Callable[[np.ndarray, Any], tuple],
) -> int:
  """Writes ``<stem>.json`` (COCO results) and ``<stem>.png`` (picture) per
  image of ``predict.input_dir`` into ``predict.output_dir``.

  Args:
    preprocess_image: ``(image (H,W,3) uint8, config) -> (canvas, image_shape,
      image_scale, glm_image)`` (``pipeline.preprocess_image_for_inference``).

  Returns:
    The number of images this process wrote. Non-images and unreadable
    images are reported and skipped.
  """

  pc = config.predict
  if not pc.input_dir or not os.path.isdir(pc.input_dir):
    raise UserError('not a directory', path=str(pc.input_dir), field='predict.input_dir')
  if not pc.output_dir:
    raise UserError('must be set', field='predict.output_dir')
  by_stem = {}
  for name in sorted(os.listdir(pc.input_dir)):
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in render.IMAGE_SUFFIXES and stem in by_stem:
      raise UserError(
          f'{by_stem[stem]} and {name} would both write {stem}.json and ' f'{stem}.png',
          path=str(pc.input_dir),
          field='predict.input_dir',
      )
    by_stem.setdefault(stem, name)
  make_dirs(pc.output_dir)
  infer = jax.jit(make_infer_fn(model))
  # Several processes split the files (file k goes to process k mod P) and
  # predict.max_images (N in all).
  procs, me = jax.process_count(), jax.process_index()
  mine = list(enumerate(sorted(os.listdir(pc.input_dir))))[me::procs]
  limit = process_share(int(pc.max_images))

  def dispatch():
    """Launches each readable image of this process's share."""
    launched = 0
    for k, name in tqdm(mine, desc='predict', unit='image', mininterval=1.0, disable=me != 0):
      if 0 <= limit <= launched:
        return
      path = os.path.join(pc.input_dir, name)
      stem, suffix = os.path.splitext(name)
      if not os.path.isfile(path) or suffix.lower() not in render.IMAGE_SUFFIXES:
        tqdm.write(f'skipping {path}: not an image file')
        continue
      try:
        with Image.open(path) as im:
          image = np.asarray(im.convert('RGB'))
      except Exception as err:  # noqa: BLE001 - any decoder failure: report, go on
        tqdm.write(f'skipping {path}: unreadable image ({type(err).__name__}: {err})')
        continue
      canvas, shape, scale, glm = preprocess_image(image, config)
      dets = infer(
          variables, {'image': canvas[None], 'glm_image': glm[None], 'image_shape': shape[None]}
      )
      yield dets, stem, render.image_id_of(stem, k), image, scale
      launched += 1

  def write(dets, stem, image_id, image, scale):
    """Hands one image's detections to the host workers, which write its
    results and picture."""
    workers.submit(
        render.write_prediction,
        image_id,
        {key: v[0] for key, v in jax.device_get(dets).items()},
        scale,
        image,
        os.path.join(pc.output_dir, stem + '.json'),
        os.path.join(pc.output_dir, stem + '.png'),
        score_threshold=pc.score_threshold,
        mask_threshold=config.eval.mask_threshold,
        mask_paste=config.eval.mask_paste,
    )

  with host_workers.OrderedWorkers(num_host_workers(config)) as workers:
    finish_in_order(dispatch(), write, dispatch_lookahead())
    written = len(workers.results())
  by = f' (process {me} of {procs})' if procs > 1 else ''
  print(f'wrote predictions for {written} images to {pc.output_dir}{by}', flush=True)
  return written
