"""SLN in JAX: train, evaluate and predict from one ml_collections config.

  python main.py --config=configs/synthetic.py --workdir=runs/demo
  python main.py --config=configs/cocoa.py --workdir=runs/cocoa --mode=evaluate \
      --config.eval.protocol=amodalapi
  python main.py --config=configs/cocoa.py --workdir=runs/cocoa --mode=predict \
      --config.predict.input_dir=photos --config.predict.output_dir=out

Any config field can be overridden with --config.<path>=<value>. Errors the
user can fix (unknown field, missing dataset files, bad paths) print one line
and exit with code 2. Multi-host: jax.distributed.initialize() runs when the
environment names a coordinator (JAX_COORDINATOR_ADDRESS=host:port with
JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a SLURM / Open MPI job with more
than one task); each process reads its own input shard.
"""
from __future__ import annotations

import functools
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sln_jax import cliutil

# TensorFlow's C++ warnings (grappler cost-model noise about CropAndResize on
# every tf.data graph) drown the progress bars; TF_CPP_MIN_LOG_LEVEL=0 shows them.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py); override fields with --config.a.b=v.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs, metrics.')
_MODE = flags.DEFINE_enum('mode', 'train_and_evaluate',
                          ['train_and_evaluate', 'train', 'evaluate', 'predict'],
                          'What to run.')


def _multi_host() -> bool:
  env = os.environ
  return bool(env.get('JAX_COORDINATOR_ADDRESS')) or any(
      int(env.get(k, '1') or 1) > 1 for k in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def _env_int(name: str):
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise cliutil.UserError(f'{value!r} is not an integer', field=name) from None


def _initialize_distributed() -> None:
  """jax.distributed.initialize() with JAX_NUM_PROCESSES / JAX_PROCESS_ID
  from the environment when set (SLURM, Open MPI and TPU pods are detected
  without them)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(num_processes=_env_int('JAX_NUM_PROCESSES'),
                               process_id=_env_int('JAX_PROCESS_ID'))
  except ValueError as err:
    raise cliutil.UserError(
        f'{err} (set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and '
        'JAX_PROCESS_ID, or launch under SLURM / Open MPI)',
        field='jax.distributed.initialize') from None


def _check_workdir(workdir: str) -> None:
  """Refuses, before any work, a ``workdir`` that cannot be made and, in a
  multi-host run, one that the processes do not all see as one directory
  (Orbax writes each checkpoint from all processes and reads it back on
  each; evaluation merges the processes' results there). Process 0 leaves a
  file in the workdir, or its nearest existing parent, for the others to
  find. Every process learns every refusal, so none is left waiting at a
  barrier (on local disks the run would otherwise hang or fail at the first
  checkpoint read)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  refusal = None
  try:
    cliutil.check_dir_makeable(workdir, field='--workdir')
  except cliutil.UserError as err:
    refusal = err
  if jax.process_count() == 1:
    if refusal is not None:
      raise refusal
    return
  token = int(multihost_utils.broadcast_one_to_all(
      np.frombuffer(os.urandom(4), np.int32)[0])) & 0xffffffff
  probe = os.path.join(cliutil.nearest_existing(workdir), f'.sln_shared_check_{token:08x}')
  chief = jax.process_index() == 0
  try:
    if chief and refusal is None:
      with open(probe, 'w') as f:
        f.write('written by process 0 of a multi-host sln_jax run; removed once all have looked\n')
    multihost_utils.sync_global_devices('sln_workdir_probe_written')
    flags_all = np.asarray(multihost_utils.process_allgather(
        np.array([refusal is None, os.path.exists(probe)], np.int32))).reshape(-1, 2)
  finally:
    if chief and os.path.exists(probe):
      os.remove(probe)
  if refusal is not None:
    raise refusal
  refused = [k for k in range(len(flags_all)) if not flags_all[k, 0]]
  if refused:
    raise cliutil.UserError(
        f'refused by process {", ".join(map(str, refused))} (see its error)',
        path=workdir, field='--workdir')
  blind = [k for k in range(len(flags_all)) if not flags_all[k, 1]]
  if blind:
    raise cliutil.UserError(
        f'is not one directory shared by all {len(flags_all)} processes (process '
        f'{", ".join(map(str, blind))} cannot see the file process 0 wrote there); '
        'multi-host runs need a --workdir on a filesystem every host sees',
        path=workdir, field='--workdir')


def _eval_annotations(config, builder):
  """Ground truth of the eval split: dataset.eval_annotations or the
  builder's annotation file for dataset.eval_split."""
  from input_pipeline import readers  # pylint: disable=g-import-not-at-top
  d = config.dataset
  if d.eval_annotations:
    if not os.path.isfile(d.eval_annotations):
      raise cliutil.UserError('no such file', path=d.eval_annotations,
                              field='dataset.eval_annotations')
    return lambda: readers.load_annotations(builder.FORMAT, d.eval_annotations)
  if not os.path.isdir(d.manual_dir):
    raise cliutil.UserError('no such directory (the eval annotations are read from it; '
                            'or set dataset.eval_annotations)',
                            path=d.manual_dir, field='dataset.manual_dir')
  files = builder.split_files(os.path.abspath(d.manual_dir))
  if d.eval_split.split('[')[0] not in files:
    raise cliutil.UserError(
        f'split {d.eval_split!r} has no annotation file in {d.manual_dir} '
        f'(found: {", ".join(sorted(files)) or "none"})', field='dataset.eval_split')
  path, images = files[d.eval_split.split('[')[0]]
  return lambda: readers.load_annotations(builder.FORMAT, path, images)


def _build_dataset_once(config):
  """Prepares the dataset on process 0 first, then on the others: with a
  shared data_dir they find it prepared; with local disks each prepares its
  own copy. (Concurrent preparation into one shared directory races.)"""
  import jax  # pylint: disable=g-import-not-at-top
  from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return tfds_builders.build_dataset(config)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  builder = refused = None
  if jax.process_index() == 0:
    try:
      builder = tfds_builders.build_dataset(config)
    except cliutil.UserError as err:  # still meet the others at the barrier
      refused = err
  multihost_utils.sync_global_devices('sln_dataset_prepared')
  if refused is not None:
    raise refused
  # The others find it prepared (shared data_dir; checked against their
  # manual_dir) or prepare their own copy; a refusal of process 0's data
  # is theirs too.
  return builder or tfds_builders.build_dataset(config)


def _data_sources(config, mode: str):
  """Builds the input side (TensorFlow lives here, not in sln_jax)."""
  import jax  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from sln_jax import modes, train  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # the accelerator belongs to JAX
  data = modes.DataSources(preprocess_image=pipeline.preprocess_image_for_inference)
  if mode == 'predict':
    return data
  builder = _build_dataset_once(config)
  shard = dict(shard_index=jax.process_index(), num_shards=jax.process_count(),
               num_local_devices=jax.local_device_count(), builder=builder)
  # functools.partial binds each split's batch size now (a lambda would read
  # a variable shared by both branches when it is called).
  if mode in ('train', 'train_and_evaluate'):
    _, train_per_device = train.data_parallel_batch(config)
    data.train_batches = functools.partial(
        pipeline.create_split, config, config.dataset.train_split, train=True,
        per_device_batch=train_per_device, **shard)
  if mode in ('evaluate', 'train_and_evaluate'):
    eval_per_device = max(1, -(-int(config.eval.batch_size) // jax.device_count()))
    data.eval_batches = functools.partial(
        pipeline.create_split, config, config.dataset.eval_split, train=False,
        per_device_batch=eval_per_device, **shard)
    data.eval_annotations = _eval_annotations(config, builder)
  return data


# Library warnings about the libraries themselves, printed on every run:
# TFDS's own TensorFeature.decode_example reads the deprecated ``dtype``,
# every builder config is "custom", and the dataset directory it is about to
# prepare has no dataset_info.json yet; Orbax announces the options a
# read-only CheckpointManager (evaluate / predict) sets, and misses a
# step-level metadata file inside the item directory it restores (or, for a
# damaged one, its item metadata: the one-line error that follows says so).
_LIBRARY_NOISE = {
    'tensorflow_datasets': re.compile(r'`FeatureConnector\.dtype` is deprecated'
                                      r'|Using custom data configuration'
                                      r'|Variant folder .* has no dataset_info\.json$'),
    'orbax': re.compile(r'CheckpointManagerOptions\.read_only=True|Given directory is read only'
                        r'|Metadata file does not exist|Failed to get item metadata'),
}


def _drop_library_noise(record) -> bool:
  return not any(package in record.pathname and noise.match(record.getMessage())
                 for package, noise in _LIBRARY_NOISE.items())


class _LazyWriter:
  """A clu metric writer made (with ``workdir``) on first use, so a run
  refused before its first metric leaves no empty events file or workdir."""

  def __init__(self, make):
    self._make, self._writer = make, None

  def __getattr__(self, name):
    if self._writer is None:
      if name == 'close':
        return lambda: None
      self._writer = self._make()
    return getattr(self._writer, name)


def _main() -> int:
  if not flags.FLAGS['verbosity'].present:
    # Library INFO logs (Orbax, TFDS) drown the progress bars; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_drop_library_noise)
  import jax  # pylint: disable=g-import-not-at-top
  if _multi_host():
    _initialize_distributed()
  from sln_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.enable()
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from sln_jax import config_checks, modes  # pylint: disable=g-import-not-at-top
  config, mode = _CONFIG.value, _MODE.value
  if config is None:
    raise cliutil.UserError('is required (e.g. --config=configs/synthetic.py)', field='--config')
  if not _WORKDIR.value:
    raise cliutil.UserError('is required', field='--workdir')
  config_checks.check_config(config)
  if mode in ('train', 'train_and_evaluate'):
    modes.check_stages(config)
  workdir = os.path.abspath(_WORKDIR.value)
  if mode != 'predict':  # predict only reads the workdir (it may be read-only)
    _check_workdir(workdir)  # before hours of work
  data = _data_sources(config, mode)  # input errors end the run before workdir exists
  writer = _LazyWriter(lambda: metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0))
  try:
    modes.run(config, workdir, mode, writer, data)
  finally:
    writer.close()
  return 0


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  cliutil.run_cli(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(cliutil.parse_flags, config_flag=_CONFIG))
