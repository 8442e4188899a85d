"""Training state, optimizer, data-parallel steps, checkpoints and the loop.

No TensorFlow here: main.py builds the input iterators (``input_pipeline``) and
passes them in. Batches follow docs/architecture.md with leading axes
(local devices, per-device batch).

Loss normalisation (why N devices give the same step as one device): the
loss of a step is the mean over the global batch of *per-image* losses. Each
device runs ``SLN.train_forward`` on every image separately (``jax.vmap`` over
a batch of one), averages over its images, and ``lax.pmean`` over the axis
'batch' averages the gradients over devices. Every device holds the same
number of images, so the result is the global per-image mean whatever the
model normalises internally (positives, sampled anchors). Each image's PRNG
key is ``fold_in(fold_in(state.rng, step), global image index)``, so the
randomness does not depend on the device count either.

Optimizer (release, apchenstu/SLN-Amodal model.py): zero the gradients of
frozen leaves, clip the global norm of the rest to ``train.grad_clip_norm``,
add L2 ``weight_decay * w`` to the gradients of trainable non-BN, non-bias
weights, SGD momentum (heavy ball, no dampening: torch.optim.SGD), LR from
``train.stages`` with optional linear warm-up. BatchNorm scale/bias and
statistics and the GLM (``glm/*``) are never trained. The release builds a
new SGD optimizer per stage, so momentum restarts at each stage boundary
(``train.reset_momentum_per_stage``).
"""
from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from tqdm import tqdm

from sln_jax.cliutil import UserError, atomic_output_file

if TYPE_CHECKING:  # importing clu.metric_writers at run time would import TensorFlow
  from clu.metric_writers.interface import MetricWriter
else:
  MetricWriter = Any

AXIS = 'batch'
PyTree = Any
Batch = dict

# Flax path regexes (full match on 'a/b/c') of each named stage's trainable set;
# any other stage name is used as a regex itself (as in the release).
STAGE_PATTERNS = {
    'heads': r'(fpn|rpn|box_head|mask_head)/.*',
    '4+': r'(backbone/C[45]_[^/]*|fpn|rpn|box_head|mask_head)/.*',
    'all': r'(?!glm/).*',
}
NEVER_TRAINED = r'glm/.*'


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # () int32: optimizer steps taken
  params: PyTree
  batch_stats: PyTree      # frozen BatchNorm statistics, never updated
  opt_state: PyTree
  rng: jax.Array           # (2,) uint32 base key; per step fold_in(rng, step)


# --------------------------------------------------------------------- schedule

def schedule(config: ml_collections.ConfigDict) -> list[tuple[str, int, int, float]]:
  """(stage name, first step, end step, lr) per stage, truncated/extended to
  ``train.num_steps`` (-1: the stages' total)."""
  stages = [tuple(s) for s in config.train.stages]
  if not stages:
    raise UserError('needs at least one (name, steps, lr) stage', field='train.stages')
  out, start = [], 0
  for entry in stages:
    if len(entry) != 3 or int(entry[1]) <= 0:
      raise UserError(f'bad stage {entry!r}: expected (name, steps > 0, lr)',
                      field='train.stages')
    name, steps, lr = str(entry[0]), int(entry[1]), float(entry[2])
    out.append((name, start, start + steps, lr))
    start += steps
  total = int(config.train.num_steps)
  if total < 0:
    return out
  if total == 0:
    raise UserError('must be -1 or positive', field='train.num_steps')
  kept = [(n, s, min(e, total), lr) for n, s, e, lr in out if s < total]
  name, s, _, lr = kept[-1]
  kept[-1] = (name, s, total, lr)  # the last stage absorbs any extra steps
  return kept


def total_steps(config: ml_collections.ConfigDict) -> int:
  return schedule(config)[-1][2]


def stage_index(config: ml_collections.ConfigDict, step: int) -> int:
  """Index into ``schedule(config)`` of the stage that runs step ``step``."""
  for k, (_, start, end, _) in enumerate(schedule(config)):
    if start <= step < end:
      return k
  return len(schedule(config)) - 1


def learning_rate_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """step -> LR: the stage's LR times a linear warm-up over ``train.warmup_steps``."""
  table = schedule(config)
  ends = jnp.asarray([e for _, _, e, _ in table[:-1]], jnp.int32)
  lrs = jnp.asarray([lr for *_, lr in table], jnp.float32)
  warmup = int(config.train.warmup_steps)

  def fn(step):
    step = jnp.asarray(step, jnp.int32)
    lr = lrs[jnp.searchsorted(ends, step, side='right')]
    if warmup > 0:
      lr = lr * jnp.minimum(1.0, (step + 1).astype(jnp.float32) / warmup)
    return lr
  return fn


# --------------------------------------------------------------------- masks

def _flat(tree: PyTree) -> dict:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _unflat(flat: dict) -> PyTree:
  return traverse_util.unflatten_dict(flat, sep='/')


def batchnorm_modules(batch_stats: PyTree) -> set[str]:
  """Module paths ('backbone/C1_bn') that hold BatchNorm statistics."""
  return {k.rsplit('/', 1)[0] for k in _flat(batch_stats)}


def trainable_mask(params: PyTree, batch_stats: PyTree, stage: str) -> PyTree:
  """Bool tree like ``params``: True where ``stage`` trains the leaf.

  BatchNorm parameters (modules that own ``batch_stats``) and the GLM are
  always frozen.
  """
  pattern = STAGE_PATTERNS.get(stage, stage)
  try:
    regex = re.compile(pattern)
  except re.error as err:
    raise UserError(f'stage {stage!r} is neither a known stage '
                    f'({", ".join(STAGE_PATTERNS)}) nor a regex: {err}',
                    field='train.stages') from None
  bn = batchnorm_modules(batch_stats)
  flat = _flat(params)
  mask = {k: bool(regex.fullmatch(k)) and not re.fullmatch(NEVER_TRAINED, k)
          and k.rsplit('/', 1)[0] not in bn for k in flat}
  if not any(mask.values()):
    raise UserError(f'stage {stage!r} trains no parameter', field='train.stages')
  return _unflat(mask)


def decay_mask(params: PyTree, batch_stats: PyTree) -> PyTree:
  """Bool tree like ``params``: weight decay on kernels, not on BN or biases."""
  bn = batchnorm_modules(batch_stats)
  return _unflat({k: k.rsplit('/', 1)[-1] != 'bias' and k.rsplit('/', 1)[0] not in bn
                  for k in _flat(params)})


def create_optimizer(config: ml_collections.ConfigDict, params: PyTree,
                     batch_stats: PyTree, stage: str) -> optax.GradientTransformation:
  """The optimizer of one stage. Every stage's state has the same structure
  (the per-stage masks are stateless), so a state carries across stages."""
  train = trainable_mask(params, batch_stats, stage)
  labels = jax.tree.map(lambda t: 'train' if t else 'freeze', train)
  decay = jax.tree.map(lambda t, d: t and d, train, decay_mask(params, batch_stats))
  tc = config.train

  def freeze():
    return optax.multi_transform(
        {'train': optax.identity(), 'freeze': optax.set_to_zero()}, labels)
  return optax.chain(
      freeze(),                                    # frozen grads do not count in the norm
      optax.clip_by_global_norm(tc.grad_clip_norm),
      optax.add_decayed_weights(tc.weight_decay, mask=decay),
      optax.trace(decay=tc.momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate_fn(config)),
      freeze(),                                    # momentum left from an earlier stage
  )


def reset_momentum(opt_state: PyTree) -> PyTree:
  """Zeroes the momentum buffers (a fresh SGD, as at each release stage)."""
  return optax.tree_utils.tree_set(
      opt_state, trace=jax.tree.map(
          jnp.zeros_like, optax.tree_utils.tree_get(opt_state, 'trace')))


# --------------------------------------------------------------------- state

def create_train_state(config: ml_collections.ConfigDict, variables: PyTree,
                       rng: jax.Array) -> TrainState:
  """A fresh state (step 0) around model ``variables`` {'params', 'batch_stats'}."""
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  tx = create_optimizer(config, params, batch_stats, schedule(config)[0][0])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params), rng=rng)


def _local_partial_load(target: PyTree, sources: Sequence[str],
                        patterns: Sequence[str]) -> PyTree:
  """Copies leaves of Orbax checkpoints ``sources`` into ``target`` where the
  Flax path matches one of ``patterns`` (all if empty) and exists in the source."""
  flat = _flat(target)
  regexes = [re.compile(p) for p in patterns]
  mismatches, loaded = [], 0
  for src in sources:
    path = os.path.abspath(src)
    if not os.path.isdir(path):
      raise UserError('no such checkpoint directory', path=src, field='init_from')
    try:
      restored = ocp.StandardCheckpointer().restore(path)
    except Exception as err:  # noqa: BLE001 - any Orbax failure is the user's file
      raise UserError(f'not an Orbax checkpoint ({type(err).__name__})',
                      path=src, field='init_from') from None
    restored = {k: v for k, v in restored.items() if k in ('params', 'batch_stats')}
    for key, value in _flat(restored).items():
      if key not in flat or (regexes and not any(r.fullmatch(key) for r in regexes)):
        continue
      if tuple(np.shape(value)) != tuple(np.shape(flat[key])):
        mismatches.append(f'{key} {np.shape(value)} vs {np.shape(flat[key])}')
        continue
      flat[key] = jnp.asarray(value, dtype=flat[key].dtype)
      loaded += 1
  if mismatches:
    raise UserError('shape mismatch: ' + '; '.join(mismatches[:5]) +
                    (f' (+{len(mismatches) - 5} more)' if len(mismatches) > 5 else ''),
                    path=','.join(sources), field='init_from')
  if not loaded:
    raise UserError('no parameter matched', path=','.join(sources), field='init_patterns')
  return _unflat(flat)


def init_from_checkpoints(config: ml_collections.ConfigDict, variables: PyTree) -> PyTree:
  """Applies ``config.init_from`` (comma-separated Orbax dirs) to ``variables``."""
  sources = [s.strip() for s in str(config.init_from).split(',') if s.strip()]
  if not sources:
    return variables
  patterns = [p.strip() for p in str(config.init_patterns).split(',') if p.strip()]
  try:
    from sln_jax import checkpoint_port  # pylint: disable=g-import-not-at-top
  except ImportError:
    checkpoint_port = None
  if checkpoint_port is not None and hasattr(checkpoint_port, 'partial_load') and not patterns:
    return checkpoint_port.partial_load(variables, sources)
  return _local_partial_load(variables, sources, patterns)


# --------------------------------------------------------------------- steps

def make_train_step(model: Any, config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation) -> Callable:
  """Per-device step ``(state, batch) -> (state, metrics)`` for ``jax.pmap``
  with ``axis_name='batch'``; ``batch`` has a leading per-device batch axis."""

  def image_loss(params, batch_stats, image_batch, rng):
    one = jax.tree.map(lambda x: x[None], image_batch)
    losses, metrics = model.apply({'params': params, 'batch_stats': batch_stats},
                                  one, rng, method='train_forward')
    return losses['total'], (losses, metrics)

  def loss_fn(params, batch_stats, batch, rngs):
    totals, aux = jax.vmap(image_loss, in_axes=(None, None, 0, 0))(
        params, batch_stats, batch, rngs)
    return jnp.mean(totals), jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)

  def step(state: TrainState, batch: Batch):
    per_device = jax.tree.leaves(batch)[0].shape[0]
    step_rng = jax.random.fold_in(state.rng, state.step)
    first = jax.lax.axis_index(AXIS) * per_device
    rngs = jax.vmap(lambda i: jax.random.fold_in(step_rng, first + i))(
        jnp.arange(per_device))
    grads, (losses, metrics) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rngs)
    grads, losses, metrics = jax.lax.pmean((grads, losses, metrics), AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {'loss/' + k: v for k, v in losses.items()}
    out.update({'metric/' + k: v for k, v in metrics.items()})
    out['lr'] = learning_rate_fn(config)(state.step)
    out['grad_norm'] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out
  return step


def make_infer_fn(model: Any) -> Callable:
  """Per-device ``(variables, batch) -> detections`` for ``jax.pmap``."""
  def infer(variables, batch):
    return model.apply(variables, batch['image'], batch['glm_image'],
                       batch['image_shape'], method='infer')
  return infer


def data_parallel_batch(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(local devices, per-device batch) for ``train.batch_size`` global images."""
  global_batch, devices = int(config.train.batch_size), jax.device_count()
  if global_batch <= 0 or global_batch % devices:
    raise UserError(f'{global_batch} is not a positive multiple of the '
                    f'{devices} devices', field='train.batch_size')
  return jax.local_device_count(), global_batch // devices


def replicate(tree: PyTree) -> PyTree:
  """Copies ``tree`` to every local device with the sharding ``jax.pmap``
  returns (so the first step's output does not trigger a recompile)."""
  devices = jax.local_devices()
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def unreplicate(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x[0], tree)


# --------------------------------------------------------------------- checkpoints

def checkpoint_manager(config: ml_collections.ConfigDict, workdir: str,
                       read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, int(config.train.checkpoint_every)),
      max_to_keep=int(config.train.keep_checkpoints) or None,
      enable_async_checkpointing=False, read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def _to_tree(state: TrainState) -> dict:
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': flax.serialization.to_state_dict(state.opt_state), 'rng': state.rng}


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState,
                    force: bool = False) -> bool:
  """Saves an unreplicated ``state`` at its step (if the interval or ``force``)."""
  step = int(jax.device_get(state.step))
  if manager.latest_step() == step:
    return False
  saved = manager.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=force)
  manager.wait_until_finished()
  return bool(saved)


def restore_checkpoint(manager: ocp.CheckpointManager, template: TrainState,
                       step: Optional[int] = None) -> Optional[TrainState]:
  """The latest (or ``step``) checkpoint shaped like ``template``; None if none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  tree = manager.restore(step, args=ocp.args.StandardRestore(_to_tree(template)))
  return TrainState(
      step=jnp.asarray(tree['step'], jnp.int32), params=tree['params'],
      batch_stats=tree['batch_stats'],
      opt_state=flax.serialization.from_state_dict(template.opt_state, tree['opt_state']),
      rng=jnp.asarray(tree['rng']))


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   variables: PyTree) -> tuple[PyTree, int]:
  """Model variables of the latest checkpoint in ``workdir`` (for evaluate /
  predict) and its step."""
  manager = checkpoint_manager(config, workdir, read_only=True)
  step = manager.latest_step() if os.path.isdir(manager.directory) else None
  if step is None:
    raise UserError('no checkpoint to evaluate (train first)',
                    path=os.path.join(workdir, 'checkpoints'))
  rng = jax.random.PRNGKey(0)
  state = restore_checkpoint(manager, create_train_state(config, variables, rng), step)
  return {'params': state.params, 'batch_stats': state.batch_stats}, step


# --------------------------------------------------------------------- loop

def _first_bad_loss(losses: dict) -> Optional[str]:
  """Name of the first non-finite loss term (terms before 'total')."""
  names = sorted(losses, key=lambda k: (k.endswith('/total'), k))
  for name in names:
    if not np.all(np.isfinite(losses[name])):
      return name
  return None


def train(config: ml_collections.ConfigDict, workdir: str, model: Any,
          variables: PyTree, make_train_iter: Callable[[], Iterable[Batch]],
          writer: MetricWriter,
          image_summary_fn: Optional[Callable[[PyTree, Batch], dict]] = None,
          ) -> TrainState:
  """Trains to ``total_steps(config)``, resuming from the latest checkpoint.

  Args:
    config: the whole config tree.
    workdir: checkpoints go to ``workdir/checkpoints``.
    model: the Flax module (``train_forward(batch, rng)``).
    variables: initial {'params', 'batch_stats'} (ignored when resuming).
    make_train_iter: returns this process's batches, leading axes
      (local devices, per-device batch), in a deterministic order; on resume
      the first ``step`` batches are skipped so the run continues exactly.
    writer: TensorBoard scalars (losses, lr, images/s) and images.
    image_summary_fn: ``(variables, one-image batch) -> {name: (N,H,W,3) uint8}``
      written every ``train.image_summary_every`` steps.

  Returns:
    The final, unreplicated state.

  Raises:
    UserError: a non-finite loss (names the step and the term); the last
      checkpoint on disk stays the last good one.
  """
  tc = config.train
  num_local, per_device = data_parallel_batch(config)
  manager = checkpoint_manager(config, workdir)
  state = create_train_state(config, variables,
                             jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
  restored = restore_checkpoint(manager, state)
  if restored is not None:
    state = restored
    print(f'resuming from step {int(state.step)} ({manager.directory})', flush=True)
  start, end = int(state.step), total_steps(config)
  if start >= end:
    return state

  it = iter(make_train_iter())
  if start:
    print(f'skipping {start} batches to continue the data order', flush=True)
    for _ in range(start):
      next(it)
  table = schedule(config)
  steps = {}
  rstate = replicate(state)
  global_batch = num_local * per_device * jax.process_count()
  sums, count, t_log = {}, 0, time.perf_counter()
  pbar = tqdm(total=end, initial=start, desc='train', unit='step', mininterval=1.0,
              disable=jax.process_index() != 0)
  for step in range(start, end):
    k = stage_index(config, step)
    name = table[k][0]
    if k not in steps:
      tx = create_optimizer(config, state.params, state.batch_stats, name)
      steps[k] = jax.pmap(make_train_step(model, config, tx), axis_name=AXIS,
                          donate_argnums=(0,))
    if step == table[k][1] and step > 0 and tc.reset_momentum_per_stage:
      rstate = rstate.replace(opt_state=reset_momentum(rstate.opt_state))
    try:
      batch = next(it)
    except StopIteration:
      raise UserError(f'training data ran out at step {step}',
                      field='dataset.train_split') from None
    rstate, out = steps[k](rstate, batch)
    out = jax.device_get(jax.tree.map(lambda x: x[0], out))
    bad = _first_bad_loss({n: v for n, v in out.items() if n.startswith('loss/')})
    if bad is not None:
      pbar.close()
      last = manager.latest_step()
      raise UserError(
          f'non-finite loss at step {step + 1}: {bad[5:]} = {float(out[bad])} '
          f'(total = {float(out["loss/total"])}); last good checkpoint: '
          f'{"none" if last is None else f"step {last}"}', path=str(manager.directory),
          field='train')
    for n, v in out.items():
      sums[n] = sums.get(n, 0.0) + float(v)
    count += 1
    pbar.set_postfix(stage=name, loss=f'{float(out["loss/total"]):.4f}', refresh=False)
    pbar.update(1)
    done = step + 1
    if done % max(1, tc.log_every) == 0 or done == end:
      elapsed = time.perf_counter() - t_log
      scalars = {n: v / count for n, v in sums.items()}
      scalars['images_per_s'] = count * global_batch / max(elapsed, 1e-9)
      writer.write_scalars(done, scalars)
      sums, count, t_log = {}, 0, time.perf_counter()
    if (image_summary_fn is not None and tc.image_summary_every > 0
        and done % tc.image_summary_every == 0 and jax.process_index() == 0):
      params = jax.tree.map(lambda x: x[0], rstate.params)
      stats = jax.tree.map(lambda x: x[0], rstate.batch_stats)
      one = jax.tree.map(lambda x: np.asarray(x)[0, :1], batch)
      writer.write_images(done, image_summary_fn({'params': params, 'batch_stats': stats}, one))
    if done % max(1, tc.checkpoint_every) == 0 or done == end:
      save_checkpoint(manager, unreplicate(rstate), force=done == end)
      writer.flush()
  pbar.close()
  writer.flush()
  return unreplicate(rstate)
