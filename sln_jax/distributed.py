"""Multi-host set-up: ``jax.distributed`` initialisation and the shared-workdir probe.

A run is multi-host when the environment names a coordinator
(JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID)
or it is a SLURM / Open MPI job with more than one task; jax detects SLURM,
Open MPI and TPU pods without the variables. Each process then reads its own
input shard, and every process must see the same ``--workdir``: Orbax writes
each checkpoint from all processes and reads it back on each, and evaluation
merges the processes' results there.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from sln_jax import files
from sln_jax.errors import UserError


def is_multi_host() -> bool:
  """Whether the environment asks for more than one process."""
  env = os.environ
  return bool(env.get('JAX_COORDINATOR_ADDRESS')) or any(
      int(env.get(k, '1') or 1) > 1 for k in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')
  )


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{value!r} is not an integer', field=name) from None


def initialize() -> None:
  """``jax.distributed.initialize()`` with JAX_NUM_PROCESSES / JAX_PROCESS_ID
  from the environment when set."""
  try:
    jax.distributed.initialize(
        num_processes=_env_int('JAX_NUM_PROCESSES'), process_id=_env_int('JAX_PROCESS_ID')
    )
  except ValueError as err:
    raise UserError(
        f'{err} (set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and '
        'JAX_PROCESS_ID, or launch under SLURM / Open MPI)',
        field='jax.distributed.initialize',
    ) from None


def check_workdir(workdir: str) -> None:
  """Refuses, before any work, a ``workdir`` that cannot be made and, in a
  multi-host run, one that the processes do not all see as one directory.

  Process 0 leaves a file in the workdir, or its nearest existing parent, for
  the others to find. Every process learns every refusal, so none is left
  waiting at a barrier (on local disks the run would otherwise hang or fail at
  the first checkpoint read).
  """
  refusal = None
  try:
    files.check_dir_makeable(workdir, field='--workdir')
  except UserError as err:
    refusal = err
  if jax.process_count() == 1:
    if refusal is not None:
      raise refusal
    return
  token = (
      int(multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(4), np.int32)[0]))
      & 0xFFFFFFFF
  )
  probe = os.path.join(files.nearest_existing(workdir), f'.sln_shared_check_{token:08x}')
  chief = jax.process_index() == 0
  try:
    if chief and refusal is None:
      with open(probe, 'w') as f:
        f.write('written by process 0 of a multi-host sln_jax run; removed once all have looked\n')
    multihost_utils.sync_global_devices('sln_workdir_probe_written')
    flags_all = np.asarray(
        multihost_utils.process_allgather(
            np.array([refusal is None, os.path.exists(probe)], np.int32)
        )
    ).reshape(-1, 2)
  finally:
    if chief and os.path.exists(probe):
      os.remove(probe)
  if refusal is not None:
    raise refusal
  refused = [k for k in range(len(flags_all)) if not flags_all[k, 0]]
  if refused:
    raise UserError(
        f'refused by process {", ".join(map(str, refused))} (see its error)',
        path=workdir,
        field='--workdir',
    )
  blind = [k for k in range(len(flags_all)) if not flags_all[k, 1]]
  if blind:
    raise UserError(
        f'is not one directory shared by all {len(flags_all)} processes (process '
        f'{", ".join(map(str, blind))} cannot see the file process 0 wrote there); '
        'multi-host runs need a --workdir on a filesystem every host sees',
        path=workdir,
        field='--workdir',
    )
