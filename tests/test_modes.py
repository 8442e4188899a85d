"""main.py's modes in process (``modes.run``): which weights evaluate, predict
and train start from with ``config.init_from``.

Variables are zeros of configs/tiny.py's shapes (``jax.eval_shape``, no
model is run); inference and training are replaced by recorders.
"""

import os

import jax
import numpy as np
import pytest

from configs import tiny
from input_pipeline import sources
from sln_jax import modes
from sln_jax.checkpoints import orbax_io
from sln_jax.errors import UserError
from sln_jax.evaluation import loops
from sln_jax.models import sln


def _variables(config, value=0.0):
  shapes = sln.variable_shapes(sln.build_model(config), config.input.image_size)
  return jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), dict(shapes))


def _config(init_from='', glm=True, num_layers=1):
  c = tiny.get_config()
  c.init_from = init_from
  c.model.glm.enabled = glm
  c.model.num_layers = num_layers
  c.train.image_summary_every = 0
  return c


@pytest.fixture(name='ones_checkpoint', scope='module')
def fixture_ones_checkpoint(tmp_path_factory):
  """A checkpoint of configs/tiny.py's model, every leaf 1."""
  directory = str(tmp_path_factory.mktemp('ckpt') / 'tiny')
  orbax_io.save_orbax(_variables(_config(), 1.0), directory)
  return directory


@pytest.fixture(name='recorded')
def fixture_recorded(monkeypatch):
  """The variables that inference / training would run on, by mode."""
  seen = {}

  def evaluate(config, workdir, model, variables, *args, **kwargs):
    del config, workdir, model, args, kwargs
    seen['evaluate'] = variables
    return {}

  def predict(config, model, variables, preprocess):
    del config, model, preprocess
    seen['predict'] = variables

  def train(config, workdir, model, variables, *args, on_start=None):
    del config, workdir, model, args
    seen['train'] = variables
    on_start()
    return type('State', (), dict(step=0, **variables))

  monkeypatch.setattr(loops, 'evaluate', evaluate)
  monkeypatch.setattr(loops, 'predict', predict)
  monkeypatch.setattr(modes, 'train', train)
  return seen


def _run(config, workdir, mode):
  data = sources.DataSources(eval_batches=lambda: [], eval_annotations=lambda: [])
  return modes.run(
      config, str(workdir), mode, None, data, model='model', variables=_variables(config)
  )


@pytest.mark.parametrize('mode', ['evaluate', 'predict'])
def test_complete_checkpoint_is_what_evaluate_and_predict_run_on(
    mode, ones_checkpoint, recorded, tmp_path, capsys
):
  _run(_config(ones_checkpoint), tmp_path, mode)
  assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(recorded[mode]))
  out = capsys.readouterr().out
  assert 'init_from: loaded' in out and 'initial values' not in out


@pytest.mark.parametrize(
    'model,expected',
    [
        (dict(glm=False), ' absent from the checkpoint: params/glm/'),
        (dict(num_layers=3), '2 with other shapes: params/mask_head/conv5/bias (4,) != (2,)'),
    ],
)
def test_evaluate_refuses_a_checkpoint_of_another_model(model, expected, recorded, tmp_path):
  """A checkpoint converted without the GLM, or with another num_layers (the
  mask head's last conv differs): evaluating it would run on random
  weights; one error names init_from and the first leaves, before the
  workdir is made."""
  other = str(tmp_path / 'other')
  orbax_io.save_orbax(_variables(_config(**model), 1.0), other)
  with pytest.raises(UserError) as err:
    _run(_config(other), tmp_path / 'work', 'evaluate')
  assert err.value.field == 'init_from' and err.value.path == other
  message = str(err.value)
  assert expected in message and 'random initial values' in message, message
  assert not recorded and not (tmp_path / 'work').exists()


def test_train_loads_what_fits_and_lists_the_rest(tmp_path, recorded, capsys):
  """Fine-tuning from a checkpoint without the GLM: it loads, the GLM keeps
  its initialisation, one line counts the rest and names the first."""
  no_glm = str(tmp_path / 'no_glm')
  orbax_io.save_orbax(_variables(_config(glm=False), 1.0), no_glm)
  modes.run(
      _config(no_glm),
      str(tmp_path / 'work'),
      'train',
      None,
      sources.DataSources(),
      model='model',
      variables=_variables(_config()),
  )
  got = recorded['train']
  assert np.all(np.asarray(got['params']['backbone']['C1_conv']['kernel']) == 1)
  assert not np.any(np.asarray(got['params']['glm']['layer1_conv']['kernel']))
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('init_from:')]
  assert len(lines) == 1, lines
  assert 'model arrays keep their initial values' in lines[0]
  assert 'absent from the checkpoint: params/glm/' in lines[0] and '(+' in lines[0]


def test_a_workdir_checkpoint_comes_before_init_from(tmp_path, recorded, monkeypatch, capsys):
  """evaluate with a checkpoint in the workdir runs on it; init_from is not
  read (here it does not even exist)."""
  os.makedirs(tmp_path / 'checkpoints' / '2')
  monkeypatch.setattr(modes, 'check_checkpoint_fits', lambda *a: None)
  monkeypatch.setattr(modes, 'load_variables', lambda c, w, v: ({'from': 'workdir'}, 2))
  _run(_config(str(tmp_path / 'absent')), tmp_path, 'evaluate')
  assert recorded['evaluate'] == {'from': 'workdir'}
  assert 'init_from not used' in capsys.readouterr().out


@pytest.mark.parametrize(
    'mode,written',
    [
        ('train', ['config.txt']),
        ('train_and_evaluate', ['config.txt']),
        ('evaluate', ['config.txt', 'config_evaluate.txt']),
        ('predict', ['config.txt']),
    ],
)
def test_only_training_writes_the_run_config(mode, written, ones_checkpoint, recorded, tmp_path):
  """config.txt records the training run; evaluating or predicting from its
  workdir (here with init_from and num_layers changed) leaves it as it was;
  evaluate puts its own config beside metrics.json."""
  del recorded
  (tmp_path / 'config.txt').write_text('training config')
  config = _config(ones_checkpoint)
  _run(config, tmp_path, mode)
  assert sorted(os.listdir(tmp_path)) == written
  if mode == 'evaluate':
    assert (tmp_path / 'config.txt').read_text() == 'training config'
    assert (tmp_path / 'config_evaluate.txt').read_text() == str(config)
  elif mode != 'predict':
    assert (tmp_path / 'config.txt').read_text() == str(config)
  else:
    assert (tmp_path / 'config.txt').read_text() == 'training config'


def test_a_stage_regex_that_trains_nothing_is_refused_before_data(monkeypatch):
  """check_stages (main.py runs it before building the dataset): a regex
  stage matching no trainable parameter is one UserError; a regex that
  matches passes; named stages cost no model trace."""
  config = _config()
  config.train.stages = (('heads', 2, 0.1), ('bogus', 2, 0.1))
  with pytest.raises(UserError, match="train.stages: stage 'bogus' trains no parameter"):
    modes.check_stages(config)
  config.train.stages = (('glm/.*', 2, 0.1),)  # the GLM is never trained
  with pytest.raises(UserError, match='trains no parameter'):
    modes.check_stages(config)
  config.train.stages = (('mask_head/.*', 2, 0.1),)
  modes.check_stages(config)
  # legacy_sticky_freeze: a stage must keep something the earlier ones trained.
  config.train.stages = (('rpn/.*', 2, 0.1), ('mask_head/.*', 2, 0.1))
  modes.check_stages(config)
  config.train.legacy_sticky_freeze = True
  with pytest.raises(UserError, match=r"stage 'mask_head/\.\*' trains no parameter after 'rpn"):
    modes.check_stages(config)
  config.train.stages = (('heads', 2, 0.1), ('4+', 2, 0.1))
  modes.check_stages(config)
  config.train.legacy_sticky_freeze = False
  monkeypatch.setattr(sln, 'variable_shapes', lambda *a: pytest.fail('traced the model'))
  config.train.stages = (('heads', 2, 0.1), ('all', 2, 0.01))
  modes.check_stages(config)
