"""sln_jax.errors, sln_jax.files and sln_jax.cli: one-line user errors (exit 2)
and outputs that are either whole or absent."""

import json
import os
import subprocess
import sys

import pytest

from sln_jax import cli, errors, files
from sln_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entries(directory):
  return sorted(os.listdir(directory))


def test_user_error_names_file_then_field_then_message():
  err = UserError('not a number', path='a/b.json', field='annotations[3].area')
  assert str(err) == 'a/b.json: annotations[3].area: not a number'
  assert (err.path, err.field, err.message) == ('a/b.json', 'annotations[3].area', 'not a number')
  assert str(UserError('is required', field='--workdir')) == '--workdir: is required'
  assert str(UserError('plain')) == 'plain'


def test_listing_names_at_most_limit_items():
  assert errors.listing('missing', ['a', 'b']) == '2 missing: a, b'
  assert errors.listing('missing', list('abcde'), limit=2) == '5 missing: a, b (+3 more)'
  assert errors.listing('missing', list('ab'), limit=2) == '2 missing: a, b'


def test_read_json_errors_name_the_file(tmp_path):
  good = tmp_path / 'good.json'
  good.write_text('{"a": [1, 2]}')
  assert files.read_json(str(good)) == {'a': [1, 2]}
  with pytest.raises(UserError, match='no such file') as info:
    files.read_json(str(tmp_path / 'absent.json'))
  assert info.value.path.endswith('absent.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"a": [1, 2')
  with pytest.raises(UserError, match='not readable JSON') as info:
    files.read_json(str(bad))
  assert info.value.path == str(bad)
  binary = tmp_path / 'binary.json'
  binary.write_bytes(b'\xff\xfe\x00garbage')
  with pytest.raises(UserError, match='not readable JSON'):
    files.read_json(str(binary))


def _run_cli(body: str, *args: str):
  code = 'import sys; sys.path.insert(0, %r)\n' % ROOT + 'from sln_jax import cli, errors\n' + body
  return subprocess.run(
      [sys.executable, '-c', code, *args],
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
      cwd=ROOT,
  )


def test_run_cli_user_error_is_one_line_and_exit_2():
  proc = _run_cli(
      "def main():\n  raise errors.UserError('bad', path='x.json', field='f')\n"
      'cli.run_cli(main)\n'
  )
  assert proc.returncode == 2
  assert proc.stderr == 'error: x.json: f: bad\n'
  assert proc.stdout == ''


def test_run_cli_passes_exit_codes_and_other_errors_through():
  assert _run_cli('cli.run_cli(lambda: None)').returncode == 0
  assert _run_cli('cli.run_cli(lambda: 3)').returncode == 3
  proc = _run_cli("def main():\n  raise RuntimeError('a bug')\ncli.run_cli(main)\n")
  assert proc.returncode == 1
  assert 'Traceback' in proc.stderr and 'RuntimeError: a bug' in proc.stderr


def test_atomic_output_file_is_whole_or_absent(tmp_path):
  path = tmp_path / 'sub' / 'out.json'
  with files.atomic_output_file(str(path)) as f:
    json.dump({'a': 1}, f)
    assert not path.exists()  # nothing under the final name while writing
  assert json.loads(path.read_text()) == {'a': 1}
  assert _entries(path.parent) == ['out.json']

  with pytest.raises(ValueError):
    with files.atomic_output_file(str(path)) as f:
      f.write('{"half": ')
      raise ValueError('interrupted')
  assert json.loads(path.read_text()) == {'a': 1}  # the old file is untouched
  assert _entries(path.parent) == ['out.json']  # and no temporary is left

  with files.atomic_output_file(str(tmp_path / 'b.bin'), 'wb') as f:
    f.write(b'\x00\x01')
  assert (tmp_path / 'b.bin').read_bytes() == b'\x00\x01'


def test_atomic_output_dir_replaces_whole_or_leaves_the_old_one(tmp_path):
  out = tmp_path / 'out'
  with files.atomic_output_dir(str(out)) as tmp:
    assert not out.exists()
    open(os.path.join(tmp, 'a.npz'), 'w').close()
  assert _entries(out) == ['a.npz']

  with pytest.raises(KeyboardInterrupt):
    with files.atomic_output_dir(str(out), replaceable=_any) as tmp:
      open(os.path.join(tmp, 'b.npz'), 'w').close()
      raise KeyboardInterrupt
  assert _entries(out) == ['a.npz']
  assert _entries(tmp_path) == ['out']

  with pytest.raises(UserError, match='exists; refusing to overwrite'):
    with files.atomic_output_dir(str(out), overwrite=False, replaceable=_any) as tmp:
      open(os.path.join(tmp, 'c.npz'), 'w').close()
  assert _entries(out) == ['a.npz']
  assert _entries(tmp_path) == ['out']

  with files.atomic_output_dir(str(out), replaceable=_any) as tmp:
    open(os.path.join(tmp, 'd.npz'), 'w').close()
  assert _entries(out) == ['d.npz']
  assert _entries(tmp_path) == ['out']


def _any(_):
  return True


def test_atomic_output_dir_refuses_to_replace_what_it_did_not_write(tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  (home / 'thesis.tex').write_text('years of work')
  worked = []
  with pytest.raises(UserError, match='did not write') as info:
    with files.atomic_output_dir(str(home)) as tmp:
      worked.append(tmp)
  assert worked == []  # refused before the caller's work
  assert info.value.path == str(home)
  with pytest.raises(UserError, match='did not write'):
    with files.atomic_output_dir(
        str(home), replaceable=lambda p: os.path.exists(os.path.join(p, 'x'))
    ):
      pass
  assert _entries(home) == ['thesis.tex']
  assert _entries(tmp_path) == ['home']

  afile = tmp_path / 'afile'
  afile.write_text('keep')
  with pytest.raises(UserError, match='not a directory'):
    with files.atomic_output_dir(str(afile), replaceable=_any):
      pass
  assert afile.read_text() == 'keep'

  empty = tmp_path / 'empty'
  empty.mkdir()
  with files.atomic_output_dir(str(empty)) as tmp:  # empty: replaced
    open(os.path.join(tmp, 'a.npz'), 'w').close()
  assert _entries(empty) == ['a.npz']


def test_atomic_files_into_keeps_other_files_and_is_all_or_nothing(tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  (images / 'a.jpg').write_text('jpeg')
  (images / 'a.npz').write_text('old layers')
  with files.atomic_files_into(str(images)) as tmp:
    for name in ('a.npz', 'b.npz'):
      (images / 'a.npz').read_text()  # the old file is still in place
      with open(os.path.join(tmp, name), 'w') as f:
        f.write('new ' + name)
  assert _entries(images) == ['a.jpg', 'a.npz', 'b.npz']
  assert (images / 'a.npz').read_text() == 'new a.npz'
  assert (images / 'a.jpg').read_text() == 'jpeg'

  with pytest.raises(KeyboardInterrupt):
    with files.atomic_files_into(str(images)) as tmp:
      with open(os.path.join(tmp, 'a.npz'), 'w') as f:
        f.write('half')
      raise KeyboardInterrupt
  assert _entries(images) == ['a.jpg', 'a.npz', 'b.npz']
  assert (images / 'a.npz').read_text() == 'new a.npz'

  fresh = tmp_path / 'fresh'
  with pytest.raises(RuntimeError):
    with files.atomic_files_into(str(fresh)):
      raise RuntimeError
  assert not fresh.exists()  # created for the run, removed on error

  (images / 'c.npz').mkdir()
  with pytest.raises(UserError, match='is a directory'):
    with files.atomic_files_into(str(images)) as tmp:
      open(os.path.join(tmp, 'c.npz'), 'w').close()
      open(os.path.join(tmp, 'd.npz'), 'w').close()
  assert _entries(images) == ['a.jpg', 'a.npz', 'b.npz', 'c.npz']
  with pytest.raises(UserError, match='not a directory'):
    with files.atomic_files_into(str(images / 'a.jpg')):
      pass


def test_atomic_output_file_refuses_a_directory_and_leaves_no_temp(tmp_path):
  target = tmp_path / 'M.json'
  target.mkdir()
  with pytest.raises(UserError, match='is a directory'):
    with files.atomic_output_file(str(target)) as f:
      f.write('{}')
  assert _entries(tmp_path) == ['M.json']


def test_run_cli_path_errors_are_one_line_and_other_os_errors_pass(tmp_path):
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  proc = _run_cli(f"def main():\n  open({str(blocker / 'out.json')!r}, 'w')\ncli.run_cli(main)\n")
  assert proc.returncode == 2 and proc.stderr == f'error: {blocker / "out.json"}: Not a directory\n'
  proc = _run_cli("def main():\n  raise OSError('no path')\ncli.run_cli(main)\n")
  assert proc.returncode == 1 and 'OSError: no path' in proc.stderr


def test_outputs_under_a_file_name_it_before_anything_is_written(tmp_path):
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  for make in (
      lambda: files.atomic_output_file(str(blocker / 'sub' / 'm.json')),
      lambda: files.atomic_output_dir(str(blocker / 'd')),
      lambda: files.atomic_files_into(str(blocker / 'd')),
  ):
    with pytest.raises(UserError, match=f'^{blocker}: is not a directory'):
      with make():
        pass
  assert _entries(tmp_path) == ['afile'] and blocker.read_text() == 'x'


def test_check_dir_makeable_refuses_without_making_anything(tmp_path, monkeypatch):
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  for path in (blocker, blocker / 'sub' / 'w'):
    with pytest.raises(UserError, match=f'^{blocker}: --workdir: is not a directory, so '):
      files.check_dir_makeable(str(path), field='--workdir')
  files.check_dir_makeable(str(tmp_path / 'new' / 'w'))
  files.check_dir_makeable(str(tmp_path))
  assert _entries(tmp_path) == ['afile']
  monkeypatch.setattr(os, 'access', lambda *a: False)  # a read-only parent (root passes access)
  with pytest.raises(UserError, match=f'^{tmp_path}: is not writable, so {tmp_path}/new cannot'):
    files.check_dir_makeable(str(tmp_path / 'new'))
  with pytest.raises(UserError, match=f'^{tmp_path}: is not writable$'):
    files.check_dir_makeable(str(tmp_path))


def test_outputs_get_the_umask_modes_not_the_temp_files_0600(tmp_path):
  old = os.umask(0o022)
  try:
    with files.atomic_output_file(str(tmp_path / 'm.json')) as f:
      f.write('{}')
    with files.atomic_output_dir(str(tmp_path / 'd')) as d:
      with open(os.path.join(d, 'x'), 'w') as f:
        f.write('1')
  finally:
    os.umask(old)
  assert os.stat(tmp_path / 'm.json').st_mode & 0o777 == 0o644
  assert os.stat(tmp_path / 'd').st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    'override,message',
    [
        (
            '--config.train.num_step=3',
            'error: --config.train.num_step: unknown config field '
            "'num_step' (did you mean 'num_steps'?) (see configs/default.py)",
        ),
        (
            '--config.trian.num_steps=3',
            'error: --config.trian.num_steps: unknown config field '
            "'trian' (did you mean 'train'?) (see configs/default.py)",
        ),
        (
            '--config.model.nope=1',
            "error: --config.model.nope: unknown config field 'nope' " '(see configs/default.py)',
        ),
    ],
)
def test_parse_flags_names_the_override_and_the_close_match(override, message):
  code = (
      'import functools, sys\nfrom absl import app\n'
      'from ml_collections import config_flags\n'
      "c = config_flags.DEFINE_config_file('config', None, 'x', lock_config=True)\n"
      'app.run(lambda argv: None, flags_parser=functools.partial(cli.parse_flags, '
      'config_flag=c))\n'
  )
  proc = _run_cli(code, '--config=configs/tiny.py', override)
  assert proc.returncode == 2 and proc.stderr == message + '\n', proc.stderr


def test_parse_size_reads_hxw_and_names_the_field():
  assert cli.parse_size('480x640', '--image') == (480, 640)
  assert cli.parse_size('16X20', '--image', minimum=16) == (16, 20)
  for bad, minimum in (('480', 1), ('0x5', 1), ('ax5', 1), ('15x20', 16), ('1x2x3', 1)):
    with pytest.raises(errors.UserError) as err:
      cli.parse_size(bad, '--image', minimum=minimum)
    assert err.value.field == '--image' and repr(bad) in str(err.value)
