"""Speed of SLN training and inference steps on device-resident synthetic batches.

  python scripts/benchmark.py --config=configs/default.py --mode=train --steps=20
  python scripts/benchmark.py --config=configs/default.py --mode=infer --dtype=bfloat16 --peer

What is timed is what users run: the training loop's step
(``train.make_stage_step`` for ``--stage``: frozen parts, clipping, weight
decay, momentum, gradient pmean, donated state) and the evaluator's
inference (``train.make_infer_fn``: proposals, detection, layered masks),
both pmapped over every local device with the global ``--batch`` split
evenly. Batches are built in numpy and put on the devices once; the timed
loop only dispatches steps. Needs no TensorFlow.

``--runs`` measures several MODE:DTYPE:BATCH in one process (one jax and
torch start-up, the model's variables built once, the peer in one worker
process kept for the sweep), printing each run's line as it ends; a run
that fails (out of memory) gives a line with ``error`` and the sweep goes
on, and ``--budget_s`` starts no run after that many seconds, so a device
lease of a few minutes yields the runs listed first (scripts/gpu_benchmarks.sh).

Prints one JSON line per measurement: device, stage, dtype, batch, image
size, compile_s, step_ms, images_per_s, model FLOPs per image (XLA cost
analysis of the compiled step), MFU against --peak_tflops (default: the
device's dense peak for the dtype, peak_tflops()), memory (xla_memory_mib: one device's program by
XLA's buffer assignment; peak_memory_mib: the allocator's peak where the
backend keeps one, not on CPU), and with --peer the same work in torchvision's
Mask R-CNN R101-FPN (same image size, batch, dtype policy and trained
stages) with the ratio of images/s. --profile_dir adds a jax.profiler trace.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import json
import multiprocessing
import os
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from sln_jax import cli, config_checks, errors, files

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Model/config file.')
flags.DEFINE_enum('mode', 'train', ['train', 'infer'], 'What to time.')
flags.DEFINE_integer(
    'steps',
    10,
    'Timed steps (after the compile and two warm-up steps); '
    '0: compile only (compile_s, FLOPs, memory; no timing, no peer).',
)
flags.DEFINE_integer('batch', 0, 'Global batch; 0 = config.train.batch_size.')
flags.DEFINE_integer('image_size', 0, 'Canvas size; 0 = config.input.image_size.')
flags.DEFINE_enum(
    'dtype', '', ['', 'float32', 'bfloat16'], 'Compute dtype; "" = config.model.dtype.'
)
flags.DEFINE_float(
    'peak_tflops',
    0.0,
    'Peak TFLOP/s of the device for MFU (0: from the device kind and dtype, peak_tflops()).',
)
flags.DEFINE_bool(
    'peer', False, 'Also time torchvision Mask R-CNN R101-FPN (needs torch + torchvision).'
)
flags.DEFINE_string('output', '', 'Append the JSON lines to this file too.')
flags.DEFINE_string(
    'stage',
    'all',
    'Training stage whose parameters get gradients '
    '(heads, 4+, all or a regex; train.STAGE_PATTERNS).',
)
flags.DEFINE_string(
    'profile_dir',
    '',
    'Also write a jax.profiler trace of a few '
    'timed steps here (TensorBoard / Perfetto); with --runs, one '
    'MODE_DTYPE_BATCH folder in it per run.',
)
flags.DEFINE_list(
    'runs',
    [],
    'Several runs in one process, MODE:DTYPE:BATCH each (e.g. '
    'infer:bfloat16:1,train:bfloat16:2); replaces --mode, --dtype and --batch. '
    'A failing run gives a line with "error" and the next one starts.',
)
flags.DEFINE_float(
    'budget_s',
    0.0,
    'With --runs: start no run once this many seconds have '
    'passed since the first started (the first always runs); each run left '
    'gives a line with "error": "skipped: ...". 0: no limit.',
)
FLAGS = flags.FLAGS

PROFILE_STEPS = 3  # steps inside the --profile_dir trace

# Dense peak TFLOP/s by device kind (first match wins): (bf16, fp32). fp32
# matmuls and convolutions run as TF32 on NVIDIA tensor cores (XLA's default
# precision) and as bf16 passes on TPUs.
_PEAKS = (
    ('H100', 989.0, 494.5),
    ('H200', 989.0, 494.5),
    ('A100', 312.0, 156.0),
    ('TPU v4', 275.0, 275.0),
    ('TPU v5 lite', 197.0, 197.0),
    ('TPU v5e', 197.0, 197.0),
    ('TPU v5', 459.0, 459.0),
    ('TPU v6', 918.0, 918.0),
)


def peak_tflops(device_kind: str, dtype: str) -> float:
  """Dense peak TFLOP/s of ``device_kind`` for ``dtype`` (0.0: unknown)."""
  for kind, bf16, fp32 in _PEAKS:
    if kind.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return 0.0


class Run(NamedTuple):
  """One measurement of a sweep: ``MODE:DTYPE:BATCH``."""

  mode: str
  dtype: str
  batch: int

  @property
  def name(self) -> str:
    return f'{self.mode}_{self.dtype}_{self.batch}'


def parse_runs(items: list[str]) -> list[Run]:
  """``['infer:bfloat16:1', ...]`` -> Runs; a malformed item is a UserError
  naming --runs."""
  runs = []
  for item in items:
    parts = item.strip().split(':')
    try:
      mode, dtype, batch = parts
      run = Run(mode, dtype, int(batch))
      if mode not in ('train', 'infer') or dtype not in ('float32', 'bfloat16') or run.batch < 1:
        raise ValueError
    except ValueError:
      raise errors.UserError(
          f'{item!r}: expected MODE:DTYPE:BATCH with MODE train or infer, DTYPE float32 '
          f'or bfloat16 and BATCH >= 1, e.g. infer:bfloat16:1',
          field='--runs',
      ) from None
    runs.append(run)
  return runs


def error_text(err: BaseException, limit: int) -> str:
  """``'Type: first non-blank line of the message'``, the line cut at ``limit``."""
  lines = [l for l in str(err).strip().splitlines() if l.strip()]
  return f'{type(err).__name__}: {lines[0][:limit] if lines else ""}'


def sweep(
    runs: list[Run],
    measure: Callable[[Run], dict],
    budget_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[dict]:
  """Yields one row per run, in order: ``measure(run)``; where it raised,
  ``{mode, dtype, batch, error}`` with the exception's first line; once
  ``budget_s`` (> 0) seconds have passed since the first run started, the
  runs left are not started and yield ``error`` = 'skipped: ...'."""
  start = None
  for run in runs:
    base = {'mode': run.mode, 'dtype': run.dtype, 'batch': run.batch}
    now = clock()
    if start is None:
      start = now
    elif budget_s > 0 and now - start >= budget_s:
      yield dict(
          base,
          error=f'skipped: --budget_s={budget_s:g} spent '
          f'({now - start:.0f} s since the first run)',
      )
      continue
    try:
      row = measure(run)
    except Exception as err:  # pylint: disable=broad-except - the row says why; the next runs
      row = dict(base, error=error_text(err, 300))
    gc.collect()  # the failed run's device buffers, before the next
    yield row


def synthetic_batch(config, batch: int, size: int, rng: np.random.Generator) -> dict:
  """A batch in the pipeline's layout (docs/architecture.md), no device axis."""
  m = config.input.max_instances
  k = config.input.gt_mask_size
  num_layers = config.model.num_layers
  g = config.model.glm.image_size
  n_obj = min(8, m)
  y1 = rng.uniform(0, size * 0.6, (batch, n_obj))
  x1 = rng.uniform(0, size * 0.6, (batch, n_obj))
  h = rng.uniform(size * 0.1, size * 0.4, (batch, n_obj))
  w = rng.uniform(size * 0.1, size * 0.4, (batch, n_obj))
  boxes = np.zeros((batch, m, 4), np.float32)
  boxes[:, :n_obj] = np.stack([y1, x1, y1 + h, x1 + w], -1)
  valid = np.zeros((batch, m), bool)
  valid[:, :n_obj] = True
  layers = np.zeros((batch, m, k, k, num_layers), np.float32)
  layers[:, :n_obj, k // 4 : 3 * k // 4, k // 4 : 3 * k // 4, 0] = 1.0
  return {
      'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
      'glm_image': rng.integers(0, 256, (batch, g, g, 3), dtype=np.uint8),
      'image_shape': np.full((batch, 2), size, np.float32),
      'image_scale': np.ones((batch, 2), np.float32),
      'image_id': np.arange(batch, dtype=np.int32),
      'gt_boxes': boxes,
      'gt_classes': valid.astype(np.int32),
      'gt_valid': valid,
      'gt_layers': layers,
      'gt_layer_boxes': boxes.copy(),
      'gt_occlude_rate': np.zeros((batch, m), np.float32),
      'gt_is_stuff': np.zeros((batch, m), bool),
      'gt_depth_rank': np.zeros((batch, m), np.int32),
  }


def _compile(fn, args) -> tuple[Any, float, float]:
  """(compiled, compile seconds, FLOPs per call from XLA's cost analysis;
  for a pmapped step the FLOPs of one device's program)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return compiled, compile_s, float((cost or {}).get('flops', 0.0))


def program_memory_bytes(compiled) -> int:
  """Bytes one device's compiled program needs by XLA's buffer assignment:
  arguments + outputs + temporaries, less what donation aliases (0 if the
  backend reports nothing)."""
  try:
    m = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return 0
  if m is None:
    return 0
  return int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def device_peak_bytes() -> int:
  """Peak bytes in use on the first local device since the process started
  (0 where the backend keeps no statistics, e.g. the CPU)."""
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  return int(stats.get('peak_bytes_in_use', 0))


def benchmark_sln(
    config,
    mode: str,
    batch: int,
    size: int,
    steps: int,
    stage: str = 'all',
    profile_dir: str = '',
    variables: Optional[dict] = None,
) -> dict:
  """Times the training loop's own step (``train.make_stage_step``: stage
  masks, clipping, weight decay, momentum, pmean over every local device,
  donated state) or the evaluator's inference (``train.make_infer_fn``),
  both ``jax.pmap``ped over the local devices with ``batch`` split evenly.
  The timed loop feeds each step's state into the next, as training does.

  ``variables``: initial variables of this config's model (float32 whatever
  ``model.dtype``, so one set serves both dtypes of a sweep); None: fresh
  ones. The result's ``variables`` are the ones used. ``peak_bytes`` is the
  allocator's peak if this run raised it, else 0 (jax keeps one peak per
  process, not per run)."""
  import jax

  from sln_jax import parallel
  from sln_jax.models import cpu_conv
  from sln_jax.models import sln as sln_lib
  from sln_jax.training import state as state_lib
  from sln_jax.training import step as step_lib

  devices = jax.local_device_count()
  if batch % devices:
    raise ValueError(f'batch {batch} is not a multiple of the {devices} local devices')
  config.input.image_size = size
  peak_before = device_peak_bytes()
  if variables is None:
    model, variables = state_lib.create_model(config)
  else:
    model = sln_lib.build_model(config)
  np_batch = synthetic_batch(config, batch, size, np.random.default_rng(0))
  sharded = jax.tree.map(lambda x: x.reshape((devices, batch // devices) + x.shape[1:]), np_batch)
  dev_batch = parallel.shard(sharded)
  if mode == 'train':
    config.train.stages = ((stage, 1_000_000, 1e-3),)
    state = state_lib.create_train_state(config, variables, jax.random.PRNGKey(1))
    step = lambda: jax.pmap(
        step_lib.make_stage_step(model, config, state.params, state.batch_stats, stage),
        axis_name=parallel.AXIS,
        donate_argnums=(0,),
    )
    rstate = parallel.replicate(state)
    traced = cpu_conv.traced_count()
    compiled, compile_s, flops = _compile(step(), (rstate, dev_batch))  # lowering donates nothing
    if cpu_conv.traced_count() > traced:
      # XLA counts the body of cpu_conv's loop over kernel taps once: count
      # the FLOPs of the same step with XLA's own kernel gradients.
      with cpu_conv.xla_kernel_gradients():
        flops = _compile(step(), (rstate, dev_batch))[2]

    def run(n):
      nonlocal rstate
      out = None
      for _ in range(n):
        rstate, out = compiled(rstate, dev_batch)
      jax.block_until_ready((rstate, out))

  else:
    fn = jax.pmap(step_lib.make_infer_fn(model), axis_name=parallel.AXIS)
    rvars = parallel.replicate(variables)
    compiled, compile_s, flops = _compile(fn, (rvars, dev_batch))

    def run(n):
      out = None
      for _ in range(n):
        out = compiled(rvars, dev_batch)
      jax.block_until_ready(out)

  step_s = None
  if steps > 0:  # else compile only
    run(2)  # warm-up (first runs allocate)
    t0 = time.perf_counter()
    run(steps)
    step_s = (time.perf_counter() - t0) / steps
    if profile_dir:
      os.makedirs(profile_dir, exist_ok=True)
      with open(os.path.join(profile_dir, 'step.hlo.txt'), 'w') as f:
        f.write(compiled.as_text())  # op -> source layer for profile_summary.py
      with jax.profiler.trace(profile_dir):
        run(PROFILE_STEPS)
  peak = device_peak_bytes()
  return dict(
      compile_s=compile_s,
      step_s=step_s,
      flops=flops * devices,
      program_bytes=program_memory_bytes(compiled),
      peak_bytes=peak if peak > peak_before else 0,
      params=sln_lib.count_parameters(variables),
      variables=variables,
  )


def benchmark_peer(
    mode: str, batch: int, size: int, steps: int, dtype: str, trainable_layers: int = 5
) -> dict:
  """torchvision Mask R-CNN R101-FPN, same image size, batch and dtype policy
  (bf16: autocast; fp32: TF32 tensor cores allowed, as XLA's default
  precision on NVIDIA GPUs), cuDNN autotuning on, frozen BatchNorm,
  ``trainable_layers`` ResNet stages trained (5: all, as SLN's 'all')."""
  import torch
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()  # per run, in a worker that serves a sweep
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  backbone = resnet_fpn_backbone(
      backbone_name='resnet101', weights=None, trainable_layers=trainable_layers
  )
  model = MaskRCNN(backbone, num_classes=2, min_size=size, max_size=size).to(device)
  rng = np.random.default_rng(0)
  images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
  targets = []
  for _ in range(batch):
    n = 8
    xy = rng.uniform(0, size * 0.6, (n, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (n, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32, device=device)
    masks = torch.zeros(n, size, size, dtype=torch.uint8, device=device)
    for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
      masks[j, y0:y1, x0:x1] = 1
    targets.append(
        {'boxes': boxes, 'labels': torch.ones(n, dtype=torch.int64, device=device), 'masks': masks}
    )
  use_bf16 = dtype == 'bfloat16'
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

  def run_once():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
      if mode == 'train':
        model.train()
        losses = model(images, targets)
        loss = sum(losses.values())
      else:
        model.eval()
        with torch.no_grad():
          model(images)
        return
    opt.zero_grad()
    loss.backward()
    opt.step()

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()

  run_once()
  run_once()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    run_once()
  sync()
  step_s = (time.perf_counter() - t0) / steps
  peak = torch.cuda.max_memory_allocated() if device == 'cuda' else 0
  return dict(step_s=step_s, images_per_s=batch / step_s, device=device, peak_bytes=peak)


def _peer_and_release(*args) -> dict:
  """:func:`benchmark_peer`, then torch's cached device memory handed back
  (the worker outlives the run; jax's next run may need that memory)."""
  result = benchmark_peer(*args)
  import torch

  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
  return result


class PeerWorker:
  """Runs :func:`benchmark_peer` in one spawned process, started at the
  first call and kept for the next ones (torch and CUDA start once per
  sweep). Each call returns the result, or {'error': why} (torchvision
  missing or broken, out of memory, the worker killed: a fresh one serves
  the next call)."""

  def __init__(self):
    self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None

  def __call__(self, mode: str, batch: int, size: int, steps: int, dtype: str, stage: str) -> dict:
    layers = {'heads': 0, '4+': 2}.get(stage, 5)
    if self._pool is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          1, mp_context=multiprocessing.get_context('spawn')
      )
    try:
      return self._pool.submit(_peer_and_release, mode, batch, size, steps, dtype, layers).result()
    except concurrent.futures.process.BrokenProcessPool as err:
      self.close()
      return {'error': f'BrokenProcessPool: {err}'}
    except Exception as err:  # pylint: disable=broad-except
      return {'error': error_text(err, 200)}

  def close(self) -> None:
    """Ends the worker (its device memory goes back)."""
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None

  def __enter__(self) -> 'PeerWorker':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def main(argv):
  del argv
  cli.run_cli(_main)


def _main():
  import jax
  # compile_s is a compilation: never an executable loaded from jax's
  # persistent cache (JAX_COMPILATION_CACHE_DIR in the environment).
  jax.config.update('jax_enable_compilation_cache', False)
  base = _CONFIG.value
  if FLAGS.runs:
    runs = parse_runs(FLAGS.runs)
  else:
    runs = [Run(FLAGS.mode, FLAGS.dtype or base.model.dtype, FLAGS.batch or base.train.batch_size)]
  size = FLAGS.image_size or base.input.image_size
  base.input.image_size = size
  config_checks.check_input(base.input)  # not check_config: no pycocotools on GPU hosts
  for dtype in sorted({r.dtype for r in runs}):
    base.model.dtype = dtype
    config_checks.check_model(base.model)
  for run in runs:
    if run.batch < 1:
      raise errors.UserError(f'{run.batch} is not >= 1', field='--batch')
  if FLAGS.budget_s < 0:
    raise errors.UserError(f'{FLAGS.budget_s:g} is not >= 0', field='--budget_s')
  if FLAGS.output:  # before the measurement, not after it
    if os.path.isdir(FLAGS.output):
      raise errors.UserError(
          'is a directory, expected a file path', path=FLAGS.output, field='--output'
      )
    files.check_dir_makeable(os.path.dirname(os.path.abspath(FLAGS.output)), field='--output')
  peer_on = FLAGS.peer and FLAGS.steps > 0
  if peer_on and len(runs) > 1:
    # The peer's worker lives beside this process for the whole sweep: jax
    # takes device memory as its runs need it instead of most of it up front
    # (timing is unchanged: the warm-up steps allocate).
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  shared = {}  # the variables, built by the first run

  def measure(run: Run) -> dict:
    config = base.copy_and_resolve_references()
    config.model.dtype = run.dtype
    peer = None
    if peer_on:
      peer = worker(run.mode, run.batch, size, FLAGS.steps, run.dtype, FLAGS.stage)
      if len(runs) == 1:
        worker.close()  # before jax takes the device's memory
    profile_dir = FLAGS.profile_dir
    if profile_dir and FLAGS.runs:
      profile_dir = os.path.join(profile_dir, run.name)
    r = benchmark_sln(
        config,
        run.mode,
        run.batch,
        size,
        FLAGS.steps,
        FLAGS.stage,
        profile_dir,
        variables=shared.get('variables'),
    )
    shared['variables'] = r['variables']
    return result_row(r, run, config, size, peer)

  with PeerWorker() as worker:
    for row in (sweep(runs, measure, FLAGS.budget_s) if FLAGS.runs else map(measure, runs)):
      if 'error' in row:
        row = dict(row, image_size=size)
      line = json.dumps(row)
      print(line, flush=True)
      if FLAGS.output:
        files.make_dirs(os.path.dirname(os.path.abspath(FLAGS.output)))
        with open(FLAGS.output, 'a') as f:
          f.write(line + '\n')


def result_row(r: dict, run: Run, config, size: int, peer: Optional[dict]) -> dict:
  """The JSON row of one measurement (:func:`benchmark_sln`'s ``r``, the
  peer's result or None)."""
  import jax

  dev = jax.devices()[0]
  batch = run.batch
  peak = FLAGS.peak_tflops or peak_tflops(dev.device_kind, run.dtype)
  timed = r['step_s'] is not None
  images_per_s = batch / r['step_s'] if timed else None
  result = {
      'device': f'{dev.platform}:{dev.device_kind}',
      'num_devices': jax.device_count(),
      'mode': run.mode,
      'stage': FLAGS.stage if run.mode == 'train' else None,
      'dtype': run.dtype,
      'batch': batch,
      'image_size': size,
      'glm': bool(config.model.glm.enabled),
      'compile_s': round(r['compile_s'], 3),
      'step_ms': round(r['step_s'] * 1e3, 3) if timed else None,
      'images_per_s': round(images_per_s, 3) if timed else None,
      'flops_per_image': r['flops'] / batch,
      'params': int(r['params']),
      'xla_memory_mib': round(r['program_bytes'] / 2**20, 1),
      'peak_memory_mib': round(r['peak_bytes'] / 2**20, 1) if r['peak_bytes'] else None,
      'mfu': (
          round(r['flops'] / r['step_s'] / (peak * 1e12 * jax.local_device_count()), 4)
          if peak and r['flops'] and timed
          else None
      ),
  }
  if peer is not None:
    result['peer'] = 'torchvision MaskRCNN R101-FPN'
    if 'error' in peer:
      result['peer_error'] = peer['error']
    else:
      result['peer_device'] = peer['device']
      result['peer_step_ms'] = round(peer['step_s'] * 1e3, 3)
      result['peer_images_per_s'] = round(peer['images_per_s'], 3)
      if peer.get('peak_bytes'):
        result['peer_peak_memory_mib'] = round(peer['peak_bytes'] / 2**20, 1)
      result['ratio'] = round(images_per_s / peer['images_per_s'], 3)
  return result


def run() -> None:
  """The console command (pyproject.toml)."""
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_flag=_CONFIG))


if __name__ == '__main__':
  run()
