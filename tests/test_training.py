"""Training loop: schedule, optimizer vs torch.optim.SGD, stage masks, data
parallelism on 8 fake devices, kill-and-resume, non-finite stop.

Uses the small stand-in module of tests/train_standin.py (same module paths
and entry points as SLN) so every test compiles in seconds.
"""

import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, tiny
from sln_jax import parallel
from sln_jax.checkpoints import manager as manager_lib
from sln_jax.errors import UserError
from sln_jax.evaluation import loops
from sln_jax.models import sln
from sln_jax.training import loop as loop_lib
from sln_jax.training import optimizer as optimizer_lib
from sln_jax.training import schedule as schedule_lib
from sln_jax.training import state as state_lib
from sln_jax.training import step as step_lib
from tests import train_standin as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(stages=(('heads', 3, 0.1), ('all', 3, 0.05)), batch=2):
  c = default.get_config()
  c.train.stages = stages
  c.train.batch_size = batch
  c.train.checkpoint_every = 2
  c.train.log_every = 2
  c.train.keep_checkpoints = 5
  c.train.image_summary_every = 0
  return c


def _flat(tree):
  return optimizer_lib._flat(tree)  # pylint: disable=protected-access


def test_schedule_and_learning_rate():
  c = _config(stages=(('heads', 4, 1e-3), ('4+', 6, 1e-3), ('all', 5, 1e-4)))
  assert schedule_lib.schedule(c) == [
      ('heads', 0, 4, 1e-3),
      ('4+', 4, 10, 1e-3),
      ('all', 10, 15, 1e-4),
  ]
  assert [schedule_lib.stage_index(c, s) for s in (0, 3, 4, 9, 10, 14)] == [0, 0, 1, 1, 2, 2]
  c.train.num_steps = 7
  assert schedule_lib.schedule(c) == [('heads', 0, 4, 1e-3), ('4+', 4, 7, 1e-3)]
  c.train.num_steps = 20  # longer than the stages: the last one continues
  assert schedule_lib.schedule(c)[-1] == ('all', 10, 20, 1e-4)
  c.train.warmup_steps = 4
  lr = schedule_lib.learning_rate_fn(c)
  got = [float(lr(s)) for s in (0, 1, 3, 9, 10, 19)]
  np.testing.assert_allclose(got, [2.5e-4, 5e-4, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
  c.train.stages = ()
  with pytest.raises(UserError, match='train.stages'):
    schedule_lib.schedule(c)


@pytest.mark.parametrize('warmup', [0, 50, 7])
def test_learning_rate_is_bit_equal_to_the_constant_schedule(warmup):
  """The schedule as step data gives, to the last bit, the LRs that XLA
  computed when it was constants of the step (jit of the earlier code: the
  stage LR table indexed by searchsorted, times min(1, (step + 1) / warmup)
  with warmup a Python int, which XLA turns into a multiply by its float32
  reciprocal); an exact division differs at 14 of the 50 warm-up steps."""
  c = _config(stages=(('all', 48, 4e-2), ('all', 12, 8e-3)))
  c.train.warmup_steps = warmup
  table = schedule_lib.schedule(c)
  ends = np.asarray([e for _, _, e, _ in table[:-1]], np.int32)
  lrs = np.asarray([lr for *_, lr in table], np.float32)

  @jax.jit
  def constant_schedule(step):
    lr = jnp.asarray(lrs)[jnp.searchsorted(ends, step, side='right')]
    if warmup > 0:
      lr = lr * jnp.minimum(1.0, (step + 1).astype(jnp.float32) / warmup)
    return lr

  as_data = jax.jit(schedule_lib.learning_rate_at)
  tables = jax.device_put(schedule_lib.lr_tables(c))
  steps = range(schedule_lib.total_steps(c))
  want = np.array([constant_schedule(jnp.int32(s)) for s in steps])
  got = np.array([as_data(tables, jnp.int32(s)) for s in steps])
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  np.testing.assert_allclose(
      got,
      [
          lrs[np.searchsorted(ends, s, side='right')] * min(1.0, (s + 1) / max(warmup, 1))
          for s in steps
      ],
      rtol=1e-6,
  )


def test_schedule_truncated_on_a_stage_boundary():
  """num_steps on a stage's first step: that stage is left out, not kept
  with no steps (modes.check_stages would refuse a regex that never runs)."""
  c = _config(stages=(('heads', 4, 1e-3), ('4+', 6, 1e-3), ('all', 5, 1e-4)))
  c.train.num_steps = 10
  assert schedule_lib.schedule(c) == [('heads', 0, 4, 1e-3), ('4+', 4, 10, 1e-3)]
  assert schedule_lib.total_steps(c) == 10 and schedule_lib.stage_index(c, 9) == 1
  c.train.num_steps = 4
  assert schedule_lib.schedule(c) == [('heads', 0, 4, 1e-3)]


def test_stage_masks():
  _, v = ts.init_variables()
  p, bs = v['params'], v['batch_stats']

  def trained(stage):
    return sorted(
        k.rsplit('/', 1)[0]
        for k, t in _flat(optimizer_lib.trainable_mask(p, bs, stage)).items()
        if t
    )

  assert set(trained('heads')) == {'box_head/linear_class', 'fpn/P2_lateral', 'rpn/conv_class'}
  assert set(trained('4+')) == set(trained('heads')) | {'backbone/C4_0/conv1'}
  # 'all': everything but BatchNorm and the GLM.
  assert set(trained('all')) == set(trained('4+')) | {'backbone/C1_conv'}
  assert set(trained(r'rpn/.*')) == {'rpn/conv_class'}  # release-style regex
  # Weight decay: every parameter but BatchNorm's (the release), biases
  # only with decay_biases.
  decay = {k for k, d in _flat(optimizer_lib.decay_mask(p, bs)).items() if d}
  assert decay == {k for k in _flat(p) if not k.rsplit('/', 1)[0].endswith('_bn')}
  assert any(k.endswith('/bias') for k in decay)
  kernels = {k for k, d in _flat(optimizer_lib.decay_mask(p, bs, biases=False)).items() if d}
  assert kernels == {k for k in _flat(p) if k.endswith('/kernel')}
  with pytest.raises(UserError, match='trains no parameter'):
    optimizer_lib.trainable_mask(p, bs, 'glm/.*')


def test_stage_masks_on_the_model():
  """configs/tiny.py's SLN paths: 'heads' trains fpn, rpn, box_head and
  mask_head; '4+' adds the backbone's C4 and C5 blocks (not C1-C3); 'all'
  the whole backbone; never the GLM; BatchNorm ('bn' in the module name, as
  the release) only with train_bn; weight decay on all but BatchNorm
  (kernels only without biases)."""
  c = tiny.get_config()
  shapes = sln.variable_shapes(sln.build_model(c), c.input.image_size)
  p, bs = shapes['params'], shapes['batch_stats']
  flat = _flat(p)
  module = lambda k: k.rsplit('/', 1)[0]
  heads = {k for k in flat if k.split('/')[0] in ('fpn', 'rpn', 'box_head', 'mask_head')}
  four = heads | {k for k in flat if k.startswith(('backbone/C4_', 'backbone/C5_'))}
  every = {k for k in flat if not k.startswith('glm/')}
  assert every > four > heads and any(k.startswith('backbone/C3_') for k in every - four)
  assert any(k.startswith('mask_head/') for k in heads)
  is_bn = lambda k: 'bn' in module(k).rsplit('/', 1)[-1]
  for stage, want in (('heads', heads), ('4+', four), ('all', every)):
    for train_bn in (False, True):
      got = {k for k, t in _flat(optimizer_lib.trainable_mask(p, bs, stage, train_bn)).items() if t}
      assert got == {k for k in want if train_bn or not is_bn(k)}, (stage, train_bn)
  decay = {k for k, d in _flat(optimizer_lib.decay_mask(p, bs)).items() if d}
  assert decay == {k for k in flat if not is_bn(k)}
  decay = {k for k, d in _flat(optimizer_lib.decay_mask(p, bs, biases=False)).items() if d}
  assert decay == {k for k in flat if k.endswith('/kernel') and not is_bn(k)}
  # legacy_sticky_freeze: a stage trains only what every earlier one did, so
  # the release's heads -> 4+ -> all trains the heads throughout.
  for stage, earlier in (('4+', ('heads',)), ('all', ('heads', '4+'))):
    got = {
        k for k, t in _flat(optimizer_lib.trainable_mask(p, bs, stage, False, earlier)).items() if t
    }
    assert got == {k for k in heads if not is_bn(k)}, stage
  got = {
      k
      for k, t in _flat(optimizer_lib.trainable_mask(p, bs, 'heads', False, ('all',))).items()
      if t
  }
  assert got == {k for k in heads if not is_bn(k)}
  with pytest.raises(UserError, match=r"trains no parameter after 'rpn/\.\*'"):
    optimizer_lib.trainable_mask(p, bs, 'mask_head/.*', False, ('rpn/.*',))


def test_stage_freeze_history():
  c = _config(stages=(('heads', 2, 0.1), ('4+', 2, 0.1), ('all', 2, 0.01)))
  assert [optimizer_lib.stage_freeze_history(c, k) for k in range(3)] == [(), (), ()]
  c.train.legacy_sticky_freeze = True
  assert [optimizer_lib.stage_freeze_history(c, k) for k in range(3)] == [
      (),
      ('heads',),
      ('heads', '4+'),
  ]


@pytest.mark.parametrize('decay_biases', [True, False])
def test_optimizer_matches_torch_sgd(decay_biases):
  """clip -> L2 -> momentum SGD equals torch's release recipe (its
  train_model: weight decay on every trainable parameter without 'bn' in
  its name, biases included), or L2 on kernels only."""
  torch = pytest.importorskip('torch')
  c = _config(stages=(('all', 10, 0.05),))
  c.train.grad_clip_norm = 1.0
  c.train.weight_decay = 0.01
  c.train.decay_biases = decay_biases
  rng = np.random.default_rng(0)
  params = {
      'fpn': {
          'P2_lateral': {
              'kernel': rng.normal(size=(3, 4)).astype(np.float32),
              'bias': rng.normal(size=(4,)).astype(np.float32),
          }
      },
      'glm': {'aspp_c0': {'kernel': rng.normal(size=(2, 2)).astype(np.float32)}},
  }
  grads = [
      jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 3, params)
      for _ in range(3)
  ]
  tx = optimizer_lib.create_optimizer(c, params, {}, 'all')
  state, p = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)

  w = torch.tensor(params['fpn']['P2_lateral']['kernel'], requires_grad=True)
  b = torch.tensor(params['fpn']['P2_lateral']['bias'], requires_grad=True)
  decayed, plain = ([w, b], []) if decay_biases else ([w], [b])
  opt = torch.optim.SGD(
      [{'params': decayed, 'weight_decay': 0.01}, {'params': plain}], lr=0.05, momentum=0.9
  )
  for g in grads:
    w.grad = torch.tensor(g['fpn']['P2_lateral']['kernel'])
    b.grad = torch.tensor(g['fpn']['P2_lateral']['bias'])
    torch.nn.utils.clip_grad_norm_([w, b], 1.0)  # frozen GLM grads do not count
    opt.step()
  np.testing.assert_allclose(
      p['fpn']['P2_lateral']['kernel'], w.detach().numpy(), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
      p['fpn']['P2_lateral']['bias'], b.detach().numpy(), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(p['glm']['aspp_c0']['kernel'], params['glm']['aspp_c0']['kernel'])


def test_momentum_across_stages_and_its_reset():
  """One state through the stages' optimizers (fixed params, no clipping,
  momentum 0.8): a leaf trained throughout follows torch's momentum SGD,
  -lr_t * b_t with b_t = g_t + wd * w + 0.8 * b_{t-1}; a leaf the new stage
  unfreezes starts with no momentum (a frozen leaf gets no gradient and no
  decay); one it freezes stops at once; after reset_momentum the step is a
  fresh SGD's first, -lr * (g + wd * w), at the schedule's LR."""
  c = _config(stages=(('heads', 2, 0.1), ('all', 2, 0.05)))
  c.train.momentum = 0.8
  c.train.weight_decay = 0.01
  c.train.grad_clip_norm = 1e6
  _, v = ts.init_variables()
  p, bs = v['params'], v['batch_stats']
  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p) for _ in range(3)]
  tx = {s: optimizer_lib.create_optimizer(c, p, bs, s) for s in ('heads', 'all')}

  def run(stages, reset=False):
    state = tx[stages[0]].init(p)
    for t, (s, g) in enumerate(zip(stages, grads)):
      if reset and t == 2:
        state = optimizer_lib.reset_momentum(state)
      updates, state = tx[s].update(g, state, p)
    return _flat(updates)

  f_p, f_g = _flat(p), [_flat(g) for g in grads]

  def sgd(k, steps):  # torch.optim.SGD's update at the last of ``steps``
    wd = 0.01 if k.endswith('kernel') else 0.0
    buf = 0.0
    for t in steps:
      buf = f_g[t][k] + wd * f_p[k] + 0.8 * buf
    return -0.05 * buf

  conv, head = 'backbone/C4_0/conv1/', 'fpn/P2_lateral/'
  heads_then_all = run(('heads', 'heads', 'all'))
  for k in (head + 'kernel', head + 'bias'):
    np.testing.assert_allclose(heads_then_all[k], sgd(k, (0, 1, 2)), rtol=1e-5, atol=1e-7)
  for k in (conv + 'kernel', conv + 'bias'):
    np.testing.assert_allclose(heads_then_all[k], sgd(k, (2,)), rtol=1e-5, atol=1e-7)
  all_then_heads = run(('all', 'all', 'heads'))
  for k in (
      conv + 'kernel',
      'backbone/C1_conv/kernel',
      'backbone/C1_bn/scale',
      'glm/layer1_conv/kernel',
  ):
    assert not np.any(all_then_heads[k]), k
  reset = run(('all', 'all', 'all'), reset=True)
  for k in (conv + 'kernel', conv + 'bias', head + 'kernel'):
    np.testing.assert_allclose(reset[k], sgd(k, (2,)), rtol=1e-5, atol=1e-7)


def test_adamw_follows_optax_adamw_on_trained_leaves_and_its_reset_is_a_fresh_adam():
  """train.optimizer='adamw': a trained leaf moves as optax's adamw (Adam,
  then decoupled decay on kernels and biases, not BatchNorm, times the LR);
  a frozen one does not; after reset_momentum the step is a fresh Adam's
  first."""
  c = _config(stages=(('all', 4, 0.01),))
  c.train.optimizer = 'adamw'
  c.train.weight_decay = 0.05
  c.train.grad_clip_norm = 1e6
  _, v = ts.init_variables()
  p, bs = v['params'], v['batch_stats']
  rng = np.random.default_rng(2)
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p) for _ in range(3)]
  tx = optimizer_lib.create_optimizer(c, p, bs, 'all', learning_rate=lambda _: 0.01)
  ref = optax.adamw(0.01, b1=0.9, b2=0.999, weight_decay=0.05)

  def run(reset=False, steps=3):
    state = tx.init(p)
    for t in range(steps):
      if reset and t == steps - 1:
        state = optimizer_lib.reset_momentum(state)
      updates, state = tx.update(grads[t], state, p)
    return _flat(updates)

  def adamw(k, steps):
    state = ref.init(_flat(p)[k])
    for t in steps:
      updates, state = ref.update(_flat(grads[t])[k], state, _flat(p)[k])
    return updates

  conv = 'backbone/C4_0/conv1/kernel'
  got = run()
  np.testing.assert_allclose(got[conv], adamw(conv, (0, 1, 2)), rtol=1e-5, atol=1e-8)
  assert not np.any(got['glm/layer1_conv/kernel'])
  reset = run(reset=True)
  np.testing.assert_allclose(reset[conv], adamw(conv, (2,)), rtol=1e-5, atol=1e-8)
  assert not np.allclose(reset[conv], got[conv])


def test_the_schedule_is_data_of_the_compiled_step():
  """Two schedules with the same stage names (other LRs, lengths, warm-up,
  num_steps) lower to the same program, so a launch with the other one
  loads it from the persistent cache; that program follows whichever
  schedule the state carries (reported LR and parameter update)."""
  model, v = ts.init_variables()
  a = _config(stages=(('heads', 3, 0.1), ('all', 3, 0.05)))
  b = _config(stages=(('heads', 40, 0.02), ('all', 9, 0.3)))
  b.train.warmup_steps, b.train.num_steps = 5, 60
  batch = ts.make_batches(1, 1, 2)[0]
  states, texts = {}, {}
  for name, c in (('a', a), ('b', b)):
    states[name] = parallel.replicate(state_lib.create_train_state(c, v, jax.random.PRNGKey(0)))
    step = jax.pmap(
        step_lib.make_stage_step(model, c, v['params'], v['batch_stats'], 'heads'),
        axis_name=parallel.AXIS,
    )
    texts[name] = step.lower(states[name], batch).as_text()
  assert texts['a'] == texts['b']
  # The one program on each state: each schedule's LR (b: 0.02 warmed up
  # by 1/5 at step 0) and an update that scales with it (float32 params
  # minus their old values: compared to the largest change).
  changes = {}
  for name in ('a', 'b'):
    new, out = step(states[name], batch)
    lr = float(parallel.first_replica(out)['lr'])
    want = float(schedule_lib.learning_rate_fn(b if name == 'b' else a)(0))
    np.testing.assert_allclose(lr, want, rtol=1e-6)
    before = _flat(v['params'])['fpn/P2_lateral/kernel']
    changes[name] = (
        np.asarray(parallel.unreplicate(new.params)['fpn']['P2_lateral']['kernel']) - before
    )
  assert float(schedule_lib.learning_rate_fn(b)(0)) == pytest.approx(0.004)
  want = changes['a'] * 0.004 / 0.1
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(changes['b'], want, rtol=0, atol=1e-3 * np.abs(want).max())


def _leaves_changed(before, after):
  a, b = _flat(before), _flat(after)
  return {k.rsplit('/', 1)[0] for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}


def test_step_respects_stage_masks():
  model, v = ts.init_variables()
  c = _config(stages=(('heads', 1, 0.1), ('4+', 1, 0.1)))
  state = state_lib.create_train_state(c, v, jax.random.PRNGKey(0))
  batch = ts.make_batches(1, 1, 2)[0]
  changed = {}
  for stage in ('heads', '4+'):
    step = jax.pmap(
        step_lib.make_stage_step(model, c, v['params'], v['batch_stats'], stage),
        axis_name=parallel.AXIS,
    )
    new, out = step(parallel.replicate(state), batch)
    new = parallel.unreplicate(new)
    assert np.isfinite(out['loss/total']).all() and int(new.step) == 1
    changed[stage] = _leaves_changed(state.params, new.params)
    # Frozen BatchNorm statistics are never touched.
    for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(new.batch_stats)):
      np.testing.assert_array_equal(a, b)
  assert changed['heads'] == {'fpn/P2_lateral', 'rpn/conv_class', 'box_head/linear_class'}
  assert changed['4+'] == changed['heads'] | {'backbone/C4_0/conv1'}


def _run(workdir, c, batches, stop_after=None):
  calls = {'n': 0}

  def batches_fn():
    for b in batches:
      if stop_after is not None and calls['n'] == stop_after:
        raise KeyboardInterrupt  # the process is killed here
      calls['n'] += 1
      yield b

  model, v = ts.init_variables()
  writer = ts.RecordingWriter()
  summary = loop_lib.make_image_summary_fn(model, c) if c.train.image_summary_every else None
  return loop_lib.train(c, workdir, model, v, batches_fn, writer, summary), writer


def test_kill_and_resume_matches_uninterrupted(tmp_path, capsys, monkeypatch):
  c = _config()  # 6 steps; stage change (and momentum reset) at step 3
  c.train.image_summary_every = 4
  batches = ts.make_batches(6, 1, 2)
  full, writer = _run(str(tmp_path / 'a'), c, batches)
  assert int(full.step) == 6
  assert list(writer.images) == [4]
  picture = writer.images[4]['prediction']
  # The 16-pixel canvas, drawn by sln_jax.visualization at >= 768 pixels.
  assert picture.shape[0] == 1 and picture.shape[2] == 768 and picture.dtype == np.uint8
  assert set(writer.scalars) == {2, 4, 6} and 'lr' in writer.scalars[6]
  assert writer.scalars[6]['images_per_s'] > 0
  np.testing.assert_allclose(writer.scalars[2]['lr'], 0.1)
  np.testing.assert_allclose(writer.scalars[6]['lr'], 0.05)
  with pytest.raises(KeyboardInterrupt):
    _run(str(tmp_path / 'b'), c, batches, stop_after=3)
  assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['2']
  capsys.readouterr()
  resumed, _ = _run(str(tmp_path / 'b'), c, batches)
  assert int(resumed.step) == 6
  out = capsys.readouterr().out
  assert out.count('resuming from step 2') == 1 and out.count('skipping 2 batches') == 1, out
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # Training actually moved the trainable weights.
  _, v = ts.init_variables()
  assert 'backbone/C1_conv' in _leaves_changed(v['params'], full.params)
  # A finished run resumes to itself without stepping.
  again, _ = _run(str(tmp_path / 'b'), c, [])
  assert int(again.step) == 6
  assert 'resuming from step 6' in capsys.readouterr().out
  # Other hosts restore the same state silently (one message per run).
  monkeypatch.setattr(jax, 'process_index', lambda *a, **k: 1)
  again, _ = _run(str(tmp_path / 'b'), c, [])
  assert int(again.step) == 6 and 'resuming' not in capsys.readouterr().out


@pytest.mark.parametrize('reset', [True, False])
def test_loop_resets_momentum_once_per_stage_change(tmp_path, monkeypatch, reset):
  """train.reset_momentum_per_stage: the loop zeroes the momentum at each
  stage's first step but the first (release: a new SGD per stage). The
  steps themselves are stand-ins that only count."""
  c = _config(stages=(('heads', 1, 0.1), ('all', 2, 0.05), ('4+', 1, 0.05)))
  c.train.reset_momentum_per_stage = reset
  c.train.legacy_sticky_freeze = reset  # the step builders get the history
  c.train.checkpoint_every = c.train.log_every = 10
  calls, built = [], []
  real = optimizer_lib.reset_momentum
  monkeypatch.setattr(loop_lib, 'reset_momentum', lambda s: calls.append(1) or real(s))

  def stage_step(*args):
    built.append(args[4:])
    return lambda state, batch: (state.replace(step=state.step + 1), {'loss/total': jnp.zeros(())})

  monkeypatch.setattr(loop_lib, 'make_stage_step', stage_step)
  state, _ = _run(str(tmp_path), c, ts.make_batches(4, 1, 2))
  assert int(state.step) == 4 and len(calls) == (2 if reset else 0)
  history = [(), ('heads',), ('heads', 'all')] if reset else [(), (), ()]
  assert built == [(name, h) for name, h in zip(('heads', 'all', '4+'), history)]


def test_checkpoint_of_another_model_is_one_error_naming_the_leaves(tmp_path):
  """A workdir trained with another model config: restoring it names the
  leaves that differ (model leaves, not their optimizer copies) instead of
  Orbax's tree dump."""
  c = _config(stages=(('all', 2, 0.1),))
  _run(str(tmp_path), c, ts.make_batches(2, 1, 2))
  _, v = ts.init_variables()
  params = jax.tree.map(lambda x: x, v['params'])
  params['fpn']['P2_lateral']['kernel'] = np.zeros((1, 1, 9, 9), np.float32)
  params['extra'] = {'kernel': np.zeros((2,), np.float32)}
  other = {'params': params, 'batch_stats': v['batch_stats']}
  with pytest.raises(UserError) as err:
    manager_lib.load_variables(c, str(tmp_path), other)
  message = str(err.value)
  assert err.value.path == os.path.join(str(tmp_path), 'checkpoints', '2')
  assert '1 missing: params/extra/kernel' in message, message
  assert '1 shape mismatches: params/fpn/P2_lateral/kernel' in message, message
  assert '(1, 1, 9, 9)' in message and 'opt_state' not in message and '\n' not in message
  # The same checkpoint still restores into its own model.
  restored, step = manager_lib.load_variables(c, str(tmp_path), v)
  assert step == 2 and jax.tree.structure(restored['params']) == jax.tree.structure(v['params'])


@contextlib.contextmanager
def _backend_compiles():
  """Yields a list that gets one entry per XLA program this process obtains
  meanwhile (``backend_compile_duration``: compiled, or loaded from the
  persistent cache)."""
  events = []

  def listener(name, *_, **__):
    if name.endswith('backend_compile_duration'):
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(name='compile_counts')
def fixture_compile_counts(monkeypatch):
  """Wraps ``jax.pmap`` so every call of a mapped function records how many
  XLA compilations it triggered; yields that list of counts."""
  counts = []
  real_pmap = jax.pmap

  def counting_pmap(fun, **kwargs):
    mapped = real_pmap(fun, **kwargs)

    def call(*args):
      before = len(events)
      out = mapped(*args)
      counts.append(len(events) - before)
      return out

    return call

  monkeypatch.setattr(jax, 'pmap', counting_pmap)
  with _backend_compiles() as events:
    yield counts


def test_steps_compile_once_per_stage_and_evaluation_once(tmp_path, compile_counts):
  """No recompilation: not per step, not at the stage change (momentum reset),
  not after a checkpoint, not after resuming; the eval loop compiles once."""
  counts = compile_counts
  c = _config()  # 3 'heads' steps, then 3 'all' steps; checkpoints every 2
  batches = ts.make_batches(6, 1, 2)
  with pytest.raises(KeyboardInterrupt):
    _run(str(tmp_path), c, batches, stop_after=5)
  # Killed while reading batch 6 (two batches are read ahead): steps 1-4 ran.
  assert len(counts) == 4 and counts[0] > 0 and counts[3] > 0, counts
  assert counts[1:3] == [0, 0], counts
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  del counts[:]
  _run(str(tmp_path), c, batches)  # resumes from the step-4 checkpoint
  assert len(counts) == 2 and counts[0] > 0 and counts[1] == 0, counts
  del counts[:]
  model, v = ts.init_variables()
  gt = [ts.annotation(i, 32, 24, (0, 0, 16, 12)) for i in (1, 2, 3, 4, 5)]
  eval_batches = [
      ts.eval_batch([1, 2], [True] * 2),
      ts.eval_batch([3, 4], [True] * 2),
      ts.eval_batch([5, -1], [True, False]),
  ]
  loops.evaluate(c, str(tmp_path), model, v, eval_batches, gt)
  assert len(counts) == 3 and counts[0] > 0 and counts[1:] == [0, 0], counts


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = _config(stages=(('all', 6, 0.05),))
  batches = ts.make_batches(6, 1, 2)
  batches[4]['image_scale'][0, 1, 0] = np.nan  # 5th step: the 'scaled' term
  with pytest.raises(UserError, match=r'non-finite loss at step 5: scaled = nan') as err:
    _run(str(tmp_path), c, batches)
  assert 'last good checkpoint: step 4' in str(err.value)
  ckpt = tmp_path / 'checkpoints'
  assert sorted(os.listdir(ckpt)) == ['2', '4']
  manager = manager_lib.checkpoint_manager(c, str(tmp_path))
  _, v = ts.init_variables()
  template = state_lib.create_train_state(c, v, jax.random.PRNGKey(0))
  good = manager_lib.restore_checkpoint(manager, template)
  assert int(good.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.params))


def test_damaged_checkpoint_is_one_user_error(tmp_path, monkeypatch, caplog):
  """A truncated data file (a copy cut short): one UserError naming the step
  directory and Orbax's reason, and none of the reports (hundreds of
  tracebacks on a real checkpoint) its pending array reads leave behind."""
  c = _config()
  _, v = ts.init_variables()
  template = state_lib.create_train_state(c, v, jax.random.PRNGKey(0))
  manager = manager_lib.checkpoint_manager(c, str(tmp_path))
  assert manager_lib.save_checkpoint(manager, template.replace(step=jnp.asarray(2)), force=True)
  for directory, _, names in os.walk(tmp_path / 'checkpoints' / '2' / 'default'):
    for name in names if os.path.basename(directory) == 'd' else ():
      with open(os.path.join(directory, name), 'r+b') as f:  # data files cut to half
        f.truncate(os.path.getsize(f.name) // 2)
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  with pytest.raises(UserError) as err:
    manager_lib.restore_checkpoint(
        manager_lib.checkpoint_manager(c, str(tmp_path), read_only=True), template
    )
  assert err.value.path == str(tmp_path / 'checkpoints' / '2')
  assert 'cannot be read (ValueError: ' in str(err.value)
  assert 'damaged or partly copied' in str(err.value)
  # Resuming from it: the same error before on_start (main.py writes the
  # run's config.txt there) and before any batch is read.
  started = []
  model, _ = ts.init_variables()
  with pytest.raises(UserError, match='cannot be read'):
    loop_lib.train(
        c,
        str(tmp_path),
        model,
        v,
        lambda: pytest.fail('read a batch'),
        ts.RecordingWriter(),
        on_start=lambda: started.append(1),
    )
  assert not started
  for _ in range(3):  # the pending reads end on Orbax's threads
    time.sleep(0.5)
    gc.collect()
  assert not reported, [str(r.exc_value)[:200] for r in reported]
  assert not [r for r in caplog.records if 'never retrieved' in r.getMessage()]
  sys.unraisablehook(type('Report', (), {'exc_value': RuntimeError('other'), 'object': None})())
  assert len(reported) == 1  # other reports still reach the hook


def test_a_failure_that_is_not_the_checkpoints_is_not_blamed_on_it(tmp_path, monkeypatch):
  """Out of memory while restoring propagates as it is: 'remove this step
  directory' would be destructive advice."""
  c = _config()
  _, v = ts.init_variables()
  template = state_lib.create_train_state(c, v, jax.random.PRNGKey(0))
  manager = manager_lib.checkpoint_manager(c, str(tmp_path))
  assert manager_lib.save_checkpoint(manager, template.replace(step=jnp.asarray(1)), force=True)

  def out_of_memory(*args, **kwargs):
    del args, kwargs
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate')

  monkeypatch.setattr(type(manager), 'restore', out_of_memory)
  with pytest.raises(RuntimeError, match='RESOURCE_EXHAUSTED'):
    manager_lib.restore_checkpoint(manager, template)


_DATA_PARALLEL = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from configs import default
    from sln_jax import parallel
    from sln_jax.training import state as state_lib
    from sln_jax.training import step as step_lib
    from tests import train_standin as ts
    assert jax.local_device_count() == 8, jax.devices()
    c = default.get_config()
    c.train.stages = (('all', 2, 0.1),)
    model, v = ts.init_variables()
    state = state_lib.create_train_state(c, v, jax.random.PRNGKey(3))
    step = step_lib.make_stage_step(model, c, v['params'], v['batch_stats'], 'all')
    (b8,) = ts.make_batches(1, 8, 1)
    b1 = jax.tree.map(lambda x: x.reshape((1, 8) + x.shape[2:]), b8)
    outs = {{}}
    for name, devices, batch in (('eight', jax.local_devices(), b8),
                                 ('one', jax.local_devices()[:1], b1)):
      p = jax.pmap(step, axis_name=parallel.AXIS, devices=devices)
      s = parallel.replicate(state, devices)
      for _ in range(2):
        s, out = p(s, batch)
      first = parallel.unreplicate(s.params)          # the first device's shard
      for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(s.params)):
        assert a.shape == b.shape[1:] and np.array_equal(np.asarray(b)[0], np.asarray(a))
      metrics = parallel.first_replica(out)
      assert set(metrics) == set(out) and metrics['loss/total'] == np.asarray(out['loss/total'])[0]
      outs[name] = dict(params=[np.asarray(x).tolist() for x in jax.tree.leaves(first)],
                        loss=float(metrics['loss/total']))
    print(json.dumps(outs))
""")


def test_eight_devices_equal_one_device(tmp_path):
  script = tmp_path / 'dp.py'
  script.write_text(_DATA_PARALLEL.format(root=ROOT))
  env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='2',
  )
  proc = subprocess.run(
      [sys.executable, str(script)],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  outs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert np.isfinite(outs['one']['loss'])
  np.testing.assert_allclose(outs['eight']['loss'], outs['one']['loss'], rtol=1e-5)
  _, v = ts.init_variables()
  init = [np.asarray(x) for x in jax.tree.leaves(v['params'])]
  for a, b, p0 in zip(outs['eight']['params'], outs['one']['params'], init):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The updates themselves agree too (not only the large parameters).
    np.testing.assert_allclose(a - p0, b - p0, rtol=1e-4, atol=1e-7)


def test_prefetch_to_devices_keeps_order_and_looks_ahead_depth_batches():
  pulled = []

  def source():
    for i in range(5):
      pulled.append(i)
      yield {'x': np.full((jax.local_device_count(), 2), i, np.float32)}

  out = parallel.prefetch_to_devices(source(), depth=2)
  first = next(out)
  assert pulled == [0, 1]  # one batch in flight beyond the yielded one
  assert (
      isinstance(first['x'], jax.Array)
      and first['x'].sharding.num_devices == jax.local_device_count()
  )
  rest = [int(np.asarray(b['x'])[0, 0]) for b in out]
  assert [int(np.asarray(first['x'])[0, 0])] + rest == [0, 1, 2, 3, 4]
  assert [int(np.asarray(b['x'])[0, 0]) for b in parallel.prefetch_to_devices(iter([]), 2)] == []


def test_layer_ratios_pool_the_counts_and_drop_them():
  scalars = {
      'loss/total': 1.5,
      'metric/head_accuracy': 0.9,
      'metric/layer1_hit_px': 30.0,
      'metric/layer1_target_px': 40.0,
      'metric/layer1_pred_px': 60.0,
      'metric/layer2_hit_px': 0.0,
      'metric/layer2_target_px': 5.0,
      'metric/layer2_pred_px': 0.0,
  }
  assert loop_lib.layer_ratios(scalars) == {
      'loss/total': 1.5,
      'metric/head_accuracy': 0.9,
      'metric/layer1_recall': 0.75,
      'metric/layer1_precision': 0.5,
      'metric/layer2_recall': 0.0,
  }  # no predicted pixels: no precision
  assert 'metric/layer1_hit_px' in scalars  # the input is not changed


def test_first_replica_and_unreplicate_read_the_first_devices_copy(caplog):
  n = jax.local_device_count()
  stacked = {
      'loss': np.full((n,), 2.5, np.float32),
      'w': np.stack([np.arange(15, dtype=np.int32).reshape(3, 5)] * n),
      'h': np.stack([np.full((2, 7), 0.25, jnp.bfloat16)] * n),
  }
  tree = parallel.shard(stacked)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    host = parallel.first_replica(tree)
  # A host copy of one shard: no computation compiled (nor run) on the devices.
  assert not [r for r in caplog.records if 'Compiling' in r.getMessage()]
  for k, v in stacked.items():
    assert isinstance(host[k], (np.ndarray, np.generic)) and host[k].dtype == v.dtype
    np.testing.assert_array_equal(host[k], v[0])
  dev = parallel.unreplicate(tree)
  for k, v in stacked.items():
    assert isinstance(dev[k], jax.Array) and dev[k].shape == v.shape[1:]
    np.testing.assert_array_equal(np.asarray(dev[k]), v[0])
  # The check above can see a device computation: indexing the global array
  # compiles one (a shape no other test uses).
  caplog.clear()
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    jax.tree.map(lambda x: x[0], parallel.shard({'x': np.zeros((n, 11, 13), np.float32)}))
  assert [r for r in caplog.records if 'Compiling' in r.getMessage()]


def test_model_state_and_unreplicate_compile_a_handful_of_programs():
  """Start-up and checkpoints compile no program per parameter shape (a
  tiny compile each; hundreds for the full model): the initial variables
  and the step counter are host copies, the optimizer state comes from one
  program, unreplicate drops the device axis of every leaf in one."""
  jax.clear_caches()  # what this process compiled before counts again
  with _backend_compiles() as compiles:
    config = tiny.get_config()
    _, variables = state_lib.create_model(config)
    n_model = len(compiles)
    state = state_lib.create_train_state(config, variables, jax.random.PRNGKey(1))
    n_state = len(compiles) - n_model
    rstate = parallel.replicate(state)
    del compiles[:]
    host = parallel.unreplicate(rstate)
    n_unreplicate = len(compiles)
  shapes = {x.shape for x in jax.tree.leaves(variables)}
  assert len(shapes) > 20, len(shapes)
  # create_model: the PRNG key's seed, fold-in and casts, and the draw.
  assert n_model <= 5 and n_state <= 1 and n_unreplicate == 1, (n_model, n_state, n_unreplicate)
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), host, state
  )


def test_reset_momentum_zeroes_in_one_program_keeping_each_sharding():
  """At a stage change the replicated momentum is zeroed by one program and
  keeps the sharding the pmapped step takes (a different one would make the
  next step copy or recompile)."""
  params = {
      'a': np.ones((3, 5), np.float32),
      'b': np.ones((7,), np.float32),
      'c': {'k': np.ones((2, 2, 4), np.float32)},
  }
  opt_state = optax.trace(decay=0.9).init(params)
  opt_state = optax.tree_utils.tree_set(opt_state, trace=jax.tree.map(np.ones_like, params))
  replicated = parallel.replicate(opt_state)
  with _backend_compiles() as compiles:
    reset = optimizer_lib.reset_momentum(replicated)
  assert len(compiles) == 1, compiles
  before = optax.tree_utils.tree_get(replicated, 'trace')
  after = optax.tree_utils.tree_get(reset, 'trace')
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert y.sharding == x.sharding and y.shape == x.shape and y.dtype == x.dtype
    assert not np.asarray(y).any() and np.asarray(x).all()
