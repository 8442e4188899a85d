"""Metric writers: the clu writer interface and one made on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # importing clu.metric_writers at run time would import TensorFlow
  from clu.metric_writers.interface import MetricWriter
else:
  MetricWriter = Any


class LazyWriter:
  """A metric writer made by ``make()`` on first use, so a run refused before
  its first metric leaves no empty events file or workdir. Closing one never
  used does nothing."""

  def __init__(self, make: Callable[[], MetricWriter]):
    self._make, self._writer = make, None

  def __getattr__(self, name):
    if self._writer is None:
      if name == 'close':
        return lambda: None
      self._writer = self._make()
    return getattr(self._writer, name)
