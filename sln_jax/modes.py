"""main.py's modes (train_and_evaluate, train, evaluate, predict).

No TensorFlow here: the modes read ``input_pipeline.sources.DataSources``,
callables that build the tf.data iterators only when a mode needs them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import jax
import ml_collections

from sln_jax import config_checks
from sln_jax.checkpoints.manager import check_checkpoint_fits, checkpoint_steps, load_variables
from sln_jax.errors import UserError
from sln_jax.evaluation import box_prompted, loops
from sln_jax.files import atomic_output_file
from sln_jax.models import sln
from sln_jax.parallel import PyTree
from sln_jax.training import optimizer as optimizer_lib
from sln_jax.training import schedule as schedule_lib
from sln_jax.training.loop import make_image_summary_fn, train
from sln_jax.training.state import create_model, init_from_checkpoints
from sln_jax.writers import MetricWriter

if TYPE_CHECKING:  # input_pipeline imports TensorFlow
  from input_pipeline.sources import DataSources


MODES = ('train_and_evaluate', 'train', 'evaluate', 'predict')


def check_stages(config: ml_collections.ConfigDict) -> None:
  """Refuses, before any data is read, a ``train.stages`` regex (a stage
  name other than heads / 4+ / all) that trains no parameter of the
  config's model, or, with ``train.legacy_sticky_freeze``, a stage that
  trains nothing the earlier stages trained. Costs one ``jax.eval_shape``
  of the model (``sln.variable_shapes``) when there is such a stage to
  check, nothing otherwise."""
  stages = [
      (name, optimizer_lib.stage_freeze_history(config, k))
      for k, (name, *_) in enumerate(schedule_lib.schedule(config))
  ]
  check = [
      (name, earlier)
      for name, earlier in stages
      if name not in schedule_lib.STAGE_PATTERNS or earlier
  ]
  if not check:
    return
  shapes = sln.variable_shapes(sln.build_model(config), config.input.image_size)
  for name, earlier in check:
    optimizer_lib.trainable_mask(
        shapes['params'], shapes.get('batch_stats', {}), name, config.model.train_bn, earlier
    )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    mode: str,
    writer: MetricWriter,
    data: DataSources,
    model: Any = None,
    variables: PyTree = None,
) -> Optional[dict]:
  """One main.py mode. Returns the metrics for the evaluating modes.

  ``model``/``variables`` default to ``create_model(config)`` (tests pass
  stand-ins). evaluate/predict use the latest checkpoint in ``workdir``, or
  ``config.init_from`` when there is none; then every model leaf must come
  from init_from (nothing would train a leaf left at its random initial
  value). The training modes load what fits and start the rest from its
  initialisation. A checkpoint in ``workdir`` that does not fit the config's
  model, or an init_from that leaves evaluate/predict leaves unloaded, is
  refused before anything is written. The training modes write their config
  to ``workdir/config.txt``; evaluate writes ``workdir/config_evaluate.txt``
  beside metrics.json (the training config stays as it was); predict writes
  only into ``predict.output_dir``. With ``eval.box_prompted`` the evaluating
  modes then run ``box_prompted.evaluate`` over a second pass of the eval
  batches (``workdir/box_prompted.json``); the returned metrics are
  ``loops.evaluate``'s.
  """
  if mode not in MODES:
    raise UserError(f'unknown mode {mode!r}; one of {", ".join(MODES)}', field='--mode')
  config_checks.check_config(config)
  evaluating = mode in ('evaluate', 'predict')
  from_workdir = evaluating and bool(checkpoint_steps(workdir))
  if evaluating and not from_workdir and not config.init_from:
    raise UserError(
        f'no checkpoint to {mode} with (train first, or set init_from)',
        path=os.path.join(workdir, 'checkpoints'),
    )
  if model is None:
    model, variables = create_model(config)
  if not from_workdir:
    variables = init_from_checkpoints(config, variables, strict=evaluating)
  elif config.init_from:
    print(f'init_from not used: {mode} uses the latest checkpoint in {workdir}', flush=True)
  check_checkpoint_fits(config, workdir, variables)
  step = 0
  if mode in ('train', 'train_and_evaluate'):
    summary = make_image_summary_fn(model, config) if config.train.image_summary_every > 0 else None
    # config.txt once the workdir's checkpoint (if any) has been read: a
    # resume refused there leaves the run's config as it was.
    state = train(
        config,
        workdir,
        model,
        variables,
        data.train_batches,
        writer,
        summary,
        on_start=lambda: _write_config(config, workdir, 'config.txt'),
    )
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    step = int(state.step)
    if mode == 'train':
      return None
  elif from_workdir:
    variables, step = load_variables(config, workdir, variables)
  else:
    print(f'no checkpoint in {workdir}; using init_from', flush=True)
  if mode == 'predict':
    loops.predict(config, model, variables, data.preprocess_image)
    return None
  annotations = data.eval_annotations()
  metrics = loops.evaluate(
      config,
      workdir,
      model,
      variables,
      data.eval_batches(),
      annotations,
      step=step,
      writer=writer,
      images_dir=data.eval_images_dir,
      categories=None if data.eval_categories is None else data.eval_categories(),
  )
  if config.eval.get('box_prompted', False):
    box_prompted.evaluate(
        config,
        workdir,
        model,
        variables,
        data.eval_batches(),
        annotations,
        step=step,
        writer=writer,
    )
  if mode == 'evaluate':
    _write_config(config, workdir, 'config_evaluate.txt')
  return metrics


def _write_config(config: ml_collections.ConfigDict, workdir: str, name: str) -> None:
  """``workdir/name``: the config of the run (process 0)."""
  if jax.process_index() == 0:
    with atomic_output_file(os.path.join(workdir, name)) as f:
      f.write(str(config))
