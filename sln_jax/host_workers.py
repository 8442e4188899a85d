"""Host work beside the accelerator: calls run in worker processes, results
come back in submission order.

Evaluation turns every image's detections into COCO results on the host
(``evaluation.results.detections_to_results``: paste, threshold, RLE encode,
depth order). In one thread that sets the pace of an evaluation on an
accelerator; the images are independent, so worker processes share it out.
Workers are started with ``spawn`` (the parent runs JAX's threads, which
``fork`` would copy half-way) and import only what the called function needs
(numpy, pycocotools, PIL; not JAX).

Every process doing this work, the parent included when it runs the calls
itself, keeps numpy's BLAS on one thread (threadpoolctl): its matrices are a
few dozen rows, and OpenBLAS's extra threads only spin, competing with the
workers for the cores (docs/benchmarks.md).

No heavy imports here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
from typing import Any, Callable

import numpy  # noqa: F401  (loads the BLAS that threadpoolctl limits)
import threadpoolctl


def _one_blas_thread():
  """Limits the BLAS libraries loaded so far (numpy's first) to one thread;
  returns the handle that restores them."""
  return threadpoolctl.threadpool_limits(limits=1, user_api='blas')


def available_cpus() -> int:
  """CPUs this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def default_workers(platform: str, cpus: int | None = None) -> int:
  """Worker processes for ``eval.host_workers = -1``: none on a CPU backend
  (XLA computes on the same cores), else every CPU but two (the main
  process dispatching steps and reading batches, and tf.data), at most 16."""
  if platform == 'cpu':
    return 0
  cpus = available_cpus() if cpus is None else cpus
  return max(0, min(16, cpus - 2))


class OrderedWorkers:
  """Runs ``fn(*args, **kwargs)`` calls in ``workers`` processes and returns
  their results in the order they were submitted.

  ``workers`` 0 runs each call at once in this process. At most
  ``max_pending`` calls (default 4 per worker) are in flight: ``submit``
  first waits for the oldest, so a host slower than the device holds a
  bounded number of inputs in memory. A call's exception is raised by the
  ``submit`` or ``results`` that collects it. Use as a context manager (the
  workers are stopped on exit, pending calls cancelled on an error).

  ``fn`` must be importable by name (a module-level function) and its
  arguments and results picklable.
  """

  def __init__(self, workers: int, max_pending: int = 0):
    if workers < 0:
      raise ValueError(f'workers must be >= 0, got {workers}')
    self.workers = int(workers)
    self.max_pending = int(max_pending) or 4 * max(1, self.workers)
    self._pool = self._limits = None
    if self.workers:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.workers,
          mp_context=multiprocessing.get_context('spawn'),
          initializer=_one_blas_thread,
      )
    else:
      self._limits = _one_blas_thread()
    self._pending: collections.deque = collections.deque()
    self._done: list = []

  def submit(self, fn: Callable[..., Any], *args, **kwargs) -> None:
    if self._pool is None:
      self._done.append(fn(*args, **kwargs))
      return
    while len(self._pending) >= self.max_pending:
      self._done.append(self._pending.popleft().result())
    self._pending.append(self._pool.submit(fn, *args, **kwargs))

  def results(self) -> list:
    """Every result not returned before, in submission order (waits for the
    calls still running)."""
    while self._pending:
      self._done.append(self._pending.popleft().result())
    done, self._done = self._done, []
    return done

  def close(self, cancel: bool = False) -> None:
    """Stops the workers (``cancel``: drops the calls not started) or, with
    no workers, gives the BLAS its threads back."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=cancel)
      self._pool = None
    if self._limits is not None:
      self._limits.restore_original_limits()
      self._limits = None

  def __enter__(self) -> 'OrderedWorkers':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(cancel=exc_type is not None)
