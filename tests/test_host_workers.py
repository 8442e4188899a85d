"""sln_jax.host_workers: calls in worker processes, results in submission
order, bounded in-flight calls, errors raised, BLAS on one thread."""

import os
import time

import pytest
import threadpoolctl

from sln_jax import host_workers


def _tagged(x, delay=0.0):
  """x and the process that computed it (module level: spawn pickles it by name)."""
  time.sleep(delay)
  return x, os.getpid()


def _blas_threads():
  """Threads of each BLAS library loaded (numpy's; scipy or torch may load more)."""
  import numpy  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  return [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']


def _one_thread_each(threads):
  return bool(threads) and all(t == 1 for t in threads)


def _fail(x):
  raise ValueError(f'bad input {x}')


def test_results_come_back_in_submission_order_from_other_processes():
  with host_workers.OrderedWorkers(2) as workers:
    # The first calls take longest, so they finish last.
    for i in range(6):
      workers.submit(_tagged, i, delay=0.3 - 0.05 * i)
    got = workers.results()
    assert [x for x, _ in got] == list(range(6))
    assert os.getpid() not in {pid for _, pid in got}
    assert workers.results() == []  # each result is returned once
    workers.submit(_tagged, 'more')
    assert [x for x, _ in workers.results()] == ['more']
    # Every worker's BLAS runs on one thread.
    for _ in range(4):
      workers.submit(_blas_threads)
    assert all(_one_thread_each(threads) for threads in workers.results())


def test_no_workers_runs_inline_with_one_blas_thread_then_restores_it():
  before = _blas_threads()
  with host_workers.OrderedWorkers(0) as workers:
    workers.submit(_tagged, 1)
    workers.submit(_blas_threads)
    (x, pid), threads = workers.results()
  assert (x, pid) == (1, os.getpid()) and _one_thread_each(threads)
  assert _blas_threads() == before


def test_submit_waits_once_max_pending_calls_are_in_flight():
  with host_workers.OrderedWorkers(1, max_pending=1) as workers:
    workers.submit(_tagged, 'warm-up')  # starts the worker process
    workers.results()
    start = time.perf_counter()
    workers.submit(_tagged, 'slow', delay=0.5)
    assert time.perf_counter() - start < 0.4  # the first call does not wait
    workers.submit(_tagged, 'next')  # waits for 'slow'
    assert time.perf_counter() - start >= 0.5
    assert [x for x, _ in workers.results()] == ['slow', 'next']


def test_a_calls_error_is_raised_to_the_caller():
  with pytest.raises(ValueError, match='bad input 3'):
    with host_workers.OrderedWorkers(1) as workers:
      workers.submit(_tagged, 1)
      workers.submit(_fail, 3)
      workers.results()
  with pytest.raises(ValueError, match='bad input 4'):
    with host_workers.OrderedWorkers(0) as workers:
      workers.submit(_fail, 4)
  with pytest.raises(ValueError, match='workers'):
    host_workers.OrderedWorkers(-1)


def test_default_workers_leave_the_cpu_backend_alone_and_two_cpus_free():
  assert host_workers.default_workers('cpu', cpus=64) == 0
  assert host_workers.default_workers('gpu', cpus=16) == 14
  assert host_workers.default_workers('gpu', cpus=2) == 0
  assert host_workers.default_workers('tpu', cpus=224) == 16
  assert 1 <= host_workers.available_cpus() <= (os.cpu_count() or 1)
