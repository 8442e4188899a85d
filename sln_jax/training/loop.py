"""The training loop: stages, checkpoints, metrics and image summaries.

Steps are dispatched ahead of the host; a step's metrics are read after the
next step is queued. Batches come from ``input_pipeline.sources.build`` with
leading axes (local devices, per-device batch).
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable, Optional

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from sln_jax.checkpoints.manager import checkpoint_manager, restore_checkpoint, save_checkpoint
from sln_jax.errors import UserError
from sln_jax.evaluation import render
from sln_jax.evaluation import results as results_lib
from sln_jax.parallel import (
    AXIS,
    Batch,
    PyTree,
    data_parallel_batch,
    first_replica,
    prefetch_to_devices,
    replicate,
    unreplicate,
)
from sln_jax.training.optimizer import reset_momentum, stage_freeze_history
from sln_jax.training.schedule import schedule, stage_index, total_steps
from sln_jax.training.state import TrainState, create_train_state
from sln_jax.training.step import make_infer_fn, make_stage_step
from sln_jax.writers import MetricWriter

_LAYER_COUNT = re.compile(r'(metric/layer\d+)_hit_px')


def layer_ratios(scalars: dict[str, float]) -> dict[str, float]:
  """Replaces the ``metric/layer{k}_{hit,target,pred}_px`` pixel counts
  (``layer_metrics.layer_pixel_counts``, averaged over the log window) by
  ``metric/layer{k}_recall`` = hit / target and ``metric/layer{k}_precision``
  = hit / pred; a ratio with no pixels under it is left out."""
  out = dict(scalars)
  for name in scalars:
    match = _LAYER_COUNT.fullmatch(name)
    if not match:
      continue
    base = match.group(1)
    hit = out.pop(name)
    for ratio, denominator in (('recall', '_target_px'), ('precision', '_pred_px')):
      total = out.pop(base + denominator, 0.0)
      if total > 0:
        out[f'{base}_{ratio}'] = hit / total
  return out


def _first_bad_loss(losses: dict) -> Optional[str]:
  """Name of the first non-finite loss term (terms before 'total')."""
  names = sorted(losses, key=lambda k: (k.endswith('/total'), k))
  for name in names:
    if not np.all(np.isfinite(losses[name])):
      return name
  return None


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: Any,
    variables: PyTree,
    make_train_iter: Callable[[], Iterable[Batch]],
    writer: MetricWriter,
    image_summary_fn: Optional[Callable[[PyTree, Batch], dict]] = None,
    on_start: Optional[Callable[[], None]] = None,
) -> TrainState:
  """Trains to ``total_steps(config)``, resuming from the latest checkpoint.

  Args:
    config: the whole config tree.
    workdir: checkpoints go to ``workdir/checkpoints``.
    model: the Flax module (``train_forward(batch, rng)``).
    variables: initial {'params', 'batch_stats'} (ignored when resuming).
    make_train_iter: returns this process's batches, leading axes
      (local devices, per-device batch), in a deterministic order; on resume
      the first ``step`` batches are skipped so the run continues exactly.
    writer: TensorBoard scalars (losses, lr, images/s) and images.
    image_summary_fn: ``(variables, one-image batch) -> {name: (N,H,W,3) uint8}``
      written every ``train.image_summary_every`` steps.
    on_start: called once the state is initialised or restored (a checkpoint
      that cannot be read has been refused), before any batch is read.

  Returns:
    The final, unreplicated state.

  Raises:
    UserError: a non-finite loss (names the step and the term); the last
      checkpoint on disk stays the last good one.
  """
  tc = config.train
  num_local, per_device = data_parallel_batch(config)
  manager = checkpoint_manager(config, workdir)
  state = create_train_state(
      config, variables, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  )
  restored = restore_checkpoint(manager, state)
  chief = jax.process_index() == 0  # one message per run, not per host
  if restored is not None:
    state = restored
    if chief:
      print(f'resuming from step {int(state.step)} ({manager.directory})', flush=True)
  if on_start is not None:
    on_start()
  start, end = int(state.step), total_steps(config)
  if start >= end:
    return state

  it = iter(make_train_iter())
  if start:
    if chief:
      print(f'skipping {start} batches to continue the data order', flush=True)
    for _ in range(start):
      next(it)
  device_batches = prefetch_to_devices(it, int(tc.device_prefetch))
  table = schedule(config)
  steps = {}
  rstate = replicate(state)
  global_batch = num_local * per_device * jax.process_count()
  sums, count, t_log = {}, 0, time.perf_counter()
  pbar = tqdm(
      total=end,
      initial=start,
      desc='train',
      unit='step',
      mininterval=1.0,
      disable=jax.process_index() != 0,
  )

  def take(pending):
    """Reads one finished step's metrics (blocks until that step is done);
    stops on a non-finite loss."""
    step, out = pending
    out = first_replica(out)
    bad = _first_bad_loss({n: v for n, v in out.items() if n.startswith('loss/')})
    if bad is not None:
      pbar.close()
      last = manager.latest_step()
      raise UserError(
          f'non-finite loss at step {step + 1}: {bad[5:]} = {float(out[bad])} '
          f'(total = {float(out["loss/total"])}); last good checkpoint: '
          f'{"none" if last is None else f"step {last}"}',
          path=str(manager.directory),
          field='train',
      )
    for n, v in out.items():
      sums[n] = sums.get(n, 0.0) + float(v)
    pbar.set_postfix(
        stage=table[stage_index(config, step)][0],
        loss=f'{float(out["loss/total"]):.4f}',
        refresh=False,
    )
    pbar.update(1)

  # Steps are dispatched ahead of the host: a step's metrics are read after
  # the next step is queued, and every checkpoint, log line and image summary
  # first waits for the metrics of the steps before it (so no checkpoint is
  # written after a non-finite loss).
  pending = None
  for step in range(start, end):
    k = stage_index(config, step)
    name = table[k][0]
    if k not in steps:
      steps[k] = jax.pmap(
          make_stage_step(
              model, config, state.params, state.batch_stats, name, stage_freeze_history(config, k)
          ),
          axis_name=AXIS,
          donate_argnums=(0,),
      )
    if step == table[k][1] and step > 0 and tc.reset_momentum_per_stage:
      rstate = rstate.replace(opt_state=reset_momentum(rstate.opt_state))
    try:
      batch = next(device_batches)
    except StopIteration:
      raise UserError(
          f'training data ran out at step {step}', field='dataset.train_split'
      ) from None
    rstate, out = steps[k](rstate, batch)
    if pending is not None:
      take(pending)
    pending = (step, out)
    count += 1
    done = step + 1
    log = done % max(1, tc.log_every) == 0 or done == end
    summary = (
        image_summary_fn is not None
        and tc.image_summary_every > 0
        and done % tc.image_summary_every == 0
        and jax.process_index() == 0
    )
    save = done % max(1, tc.checkpoint_every) == 0 or done == end
    if log or summary or save:
      take(pending)
      pending = None
    if log:
      elapsed = time.perf_counter() - t_log
      scalars = layer_ratios({n: v / count for n, v in sums.items()})
      scalars['images_per_s'] = count * global_batch / max(elapsed, 1e-9)
      writer.write_scalars(done, scalars)
      sums, count, t_log = {}, 0, time.perf_counter()
    if summary:
      params, stats = unreplicate((rstate.params, rstate.batch_stats))
      one = jax.tree.map(lambda x: np.asarray(x)[0, :1], batch)
      writer.write_images(done, image_summary_fn({'params': params, 'batch_stats': stats}, one))
    if save:
      save_checkpoint(manager, unreplicate(rstate), force=done == end)
      writer.flush()
  pbar.close()
  writer.flush()
  return unreplicate(rstate)


def make_image_summary_fn(
    model: Any, config: ml_collections.ConfigDict
) -> Callable[[PyTree, Batch], dict]:
  """``(variables, batch of one image) -> {'prediction': (1, S, S, 3) uint8}``:
  the detections above ``predict.score_threshold`` drawn on the canvas."""
  infer = jax.jit(make_infer_fn(model))

  def fn(variables, batch):
    inputs = {k: batch[k] for k in ('image', 'glm_image', 'image_shape')}
    dets = jax.device_get(infer(variables, inputs))
    canvas = np.asarray(batch['image'][0])
    size = canvas.shape[:2]
    results = results_lib.detections_to_results(
        0,
        {k: v[0] for k, v in dets.items()},
        (1.0, 1.0),
        size,
        score_threshold=config.predict.score_threshold,
        mask_threshold=config.eval.mask_threshold,
        mask_paste=config.eval.mask_paste,
    )
    return {'prediction': render.render_prediction(canvas, results)[None]}

  return fn
