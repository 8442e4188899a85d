"""main.py's modes (train_and_evaluate, train, evaluate, predict) over the
host-side inputs that main.py builds.

No TensorFlow here: ``DataSources`` holds callables that build the tf.data
iterators only when a mode needs them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import ml_collections
import numpy as np

from sln_jax import inference
from sln_jax.cliutil import UserError
from sln_jax.train import (Batch, MetricWriter, PyTree, create_model, init_from_checkpoints,
                           load_variables, make_image_summary_fn, schedule, train)


@dataclasses.dataclass
class DataSources:
  """Host-side inputs, built by main.py (where TensorFlow may be imported)."""
  train_batches: Optional[Callable[[], Iterable[Batch]]] = None
  eval_batches: Optional[Callable[[], Iterable[Batch]]] = None
  eval_annotations: Optional[Callable[[], Sequence]] = None
  preprocess_image: Optional[Callable[[np.ndarray, Any], tuple]] = None


MODES = ('train_and_evaluate', 'train', 'evaluate', 'predict')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a UserError for config values that would otherwise fail only
  after training or a whole inference pass (stages, eval protocol, mask
  paste). main.py calls it before building any dataset."""
  from sln_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from sln_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  schedule(config)
  eval_lib.check_protocol(config.eval.protocol, field='eval.protocol')
  if config.eval.mask_paste not in predict_lib.MASK_PASTES:
    raise UserError(f'{config.eval.mask_paste!r} is not one of '
                    f'{", ".join(predict_lib.MASK_PASTES)}', field='eval.mask_paste')


def run(config: ml_collections.ConfigDict, workdir: str, mode: str,
        writer: MetricWriter, data: DataSources, model: Any = None,
        variables: PyTree = None) -> Optional[dict]:
  """One main.py mode. Returns the metrics for the evaluating modes.

  ``model``/``variables`` default to ``create_model(config)`` (tests pass
  stand-ins). evaluate/predict use the latest checkpoint in ``workdir``, or
  ``config.init_from`` when there is none.
  """
  if mode not in MODES:
    raise UserError(f'unknown mode {mode!r}; one of {", ".join(MODES)}', field='--mode')
  check_config(config)
  if (mode in ('evaluate', 'predict') and not config.init_from
      and not os.path.isdir(os.path.join(workdir, 'checkpoints'))):
    raise UserError(f'no checkpoint to {mode} with (train first, or set init_from)',
                    path=os.path.join(workdir, 'checkpoints'))
  if model is None:
    model, variables = create_model(config)
  variables = init_from_checkpoints(config, variables)
  step = 0
  if mode in ('train', 'train_and_evaluate'):
    summary = make_image_summary_fn(model, config) if config.train.image_summary_every > 0 else None
    state = train(config, workdir, model, variables, data.train_batches, writer, summary)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    step = int(state.step)
    if mode == 'train':
      return None
  else:
    try:
      variables, step = load_variables(config, workdir, variables)
    except UserError:
      if not config.init_from:
        raise
      print(f'no checkpoint in {workdir}; using init_from', flush=True)
  if mode == 'predict':
    inference.predict(config, model, variables, data.preprocess_image)
    return None
  return inference.evaluate(config, workdir, model, variables, data.eval_batches(),
                  data.eval_annotations(), step=step, writer=writer)
