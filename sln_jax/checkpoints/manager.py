"""Train-state checkpoints in ``workdir/checkpoints`` (Orbax CheckpointManager).

A checkpoint holds {step, params, batch_stats, opt_state, rng}. A checkpoint
that does not fit the config's model is refused with its missing, unexpected
and differently shaped leaves, read from its metadata before anything is
allocated; a damaged one with a hint to remove the step directory. In a
multi-process run the leaves are saved and restored as arrays replicated over
every process's devices.
"""

from __future__ import annotations

import os
from typing import Optional

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sln_jax.checkpoints import orbax_io
from sln_jax.errors import UserError, listing
from sln_jax.parallel import PyTree
from sln_jax.training.state import TrainState, create_train_state


def checkpoint_manager(
    config: ml_collections.ConfigDict, workdir: str, read_only: bool = False
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, int(config.train.checkpoint_every)),
      max_to_keep=int(config.train.keep_checkpoints) or None,
      enable_async_checkpointing=False,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options
  )


def _to_tree(state: TrainState) -> dict:
  return {
      'step': state.step,
      'params': state.params,
      'batch_stats': state.batch_stats,
      'opt_state': flax.serialization.to_state_dict(state.opt_state),
      'rng': state.rng,
  }


def _global_replicated(tree: PyTree) -> PyTree:
  """Multi-process: host-local leaves (the same values on every process) ->
  jax.Arrays replicated over every device of every process, the form Orbax
  saves and restores across processes. One process: ``tree`` as it is."""
  if jax.process_count() == 1:
    return tree
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(jax.devices()), ('all',)), jax.sharding.PartitionSpec()
  )
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
  )


def _host_local(tree: PyTree) -> PyTree:
  """Inverse of :func:`_global_replicated`: this process's copy of each leaf."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, force: bool = False) -> bool:
  """Saves an unreplicated ``state`` at its step (if the interval or ``force``).
  Every process calls it (with equal states) when there are several."""
  step = int(jax.device_get(state.step))
  if manager.latest_step() == step:
    return False
  saved = manager.save(
      step, args=ocp.args.StandardSave(_global_replicated(_to_tree(state))), force=force
  )
  manager.wait_until_finished()
  return bool(saved)


def restore_checkpoint(
    manager: ocp.CheckpointManager, template: TrainState, step: Optional[int] = None
) -> Optional[TrainState]:
  """The latest (or ``step``) checkpoint shaped like ``template``; None if none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  try:
    with orbax_io.quiet_failed_reads():
      tree = _host_local(
          manager.restore(
              step, args=ocp.args.StandardRestore(_global_replicated(_to_tree(template)))
          )
      )
  except Exception as err:  # pylint: disable=broad-except - reported as a UserError
    # Orbax raises ValueError when the tree structure or shapes differ (the
    # metadata says which), and a bare Exception over TensorStore's error
    # when an array file is damaged or truncated (is_read_failure).
    step_dir = os.path.join(manager.directory, str(step))
    problem = checkpoint_mismatch(step_dir, _to_tree(template))
    if problem:
      raise UserError(problem, path=step_dir) from None
    if not orbax_io.is_read_failure(err):
      if isinstance(err, ValueError):
        raise UserError(
            f"does not match this config's model "
            f'({str(err).splitlines()[0][:200]}); {MISMATCH_HINT}',
            path=step_dir,
        ) from None
      raise  # out of memory, a transient file-system error: not the checkpoint's fault
    raise orbax_io.unreadable_checkpoint(
        step_dir,
        err,
        'a damaged or partly copied checkpoint? Remove this step '
        'directory to go back to the one before it; or, if it was written for another '
        'model config, use a new --workdir or that config',
    ) from None
  return TrainState(
      step=jnp.asarray(tree['step'], jnp.int32),
      params=tree['params'],
      batch_stats=tree['batch_stats'],
      opt_state=flax.serialization.from_state_dict(template.opt_state, tree['opt_state']),
      rng=jnp.asarray(tree['rng']),
      lr_schedule=template.lr_schedule,
  )


MISMATCH_HINT = (
    'was it written for another model config? Use a new --workdir or '
    'the config it was trained with'
)


def checkpoint_mismatch(step_dir: str, expected: PyTree) -> Optional[str]:
  """Why the checkpoint in ``step_dir`` cannot be restored as ``expected``
  (``_to_tree`` of this config's state; arrays or shape structs): its
  missing, unexpected and differently shaped leaves, read from the
  checkpoint's metadata. None when they all fit (or there is no metadata)."""
  try:
    meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, 'default'))
    saved = _shapes(getattr(meta, 'item_metadata', meta))
  except Exception:  # pylint: disable=broad-except - no readable metadata: nothing to compare
    return None
  if not saved:  # Orbax gives empty metadata when it cannot read it (a damaged file)
    return None
  want = _shapes(expected)

  def problems(keep):
    w = {k: v for k, v in want.items() if keep(k)}
    h = {k: v for k, v in saved.items() if keep(k)}
    return [
        listing(title, items, limit=8)
        for title, items in (
            ('missing', sorted(set(w) - set(h))),
            ('unexpected', sorted(set(h) - set(w))),
            (
                'shape mismatches',
                [f'{k} {h[k]} != expected {w[k]}' for k in sorted(set(w) & set(h)) if h[k] != w[k]],
            ),
        )
        if items
    ]

  # The model's leaves first; the optimizer state mirrors them.
  found = problems(lambda k: not k.startswith('opt_state/')) or problems(lambda k: True)
  if not found:
    return None
  return f'does not match this config\'s model: {"; ".join(found)}; {MISMATCH_HINT}'


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints in ``workdir/checkpoints`` (directory names;
  nothing is read)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  # No CheckpointManager here: it synchronises the processes, and a process
  # that has gone on to create the directory would meet one still checking.
  return sorted(
      int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else []) if n.isdigit()
  )


def check_checkpoint_fits(
    config: ml_collections.ConfigDict, workdir: str, variables: PyTree
) -> None:
  """Raises a UserError when the latest checkpoint in ``workdir`` does not fit
  this config's model (from its metadata; nothing is read or allocated).
  ``modes.run`` calls it before writing anything into ``workdir``."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = checkpoint_steps(workdir)
  problem = step_dir = None
  if steps:
    expected = jax.eval_shape(
        lambda v: _to_tree(create_train_state(config, v, jax.random.PRNGKey(0))), variables
    )
    step_dir = os.path.join(directory, str(max(steps)))
    problem = checkpoint_mismatch(step_dir, expected)
  if jax.process_count() > 1:  # every process checks before any creates the directory
    multihost_utils.sync_global_devices('sln_checkpoint_checked')
  if problem:
    raise UserError(problem, path=step_dir)


def _shapes(tree: PyTree) -> dict[str, tuple]:
  """'a/b/c' -> shape of every array leaf of ``tree`` (arrays or Orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): tuple(
          getattr(leaf, 'shape', ()) or ()
      )
      for path, leaf in leaves
  }


def load_variables(
    config: ml_collections.ConfigDict, workdir: str, variables: PyTree
) -> tuple[PyTree, int]:
  """Model variables of the latest checkpoint in ``workdir`` (for evaluate /
  predict) and its step."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = (
      checkpoint_manager(config, workdir, read_only=True) if os.path.isdir(directory) else None
  )
  step = manager.latest_step() if manager is not None else None
  if step is None:
    raise UserError(
        'no checkpoint to evaluate (train first)', path=os.path.join(workdir, 'checkpoints')
    )
  rng = jax.random.PRNGKey(0)
  state = restore_checkpoint(manager, create_train_state(config, variables, rng), step)
  return {'params': state.params, 'batch_stats': state.batch_stats}, step
