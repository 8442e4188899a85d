"""The train state, the model and its initial variables."""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import ml_collections
import numpy as np

from sln_jax.checkpoints import partial_load
from sln_jax.models import sln
from sln_jax.parallel import PyTree
from sln_jax.training.optimizer import create_optimizer
from sln_jax.training.schedule import lr_tables, schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32: optimizer steps taken
  params: PyTree
  batch_stats: PyTree  # BatchNorm statistics (updated only with model.train_bn)
  opt_state: PyTree
  rng: jax.Array  # (2,) uint32 base key; per step fold_in(rng, step)
  # ``lr_tables(config)``: the learning-rate schedule as data of the step (not
  # constants of its program, so another schedule reuses the compiled step);
  # from the config, never checkpointed. None: the step's config's constants.
  lr_schedule: Optional[dict] = None


def create_train_state(
    config: ml_collections.ConfigDict, variables: PyTree, rng: jax.Array
) -> TrainState:
  """A fresh state (step 0) around model ``variables`` {'params', 'batch_stats'}."""
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  tx = create_optimizer(config, params, batch_stats, schedule(config)[0][0])
  # One program builds the optimizer state (eagerly, each zeros_like would
  # compile one per parameter shape).
  return TrainState(
      step=jax.device_put(np.zeros((), np.int32)),
      params=params,
      batch_stats=batch_stats,
      opt_state=jax.jit(tx.init)(params),
      rng=rng,
      lr_schedule=jax.device_put(lr_tables(config)),
  )


def init_from_checkpoints(
    config: ml_collections.ConfigDict, variables: PyTree, strict: bool = False
) -> PyTree:
  """Applies ``config.init_from`` / ``config.init_patterns`` (comma-separated
  Orbax dirs and Flax-path regexes; ``partial_load.partial_load``).

  Model leaves that no checkpoint holds with their shape keep their values
  (training: a new head starts from its initialisation) and one printed line
  counts them and names the first. With ``strict`` (evaluate / predict, where
  nothing would train them) they are a UserError naming ``init_from``.
  """
  dirs = [d.strip() for d in str(config.init_from).split(',') if d.strip()]
  if not dirs:
    return variables
  patterns = [p.strip() for p in str(config.init_patterns).split(',') if p.strip()]
  report = partial_load.LoadReport()
  loaded = partial_load.partial_load(
      variables, [(d, patterns) for d in dirs], report, strict=strict
  )
  if jax.process_index() == 0:
    print(f'init_from: {report.summary()}', flush=True)
  return loaded


def create_model(config: ml_collections.ConfigDict) -> tuple[Any, PyTree]:
  """``SLN(config.model)`` (loss weights from ``config.loss``) and its freshly
  initialised variables."""
  model = sln.build_model(config)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  variables = sln.init_variables(model, rng, config.input.image_size)
  return model, {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
