"""The host-side inputs of main.py's modes, built from the config.

``build(config, mode)`` returns a ``DataSources``: callables that create this
process's tf.data iterators (batches with leading axes (local devices,
per-device batch)) and read the eval split's ground truth, so a mode builds
only what it uses, and the image preprocessing for ``--mode=predict``. The
dataset is prepared (TFDS) here, before any file of the run is written, so
input errors end the run first. TensorFlow lives in input_pipeline only; the
accelerator belongs to JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import pipeline, readers, tfds_builders
from sln_jax import parallel
from sln_jax.errors import UserError


@dataclasses.dataclass
class DataSources:
  """What main.py's modes read; each field is built only when a mode needs it."""

  train_batches: Optional[Callable[[], Iterable[dict]]] = None
  eval_batches: Optional[Callable[[], Iterable[dict]]] = None
  eval_annotations: Optional[Callable[[], Sequence]] = None
  eval_images_dir: Optional[str] = None  # the eval split's images (the report's pictures)
  eval_categories: Optional[Callable[[], list]] = None  # [{'id', 'name'}] of the eval file
  preprocess_image: Optional[Callable[[np.ndarray, Any], tuple]] = None


def _eval_annotation_file(config: ml_collections.ConfigDict, builder) -> tuple[str, Optional[str]]:
  """(annotation path, images dir or None) of the eval split:
  dataset.eval_annotations or the builder's file for dataset.eval_split."""
  d = config.dataset
  if d.eval_annotations:
    if not os.path.isfile(d.eval_annotations):
      raise UserError('no such file', path=d.eval_annotations, field='dataset.eval_annotations')
    return d.eval_annotations, None
  if not os.path.isdir(d.manual_dir):
    raise UserError(
        'no such directory (the eval annotations are read from it; '
        'or set dataset.eval_annotations)',
        path=d.manual_dir,
        field='dataset.manual_dir',
    )
  files = builder.split_files(os.path.abspath(d.manual_dir))
  if d.eval_split.split('[')[0] not in files:
    raise UserError(
        f'split {d.eval_split!r} has no annotation file in {d.manual_dir} '
        f'(found: {", ".join(sorted(files)) or "none"})',
        field='dataset.eval_split',
    )
  return files[d.eval_split.split('[')[0]]


def _eval_annotations(config: ml_collections.ConfigDict, builder) -> Callable[[], Sequence]:
  """Ground truth of the eval split (``_eval_annotation_file``), read when called."""
  path, images = _eval_annotation_file(config, builder)
  return lambda: readers.load_annotations(builder.FORMAT, path, images)


def _eval_categories(config: ml_collections.ConfigDict, builder) -> Callable[[], list]:
  """The eval annotation file's categories (``readers.load_categories``),
  read when called."""
  path, _ = _eval_annotation_file(config, builder)
  return lambda: readers.load_categories(builder.FORMAT, path)


def _eval_images_dir(config: ml_collections.ConfigDict, builder) -> Optional[str]:
  """The eval split's images directory in dataset.manual_dir, or None when
  manual_dir does not hold the split."""
  d = config.dataset
  if not os.path.isdir(d.manual_dir):
    return None
  found = builder.split_files(os.path.abspath(d.manual_dir)).get(d.eval_split.split('[')[0])
  return None if found is None or not os.path.isdir(found[1]) else found[1]


def _build_dataset_once(config: ml_collections.ConfigDict):
  """Prepares the dataset on process 0 first, then on the others: with a
  shared data_dir they find it prepared; with local disks each prepares its
  own copy. (Concurrent preparation into one shared directory races.)"""
  if jax.process_count() == 1:
    return tfds_builders.build_dataset(config)
  builder = refused = None
  if jax.process_index() == 0:
    try:
      builder = tfds_builders.build_dataset(config)
    except UserError as err:  # still meet the others at the barrier
      refused = err
  multihost_utils.sync_global_devices('sln_dataset_prepared')
  if refused is not None:
    raise refused
  # The others find it prepared (shared data_dir; checked against their
  # manual_dir) or prepare their own copy; a refusal of process 0's data
  # is theirs too.
  return builder or tfds_builders.build_dataset(config)


def build(config: ml_collections.ConfigDict, mode: str) -> DataSources:
  """The inputs of ``mode`` (train_and_evaluate, train, evaluate, predict)."""
  tf.config.set_visible_devices([], 'GPU')  # the accelerator belongs to JAX
  data = DataSources(preprocess_image=pipeline.preprocess_image_for_inference)
  if mode == 'predict':
    return data
  builder = _build_dataset_once(config)
  shard = dict(
      shard_index=jax.process_index(),
      num_shards=jax.process_count(),
      num_local_devices=jax.local_device_count(),
      builder=builder,
  )
  # functools.partial binds each split's batch size now (a lambda would read
  # a variable shared by both branches when it is called).
  if mode in ('train', 'train_and_evaluate'):
    _, train_per_device = parallel.data_parallel_batch(config)
    data.train_batches = functools.partial(
        pipeline.create_split,
        config,
        config.dataset.train_split,
        train=True,
        per_device_batch=train_per_device,
        **shard,
    )
  if mode in ('evaluate', 'train_and_evaluate'):
    eval_per_device = max(1, -(-int(config.eval.batch_size) // jax.device_count()))
    data.eval_batches = functools.partial(
        pipeline.create_split,
        config,
        config.dataset.eval_split,
        train=False,
        per_device_batch=eval_per_device,
        **shard,
    )
    data.eval_annotations = _eval_annotations(config, builder)
    data.eval_images_dir = _eval_images_dir(config, builder)
    data.eval_categories = _eval_categories(config, builder)
  return data
