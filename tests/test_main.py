"""main.py end to end (subprocesses): train_and_evaluate + predict on
configs/tiny.py with a tiny synthetic dataset, and one-line user errors."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')


def _main(*args, timeout=600, env=None):
  return subprocess.run(
      [sys.executable, 'main.py', *args],
      cwd=ROOT,
      env=env or ENV,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def _one_line_error(proc):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  return errors[0]


def _tiny_synthetic(tmp):
  return [
      '--config=configs/tiny.py',
      '--config.dataset.name=synthetic',
      f'--config.dataset.manual_dir={tmp}/raw',
      f'--config.dataset.data_dir={tmp}/tfds',
      '--config.dataset.synthetic.image_size=64',
      '--config.dataset.synthetic.num_train=2',
      '--config.dataset.synthetic.num_val=2',
      '--config.train.num_steps=2',
      '--config.train.checkpoint_every=1',
      '--config.train.log_every=1',
      '--config.train.image_summary_every=0',
  ]


def test_unknown_config_field_is_one_line_exit_2(tmp_path):
  line = _one_line_error(
      _main('--config=configs/tiny.py', '--config.train.no_such_field=3', f'--workdir={tmp_path}')
  )
  assert 'config.train.no_such_field' in line and 'unknown config field' in line
  line = _one_line_error(_main('--config=configs/nope.py', f'--workdir={tmp_path}'))
  assert line == 'error: configs/nope.py: --config: no such file'
  line = _one_line_error(_main('--config', 'configs/nope.py', f'--workdir={tmp_path}'))
  assert line == 'error: configs/nope.py: --config: no such file'
  not_a_config = tmp_path / 'settings.py'
  not_a_config.write_text('x = 1\n')
  line = _one_line_error(_main(f'--config={not_a_config}', f'--workdir={tmp_path}'))
  assert line == f'error: {not_a_config}: --config: defines no get_config()'


@pytest.mark.parametrize(
    'field,value',
    [
        ('eval.mask_paste', 'nearest'),
        ('eval.protocol', 'cocoa'),
        ('model.dtype', 'bf16'),
        ('input.resize_mode', 'stretch'),
    ],
)
def test_bad_setting_fails_before_any_work(tmp_path, field, value):
  """Values that used to fail late (after training, inside tracing or
  tf.data) end in one line naming the field before the workdir is made."""
  line = _one_line_error(
      _main(
          '--config=configs/tiny.py',
          f'--workdir={tmp_path}/w',
          f'--config.{field}={value}',
          f'--config.dataset.manual_dir={tmp_path}/none',
      )
  )
  assert field in line and repr(value) in line
  assert not os.path.exists(tmp_path / 'w')


def test_missing_dataset_is_one_line_exit_2(tmp_path):
  missing = tmp_path / 'no_such_dir'
  line = _one_line_error(
      _main(
          '--config=configs/cocoa.py',
          f'--workdir={tmp_path}/w',
          f'--config.dataset.manual_dir={missing}',
          f'--config.dataset.data_dir={tmp_path}/tfds',
      )
  )
  assert str(missing) in line and 'dataset.manual_dir' in line
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_train_and_evaluate_then_predict(tmp_path):
  workdir = tmp_path / 'work'
  env = {k: v for k, v in ENV.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  proc = _main(*_tiny_synthetic(tmp_path), f'--workdir={workdir}', env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Library noise stays out of the user's terminal by default: TensorFlow's
  # C++ warnings and TFDS's warnings about itself.
  for noise in ('PredictCost', 'FeatureConnector.dtype', 'Using custom data configuration'):
    assert noise not in proc.stderr, noise
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  with open(workdir / 'metrics.json') as f:
    metrics = json.load(f)
  row = metrics['amodal']['all']['both']
  assert set(row) == {'AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100'}
  assert all(-1 <= v <= 1 for v in row.values())
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert isinstance(results, list)
  assert 'amodal masks' in proc.stdout  # the printed table
  # The HTML report, with the pictures of its gallery drawn from the images.
  index = (workdir / 'report' / 'index.html').read_text()
  assert f'report: {workdir / "report" / "index.html"}' in proc.stdout
  pictures = sorted(os.listdir(workdir / 'report' / 'images'))
  assert pictures and all(f'images/{p}' in index for p in pictures)
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  config_txt = (workdir / 'config.txt').read_text()
  assert 'num_layers: 1' in config_txt

  events = sorted(os.listdir(workdir))

  # Resuming with another model (3 sem-dist layers): one line naming the
  # leaves that differ; nothing in the workdir changes (no config.txt
  # overwritten, no empty TensorBoard events file).
  line = _one_line_error(
      _main(
          *_tiny_synthetic(tmp_path),
          f'--workdir={workdir}',
          '--config.train.num_steps=3',
          '--config.model.num_layers=3',
      )
  )
  assert str(workdir / 'checkpoints' / '2') in line
  assert 'shape mismatches: params/mask_head/conv5/bias (2,) != expected (4,)' in line, line
  assert (workdir / 'config.txt').read_text() == config_txt
  assert sorted(os.listdir(workdir)) == events
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']

  out = tmp_path / 'pred'
  images = tmp_path / 'raw' / 'val2014'
  # Without JAX_COMPILATION_CACHE_DIR (which the test run sets), main.py keeps
  # its compiled programs under $XDG_CACHE_HOME/sln_jax/xla.
  env = {k: v for k, v in ENV.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['XDG_CACHE_HOME'] = str(tmp_path / 'xdg')
  proc = _main(
      *_tiny_synthetic(tmp_path),
      f'--workdir={workdir}',
      '--mode=predict',
      f'--config.predict.input_dir={images}',
      f'--config.predict.output_dir={out}',
      '--config.predict.max_images=1',
      env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [n for n in os.listdir(tmp_path / 'xdg' / 'sln_jax' / 'xla') if n.endswith('-cache')]
  # Orbax's notes on the read-only checkpoint manager stay out too.
  for noise in ('read_only=True', 'Given directory is read only', 'Metadata file does not'):
    assert noise not in proc.stderr, noise
  written = sorted(os.listdir(out))
  assert len(written) == 2 and written[0].endswith('.json') and written[1].endswith('.png')
  with open(out / written[0]) as f:
    assert isinstance(json.load(f), list)
  assert (workdir / 'config.txt').read_text() == config_txt  # predict writes no config

  # The TFDS dataset is prepared now and needs no raw files to train, but
  # evaluation reads the ground truth from dataset.manual_dir: a moved one is
  # named in one line, before the workdir is made.
  missing = tmp_path / 'moved'
  line = _one_line_error(
      _main(
          *_tiny_synthetic(tmp_path),
          f'--config.dataset.manual_dir={missing}',
          f'--workdir={tmp_path / "w"}',
          '--mode=evaluate',
      )
  )
  assert line.startswith(f'error: {missing}: dataset.manual_dir: no such directory'), line
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('mode', ['evaluate', 'predict'])
def test_modes_without_checkpoint_fail_cleanly(tmp_path, mode):
  line = _one_line_error(
      _main(
          '--config=configs/tiny.py',
          f'--workdir={tmp_path}/w',
          f'--mode={mode}',
          f'--config.predict.input_dir={tmp_path}',
          f'--config.predict.output_dir={tmp_path}/out',
          f'--config.dataset.manual_dir={tmp_path}/none',
          f'--config.dataset.data_dir={tmp_path}/tfds',
      )
  )
  assert 'checkpoint' in line or 'dataset.manual_dir' in line
  assert not (tmp_path / 'w').exists()


def test_a_workdir_that_cannot_be_made_is_refused_before_any_work(tmp_path):
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  line = _one_line_error(
      _main(
          '--config=configs/tiny.py',
          f'--workdir={blocker}',
          '--mode=evaluate',
          '--config.init_from=/nowhere',
          f'--config.dataset.manual_dir={tmp_path}/none',
      )
  )
  assert line == f'error: {blocker}: --workdir: is not a directory, so {blocker} cannot be made'


def test_train_and_evaluate_keeps_each_splits_batch_size(tmp_path):
  """Regression: the train iterator of train_and_evaluate used the eval
  batch size (a closure read a variable the eval branch reassigned). Runs in
  a subprocess with its own jax and tf.data set-up."""
  code = f"""
import sys
sys.path.insert(0, {ROOT!r})
from configs import tiny
from input_pipeline import sources
config = tiny.get_config()
d = config.dataset
d.name = 'synthetic'
d.manual_dir, d.data_dir = {str(tmp_path / 'raw')!r}, {str(tmp_path / 'tfds')!r}
d.synthetic.image_size, d.synthetic.num_train, d.synthetic.num_val = 64, 4, 4
config.train.batch_size, config.eval.batch_size = 2, 3
for mode in ('train_and_evaluate', 'train', 'evaluate'):
  data = sources.build(config, mode)
  if mode != 'evaluate':
    assert next(iter(data.train_batches()))['image'].shape[:2] == (1, 2), mode
  if mode != 'train':
    assert next(iter(data.eval_batches()))['image'].shape[:2] == (1, 3), mode
print('ok')
"""
  proc = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _two_processes(*args, timeout=420, own_args=((), ())):
  """main.py as two JAX processes (one CPU device each) joined by
  jax.distributed through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; ``own_args[k]`` go to process k only. Returns their
  (returncode, stdout + stderr)."""
  env = dict(ENV, JAX_COORDINATOR_ADDRESS=f'localhost:{_free_port()}', JAX_NUM_PROCESSES='2')
  procs = [
      subprocess.Popen(
          [sys.executable, 'main.py', *args, *own_args[k]],
          cwd=ROOT,
          env=dict(env, JAX_PROCESS_ID=str(k)),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for k in (0, 1)
  ]
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, out) for p, out in zip(procs, outs)]


def test_two_processes_train_checkpoint_resume_and_evaluate(tmp_path):
  """Multi-host on one machine: the dataset is prepared once (no race on the
  shared data_dir), both processes write the checkpoints (Orbax needs global
  arrays), evaluation gathers every process's images, and a second launch
  resumes from the checkpoint on both processes."""
  workdir = tmp_path / 'work'
  args = _tiny_synthetic(tmp_path) + [
      '--config.dataset.synthetic.num_train=4',
      '--config.dataset.synthetic.num_val=4',
      '--config.train.batch_size=2',
      '--config.eval.batch_size=2',
      f'--workdir={workdir}',
  ]
  runs = _two_processes(*args)
  for code, out in runs:
    assert code == 0, out[-3000:]
  # The scored images are those run, gathered from both processes' shards.
  assert 'evaluation at step 2 on 4 images' in runs[0][1]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  with open(workdir / 'results.json') as f:
    ids = {r['image_id'] for r in json.load(f)}
  with open(tmp_path / 'raw' / 'annotations' / 'COCO_amodal_val2014.json') as f:
    val_ids = {im['id'] for im in json.load(f)['images']}
  assert len(val_ids) == 4 and ids <= val_ids
  assert not [n for n in os.listdir(workdir) if n.startswith('.results_part')]
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.sln_shared_check')]
  # eval.max_images counts images over all processes (2 + 1 here, from the
  # processes' shards of 2 images each).
  runs = _two_processes(*args, '--config.train.num_steps=3', '--config.eval.max_images=3')
  for code, out in runs:
    assert code == 0, out[-3000:]
  # Both resume; only process 0 says so (one message per run).
  assert runs[0][1].count('resuming from step 2') == 1, runs[0][1][-3000:]
  assert 'resuming' not in runs[1][1], runs[1][1][-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '3']
  assert 'evaluation at step 3 on 3 images' in runs[0][1]


def test_two_processes_refuse_a_workdir_they_do_not_share(tmp_path):
  """Hosts with local disks see two directories under one --workdir name
  (simulated by two paths): both processes are refused in one line before
  any data or work, and process 0's probe file is gone."""
  disks = [tmp_path / 'host0', tmp_path / 'host1']
  for disk in disks:
    disk.mkdir()
  runs = _two_processes(
      *_tiny_synthetic(tmp_path),
      '--mode=train',
      timeout=240,
      own_args=[[f'--workdir={disk}/work'] for disk in disks],
  )
  for (code, out), disk in zip(runs, disks):
    assert code == 2, out[-3000:]
    errors = [l for l in out.splitlines() if l.startswith('error: ')]
    assert errors == [
        f'error: {disk}/work: --workdir: is not one directory shared by all 2 '
        'processes (process 1 cannot see the file process 0 wrote there); '
        'multi-host runs need a --workdir on a filesystem every host sees'
    ], out
  assert [sorted(os.listdir(disk)) for disk in disks] == [[], []]
  assert not os.path.exists(tmp_path / 'tfds')  # refused before the data


def test_incomplete_distributed_environment_is_one_line_exit_2(tmp_path):
  env = dict(ENV, JAX_COORDINATOR_ADDRESS='localhost:1')
  args = ['--config=configs/tiny.py', f'--workdir={tmp_path}']
  line = _one_line_error(_main(*args, env=env))
  assert 'JAX_NUM_PROCESSES' in line and 'JAX_PROCESS_ID' in line
  line = _one_line_error(_main(*args, env=dict(env, JAX_NUM_PROCESSES='two')))
  assert line == "error: JAX_NUM_PROCESSES: 'two' is not an integer"
