"""scripts/benchmark.py: one tiny timed step of each mode on the CPU."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from sln_scripts import benchmark, benchmark_table, profile_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_batch_matches_pipeline_layout():
  config = tiny.get_config()
  b = benchmark.synthetic_batch(config, 2, 64, np.random.default_rng(0))
  m, k, l = config.input.max_instances, config.input.gt_mask_size, config.model.num_layers
  assert b['image'].shape == (2, 64, 64, 3) and b['image'].dtype == np.uint8
  assert b['gt_layers'].shape == (2, m, k, k, l)
  assert b['gt_boxes'].shape == (2, m, 4)
  np.testing.assert_array_equal(b['gt_layer_boxes'], b['gt_boxes'])  # no jitter
  boxes = b['gt_boxes'][b['gt_valid']]
  assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  assert np.all(boxes <= 64)


def test_infer_step_reports_speed_and_flops():
  config = tiny.get_config()
  r = benchmark.benchmark_sln(config, 'infer', batch=1, size=64, steps=1)
  assert r['step_s'] > 0 and r['compile_s'] > 0
  assert r['flops'] > 1e6  # XLA's cost analysis saw the convolutions
  assert r['params'] > 1e5


def test_cli_prints_one_json_line(tmp_path):
  out = tmp_path / 'bench.jsonl'
  # compile_s is a compilation: the script ignores jax's persistent cache.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla'))
  proc = subprocess.run(
      [
          sys.executable,
          'scripts/benchmark.py',
          '--config=configs/tiny.py',
          '--mode=train',
          '--steps=1',
          f'--output={out}',
          f'--profile_dir={tmp_path / "trace"}',
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not (tmp_path / 'xla').exists() or not os.listdir(tmp_path / 'xla')
  line = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  assert len(line) == 1
  r = json.loads(line[0])
  for key in (
      'device',
      'dtype',
      'batch',
      'image_size',
      'compile_s',
      'step_ms',
      'images_per_s',
      'flops_per_image',
  ):
    assert key in r
  assert r['mode'] == 'train' and r['batch'] == 1 and r['image_size'] == 64
  assert r['images_per_s'] > 0 and r['flops_per_image'] > 0
  assert r['xla_memory_mib'] > 1  # the state + batch + temporaries
  assert json.loads(out.read_text().strip()) == r

  # The trace of the same run: every op the model runs is attributed.
  summary = subprocess.run(
      [sys.executable, 'scripts/profile_summary.py', str(tmp_path / 'trace')],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert summary.returncode == 0, summary.stderr[-2000:]
  head = summary.stdout.splitlines()[0]
  assert head.startswith('XLA op time:') and float(head.split()[3]) > 0, head
  assert 'fwd    SLN._features/backbone' in summary.stdout or 'SLN._features' in summary.stdout
  assert ' bwd ' in summary.stdout  # the backward pass is labelled


_HLO = """\
HloModule jit_step

%fused_computation.7 (param_0.1: f32[2,4]) -> f32[2,4] {
  %param_0.1 = f32[2,4]{1,0} parameter(0)
  ROOT %mul.3 = f32[2,4]{1,0} multiply(%param_0.1, %param_0.1), metadata={op_name="jit(f)/jvp(SLN.train_forward)/SLN._features/fpn/P2_lateral/mul"}
}

%fused_computation.8 (param_0.2: f32[8,3,3,8]) -> f32[8,3,3,8] {
  %param_0.2 = f32[8,3,3,8]{3,2,1,0} parameter(0)
  ROOT %convolution.9 = f32[8,3,3,8]{3,2,1,0} convolution(%param_0.2, %param_0.2), window={size=3x3}
}

ENTRY %main (p: f32[2,4]) -> f32[2,4] {
  %p = f32[2,4]{1,0} parameter(0)
  %loop_fusion.7 = f32[2,4]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.7
  %conv_fusion = f32[8,3,3,8]{3,2,1,0} fusion(%p), kind=kCustom, calls=%fused_computation.8
  ROOT %dot.1 = f32[2,4]{1,0} add(%loop_fusion.7, %p), metadata={op_name="jit(f)/transpose(jvp(SLN.train_forward))/SLN._mask_head/mask_head/deconv/dot_general"}
}
"""


@pytest.mark.parametrize(
    'args,field', [(['--image_size=100'], 'input.image_size'), (['--batch=-1'], '--batch')]
)
def test_cli_bad_setting_is_one_line_exit_2(tmp_path, args, field):
  out = tmp_path / 'bench.jsonl'
  proc = subprocess.run(
      [
          sys.executable,
          'scripts/benchmark.py',
          '--config=configs/tiny.py',
          '--steps=0',
          f'--output={out}',
          *args,
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(f'error: {field}:'), proc.stderr
  assert not out.exists()


def test_profile_summary_names_ops_by_module():
  names = profile_summary.parse_hlo(_HLO)
  assert names['loop_fusion.7'].endswith('fpn/P2_lateral/mul')  # through the fused computation
  assert names['conv_fusion'] == '[convolution f32[8,3,3,8]]'  # no metadata: the root
  assert profile_summary.source(names['dot.1']) == ('bwd', 'SLN._mask_head/mask_head/deconv')
  assert profile_summary.source(names['loop_fusion.7']) == ('fwd', 'SLN._features/fpn/P2_lateral')
  events = [
      {'args': {'hlo_op': 'loop_fusion.7'}, 'dur': 3000.0},
      {'args': {'hlo_op': 'dot.1'}, 'dur': 1000.0},
      {'args': {'hlo_op': 'loop_fusion.7'}, 'dur': 3000.0},
  ]
  text = profile_summary.summarize(events, names, steps=2, top=5)
  assert text.splitlines()[0].startswith('XLA op time: 3.50 ms per step')
  assert '  85.7     3.000  fwd    SLN._features/fpn/P2_lateral' in text, text


def test_profile_summary_bad_trace_dir_is_one_line_exit_2(tmp_path):
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'x.trace.json.gz').write_bytes(b'not gzip')
  (tmp_path / 'odd').mkdir()
  with gzip.open(tmp_path / 'odd' / 'x.trace.json.gz', 'wt') as f:
    f.write('{"traceEvents": 5}')
  for trace_dir, needle in (
      (tmp_path / 'none', 'no *.trace.json.gz'),
      (tmp_path / 'bad', 'not a readable gzipped JSON trace'),
      (tmp_path / 'odd', 'not a jax.profiler trace'),
  ):
    proc = subprocess.run(
        [sys.executable, 'scripts/profile_summary.py', str(trace_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and needle in proc.stderr


def test_peer_runs_in_its_own_process_or_reports_why_not():
  """torchvision's Mask R-CNN R101-FPN where torchvision works (the GPU
  machines); elsewhere one error string and no crash, so our row still prints."""
  with benchmark.PeerWorker() as worker:
    r = worker('infer', 1, 64, 1, 'float32', 'all')
  try:
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel

    usable = True
  except Exception:  # pylint: disable=broad-except
    usable = False
  if usable:
    assert r['images_per_s'] > 0 and r['step_s'] > 0, r
  else:
    assert set(r) == {'error'} and 'torchvision' in r['error'], r


def test_peer_worker_serves_a_sweep_from_one_process():
  """The sweep's peer worker starts once and serves every run (an error in
  a run, here or torchvision missing, leaves it up); close ends it."""
  with benchmark.PeerWorker() as worker:
    first = worker('infer', 1, 64, 1, 'float32', 'all')
    pool = worker._pool  # pylint: disable=protected-access
    pids = set(pool._processes)  # pylint: disable=protected-access
    second = worker('infer', 1, 64, 1, 'float32', 'all')
    assert worker._pool is pool and set(pool._processes) == pids and len(pids) == 1  # pylint: disable=protected-access
    assert ('error' in first) == ('error' in second)
  assert worker._pool is None  # pylint: disable=protected-access


def test_train_and_infer_steps_stay_on_device():
  """No host round trips inside a step: the lowered programs of the real
  (tiny) SLN's train step and inference have no host callbacks, no
  infeed/outfeed and no float64."""
  import jax  # pylint: disable=import-outside-toplevel

  from sln_jax import parallel  # pylint: disable=import-outside-toplevel
  from sln_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from sln_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  model, variables = state_lib.create_model(config)
  batch = benchmark.synthetic_batch(config, 2, config.input.image_size, np.random.default_rng(0))
  batch = jax.tree.map(lambda x: x[None], batch)
  state = state_lib.create_train_state(config, variables, jax.random.PRNGKey(0))
  step = jax.pmap(
      step_lib.make_stage_step(model, config, state.params, state.batch_stats, 'all'),
      axis_name=parallel.AXIS,
  )
  infer = jax.pmap(step_lib.make_infer_fn(model), axis_name=parallel.AXIS)
  for lowered in (
      step.lower(parallel.replicate(state), batch),
      infer.lower(parallel.replicate(variables), batch),
  ):
    text = lowered.as_text()
    assert 'stablehlo.while' in text or 'while' in text  # the NMS / sampling loops are there
    for bad in ('callback', 'infeed', 'outfeed', 'f64'):
      assert bad not in text, bad


def test_gpu_benchmarks_script_writes_one_row_per_run(tmp_path):
  """scripts/gpu_benchmarks.sh (the command that produces the GPU rows) on a
  tiny model: both runs of the sweep give result rows, each beside the peer;
  a command refused as a whole (a malformed run) still leaves one row per
  run saying why."""
  env = dict(
      os.environ,
      OUT=str(tmp_path),
      CONFIG='configs/tiny.py',
      IMAGE_SIZE='64',
      PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
  )
  proc = subprocess.run(
      ['bash', 'scripts/gpu_benchmarks.sh', 'infer:float32:1', 'train:bfloat16:2'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(l) for l in (tmp_path / 'gpu_benchmarks.jsonl').read_text().splitlines()]
  assert [(r['mode'], r['dtype'], r['batch']) for r in rows] == [
      ('infer', 'float32', 1),
      ('train', 'bfloat16', 2),
  ]
  for r in rows:
    assert 'error' not in r and r['images_per_s'] > 0 and r['image_size'] == 64, r
    assert 'peer' in r  # the peer ran or said why not
  md = (tmp_path / 'gpu_benchmarks.md').read_text().splitlines()
  assert len(md) == 4 and md[2].startswith('| cpu | SLN (GLM) | infer | fp32 | 1 | 64 |'), md

  proc = subprocess.run(
      ['bash', 'scripts/gpu_benchmarks.sh', 'infer:float16:1', 'infer:float32:1'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(l) for l in (tmp_path / 'gpu_benchmarks.jsonl').read_text().splitlines()]
  assert len(rows) == 4
  for r, dtype in zip(rows[2:], ('float16', 'float32')):
    assert r['dtype'] == dtype and r['error'].startswith(
        "exit 2: error: --runs: 'infer:float16:1'"
    ), r


def test_benchmark_table_rows():
  """benchmark_table.py: one markdown row per JSON line with the docs'
  columns; failed and skipped runs keep their row with the reason."""
  ok = {
      'device': 'gpu:NVIDIA H200',
      'mode': 'train',
      'stage': 'all',
      'dtype': 'bfloat16',
      'batch': 8,
      'image_size': 1024,
      'glm': True,
      'compile_s': 61.234,
      'step_ms': 512.3,
      'images_per_s': 15.616,
      'flops_per_image': 3.061e12,
      'mfu': 0.04833,
      'xla_memory_mib': 27545.6,
      'peak_memory_mib': 30105.0,
      'peer_images_per_s': 9.5,
      'peer_peak_memory_mib': 20480.0,
      'ratio': 1.644,
  }
  bad = {
      'mode': 'infer',
      'dtype': 'float32',
      'batch': 8,
      'image_size': 1024,
      'error': 'skipped: --budget_s=400 spent (412 s since the first run)',
  }
  lines = benchmark_table.table(
      [
          ok,
          dict(
              ok,
              stage='heads',
              peer_error='x',
              ratio=None,
              peer_images_per_s=None,
              peak_memory_mib=None,
          ),
          bad,
      ]
  ).splitlines()
  assert len(lines) == 5 and all(l.count('|') == 16 for l in lines), lines
  assert lines[2] == (
      '| NVIDIA H200 | SLN (GLM) | train | bf16 | 8 | 1024 | 61.2 | 512.3 | '
      '15.62 | 3,061 | 4.8% | 29.4 | 9.50 | 20.0 | 1.64 |'
  )
  assert '| train (heads) |' in lines[3] and '| 26.9 |' in lines[3]  # XLA's when no peak
  assert lines[4].startswith('|  |  | infer | fp32 | 8 | 1024 | skipped: --budget_s=400 spent')


def test_benchmark_table_cli_refuses_a_line_that_is_not_a_row(tmp_path):
  path = tmp_path / 'rows.jsonl'
  path.write_text('{"mode": "infer"}\n\nnot json\n')
  proc = subprocess.run(
      [sys.executable, 'scripts/benchmark_table.py', str(path)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 2 and proc.stdout == '', proc.stderr
  assert (
      proc.stderr.strip()
      == f"error: {path}: line 3: not a JSON object, one of benchmark.py's lines"
  )


class _Clock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_sweep_rows_errors_and_budget():
  """One row per run in order; a run that raises gives an error row and the
  next one starts; no run starts once the budget is spent (the first always
  does)."""
  clock = _Clock()
  runs = benchmark.parse_runs(
      ['infer:bfloat16:1', 'train:float32:2', 'train:bfloat16:8', 'infer:float32:8']
  )
  seen = []

  def measure(run):
    seen.append(run)
    clock.t += 30.0
    if run.batch == 2:
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate\nmore')
    return {'mode': run.mode, 'ok': True}

  rows = list(benchmark.sweep(runs, measure, budget_s=60.0, clock=clock))
  assert seen == runs[:2]  # the third would start 60 s after the first: over budget
  assert rows[0] == {'mode': 'infer', 'ok': True}
  assert rows[1] == {
      'mode': 'train',
      'dtype': 'float32',
      'batch': 2,
      'error': 'RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate',
  }
  for r, run in zip(rows[2:], runs[2:]):
    assert (r['mode'], r['dtype'], r['batch']) == run
    assert r['error'] == 'skipped: --budget_s=60 spent (60 s since the first run)'
  clock.t = 0.0
  seen.clear()
  assert len(list(benchmark.sweep(runs, measure, budget_s=1e-9, clock=clock))) == 4
  assert seen == runs[:1]  # a budget shorter than one run still measures the first
  seen.clear()
  assert len(list(benchmark.sweep(runs, measure, clock=clock))) == 4 and seen == runs


@pytest.mark.parametrize(
    'item',
    [
        'infer:bfloat16',
        'infer:float16:1',
        'eval:float32:1',
        'train:float32:0',
        'train:float32:x',
        'a:b:c:d',
    ],
)
def test_parse_runs_refuses_malformed_items(item):
  assert benchmark.parse_runs(['train:bfloat16:8', ' infer:float32:1']) == [
      ('train', 'bfloat16', 8),
      ('infer', 'float32', 1),
  ]
  with pytest.raises(
      benchmark.errors.UserError, match=f"--runs: '{item}': expected MODE:DTYPE:BATCH"
  ):
    benchmark.parse_runs([item])


def test_runs_share_one_set_of_variables():
  """A sweep builds the variables once: the second run (other dtype) takes
  the first's and reports the same parameter count; the allocator peak is
  only reported by a run that raised it (none on the CPU)."""
  config = tiny.get_config()
  first = benchmark.benchmark_sln(config, 'infer', batch=1, size=64, steps=0)
  config = tiny.get_config()
  config.model.dtype = 'bfloat16'
  second = benchmark.benchmark_sln(
      config, 'train', batch=1, size=64, steps=0, variables=first['variables']
  )
  assert second['variables'] is first['variables']
  assert second['params'] == first['params'] and second['flops'] > first['flops']
  assert first['peak_bytes'] == second['peak_bytes'] == 0  # the CPU keeps no statistics


def test_compile_only_reports_flops_and_memory():
  config = tiny.get_config()
  r = benchmark.benchmark_sln(config, 'train', batch=1, size=64, steps=0)
  assert r['step_s'] is None and r['compile_s'] > 0 and r['flops'] > 1e6
  assert r['program_bytes'] > 4 * r['params']  # at least the float32 parameters


def test_peak_tflops_by_device_and_dtype():
  assert benchmark.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert benchmark.peak_tflops('NVIDIA H100 80GB HBM3', 'float32') == 494.5  # TF32
  assert benchmark.peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert benchmark.peak_tflops('TPU v5p', 'bfloat16') == 459.0
  assert benchmark.peak_tflops('cpu', 'float32') == 0.0


def test_postprocess_benchmark_times_the_configs_detections():
  """scripts/benchmark_postprocess.py (a subprocess: its absl flags would
  clash with benchmark.py's): one JSON line; the detections take the config's
  mask size; a bad --image is exit code 2."""
  cmd = [
      sys.executable,
      'scripts/benchmark_postprocess.py',
      '--config=configs/tiny.py',
      '--images=2',
      '--detections=5',
      '--image=60x80',
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row['image'] == [60, 80] and row['detections'] == 5 and row['images'] == 2
  assert row['mask_size'] == tiny.get_config().model.roi.mask_size
  assert row['ms_per_image'] > 0 and 0 < row['results_per_image'] <= 5
  assert row['workers'] == 0 and row['main_process_cpu_ms_per_image'] > 0
  # In a worker process: the same detections give the same number of results.
  pooled = subprocess.run(
      cmd + ['--workers=1'], cwd=ROOT, capture_output=True, text=True, check=True
  )
  prow = json.loads(pooled.stdout.strip().splitlines()[-1])
  assert prow['workers'] == 1 and prow['results_per_image'] == row['results_per_image']
  bad = subprocess.run(cmd[:-1] + ['--image=60'], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.strip() == (
      "error: --image: '60': expected HxW with positive sides, e.g. 480x640"
  )


def test_evaluate_benchmark_times_both_callers():
  """scripts/benchmark_evaluate.py: one JSON line with the time of each part
  on its synthetic case (every object found, false positives up to
  --detections); a bad --image is exit code 2."""
  cmd = [
      sys.executable,
      'scripts/benchmark_evaluate.py',
      '--images=3',
      '--detections=15',
      '--image=40x50',
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row['images'] == 3 and row['image'] == [40, 50] and row['detections'] == 45
  parts = ('check_results_own', 'check_results', 'evaluate', 'depth_order')
  assert all(row[f'{p}_ms_per_image'] > 0 for p in parts)
  assert row['scripts_evaluate_ms_per_image'] >= row['evaluate_ms_per_image']
  bad = subprocess.run(cmd[:-1] + ['--image=8x8'], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.strip() == (
      "error: --image: '8x8': expected HxW with sides of at least 16, e.g. 480x640"
  )


def test_flops_are_counted_with_xla_kernel_gradients(monkeypatch):
  """cpu_conv's loop over kernel taps hides 8/9 of a 3x3 kernel gradient
  from XLA's cost analysis; a step that took that path is counted as the
  same step with XLA's own kernel gradients."""
  from sln_jax.models import cpu_conv

  config = tiny.get_config()
  plain = benchmark.benchmark_sln(config, 'train', batch=1, size=64, steps=0)
  monkeypatch.setattr(cpu_conv, 'MIN_GFLOP', 0.0)
  monkeypatch.setattr(cpu_conv, 'MIN_CHANNELS', 0)
  before = cpu_conv.traced_count()
  config = tiny.get_config()
  fast = benchmark.benchmark_sln(
      config, 'train', batch=1, size=64, steps=0, variables=plain['variables']
  )
  assert cpu_conv.traced_count() > before
  assert fast['flops'] == pytest.approx(plain['flops'], rel=1e-3)
