"""Data parallelism over the local devices: replicate, shard, unreplicate.

Arrays that ``jax.pmap`` consumes have a leading axis of local devices; a
batch has leading axes (local devices, per-device batch). ``replicate`` and
``shard`` place host arrays with the sharding ``pmap`` returns, so the first
step does not recompile; ``unreplicate`` and ``first_replica`` read the first
device's shard without queueing work on the others.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import ml_collections
import numpy as np

from sln_jax.errors import UserError

AXIS = 'batch'


PyTree = Any


Batch = dict


def data_parallel_batch(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(local devices, per-device batch) for ``train.batch_size`` global images."""
  global_batch, devices = int(config.train.batch_size), jax.device_count()
  if global_batch <= 0 or global_batch % devices:
    raise UserError(
        f'{global_batch} is not a positive multiple of the ' f'{devices} devices',
        field='train.batch_size',
    )
  return jax.local_device_count(), global_batch // devices


def _pmap_sharding(devices: Optional[Sequence[Any]] = None) -> jax.sharding.Sharding:
  devices = list(devices or jax.local_devices())
  return jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS)
  )


def replicate(tree: PyTree, devices: Optional[Sequence[Any]] = None) -> PyTree:
  """Copies ``tree`` to ``devices`` (default: every local device) with the
  sharding ``jax.pmap`` returns (so the first step does not recompile)."""
  devices = list(devices or jax.local_devices())
  sharding = _pmap_sharding(devices)
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree
  )


def shard(tree: PyTree) -> PyTree:
  """Puts host arrays with leading axes (local devices, ...) on the local
  devices, slice d on device d (the layout ``jax.pmap`` takes). Returns at
  once: the copies run asynchronously."""
  sharding = _pmap_sharding()
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def prefetch_to_devices(batches: Iterable[Batch], depth: int = 2) -> Iterator[Batch]:
  """Yields ``batches`` (host arrays, leading axes (local devices, ...)) as
  device arrays (:func:`shard`), keeping ``depth`` batches in flight so the
  host-to-device copies overlap the running step. ``depth`` 0: no lookahead
  (each batch is copied when it is asked for)."""
  it = iter(batches)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(it, n):
      queue.append(shard(batch))

  enqueue(max(1, depth))
  while queue:
    yield queue.popleft()
    enqueue(1)


def _first_shard(x: Any) -> Any:
  """The first local device's shard of a device array (leading axis of
  length 1 kept); other leaves as they are. Taking it queues no computation."""
  return x.addressable_data(0) if isinstance(x, jax.Array) else x


@jax.jit
def _drop_leading_axis(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x[0], tree)


def unreplicate(tree: PyTree) -> PyTree:
  """One copy of a tree replicated along a leading device axis, as arrays on
  the first local device. Slices that device's shard: ``x[0]`` on the whole
  array would run a computation across every device (docs/benchmarks.md).
  One program drops the axis of every array leaf (per-leaf ``[0]`` would
  compile one per shape)."""
  leaves, treedef = jax.tree.flatten(tree)
  on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  sliced = dict(zip(on_device, _drop_leading_axis([_first_shard(leaves[i]) for i in on_device])))
  return jax.tree.unflatten(
      treedef, [sliced[i] if i in sliced else x[0] for i, x in enumerate(leaves)]
  )


def first_replica(tree: PyTree) -> PyTree:
  """The host (numpy) values of the first local device's copy of each leaf
  (leading device axis dropped), e.g. a step's pmean-ed metrics.

  Copies one shard per leaf and queues no computation on the devices, so it
  waits only for the step that produced ``tree``; ``x[0]`` would queue a
  slice on every device behind the steps dispatched since, and the host
  would wait for those too.
  """
  return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(jax.tree.map(_first_shard, tree)))
