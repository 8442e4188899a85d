"""Training state, optimizer, data-parallel steps, checkpoints and the loop.
(The evaluate and predict modes are in ``sln_jax.inference``; main.py's
modes in ``sln_jax.modes``.)

No TensorFlow here: main.py builds the input iterators (``input_pipeline``) and
passes them in. Batches follow docs/architecture.md with leading axes
(local devices, per-device batch).

Loss normalisation (why N devices give the same step as one device): the
loss of a step is the mean over the global batch of *per-image* losses.
``SLN.train_forward`` runs batched over a device's images and reduces every
term per image before averaging over images (``sln_jax.losses``), and
``lax.pmean`` over the axis 'batch' averages the gradients over devices.
Every device holds the same number of images, so the result is the global
per-image mean whatever the model normalises internally (positives, sampled
anchors). Each image's PRNG key is ``fold_in(fold_in(state.rng, step),
global image index)``, so the randomness does not depend on the device
count either.

Optimizer (release, apchenstu/SLN-Amodal model.py): zero the gradients of
frozen leaves, clip the global norm of the rest to ``train.grad_clip_norm``,
add L2 ``weight_decay * w`` to the gradients of every trained non-BN
parameter, biases included (``train.decay_biases=False``: kernels only),
SGD momentum (heavy ball, no dampening: torch.optim.SGD), LR from
``train.stages`` with optional linear warm-up. BatchNorm scale/bias and
statistics and the GLM (``glm/*``) are never trained, except with
``model.train_bn`` (``models.norm``): then the backbone's and heads' BNs
normalize with the global batch's statistics in the step (every stage),
update their running statistics, and their scale/bias train with their
stage's modules. The release builds a
new SGD optimizer per stage, so momentum restarts at each stage boundary
(``train.reset_momentum_per_stage``). QUIRK (``train.legacy_sticky_freeze``):
the release's ``set_trainable`` only ever freezes, so after its 'heads'
stage the '4+' and 'all' stages of one run train the heads alone
(pytorch-mask-rcnn issues #20 and #45); the flag reproduces that by
training, in each stage, only what every earlier stage trained too.
"""
from __future__ import annotations

import collections
import functools
import itertools
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from tqdm import tqdm

from sln_jax.cliutil import UserError, listing
from sln_jax.config_checks import is_int, is_number

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
  batch_stats: PyTree      # BatchNorm statistics (updated only with model.train_bn)
  opt_state: PyTree
  rng: jax.Array           # (2,) uint32 base key; per step fold_in(rng, step)
  # ``lr_tables(config)``: the learning-rate schedule as data of the step (not
  # constants of its program, so another schedule reuses the compiled step);
  # from the config, never checkpointed. None: the step's config's constants.
  lr_schedule: Optional[dict] = None


# --------------------------------------------------------------------- schedule

def schedule(config: ml_collections.ConfigDict) -> list[tuple[str, int, int, float]]:
  """(stage name, first step, end step, lr) per stage, truncated/extended to
  ``train.num_steps`` (-1: the stages' total)."""
  stages = [tuple(s) for s in config.train.stages]
  if not stages:
    raise UserError('needs at least one (name, steps, lr) stage', field='train.stages')
  out, start = [], 0
  for entry in stages:
    if (len(entry) != 3 or not isinstance(entry[0], str) or not is_int(entry[1])
        or entry[1] < 1 or not is_number(entry[2]) or entry[2] < 0):
      raise UserError(f'bad stage {entry!r}: expected (name, steps >= 1, lr >= 0)',
                      field='train.stages')
    stage_regex(entry[0])
    name, steps, lr = entry[0], int(entry[1]), float(entry[2])
    out.append((name, start, start + steps, lr))
    start += steps
  total = int(config.train.num_steps)
  if total == -1:
    return out
  if total < 1:
    raise UserError(f'{total} is not -1 (the stages\' total) or positive',
                    field='train.num_steps')
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


def lr_tables(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The schedule's numbers for :func:`learning_rate_at`: ``ends`` (S - 1,)
  int32 end step of every stage but the last, ``lrs`` (S,) float32 and
  ``warmup_scale`` () float32 = 1 / max(1, ``train.warmup_steps``)."""
  table = schedule(config)
  return {'ends': np.asarray([e for _, _, e, _ in table[:-1]], np.int32),
          'lrs': np.asarray([lr for *_, lr in table], np.float32),
          'warmup_scale': np.float32(1) / np.float32(max(1, int(config.train.warmup_steps)))}


def learning_rate_at(tables: dict, step: jax.Array) -> jax.Array:
  """LR at ``step`` (0-based): the stage's LR times a linear warm-up, min(1,
  (step + 1) * warmup_scale), i.e. over the first 1 / warmup_scale steps.

  The warm-up multiplies by the float32 reciprocal, as XLA compiled the
  division by a constant warm-up length when the schedule was constants
  of the step: the same LRs to the last bit, so runs train as before."""
  step = jnp.asarray(step, jnp.int32)
  lr = jnp.asarray(tables['lrs'])[jnp.searchsorted(jnp.asarray(tables['ends']), step,
                                                   side='right')]
  ramp = (step + 1).astype(jnp.float32) * jnp.asarray(tables['warmup_scale'], jnp.float32)
  return lr * jnp.minimum(1.0, ramp)


def learning_rate_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """step -> LR under ``config`` (:func:`learning_rate_at` of its tables)."""
  return functools.partial(learning_rate_at, lr_tables(config))


# --------------------------------------------------------------------- masks

def _flat(tree: PyTree) -> dict:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _unflat(flat: dict) -> PyTree:
  return traverse_util.unflatten_dict(flat, sep='/')


def batchnorm_modules(batch_stats: PyTree) -> set[str]:
  """Module paths ('backbone/C1_bn') that hold BatchNorm statistics."""
  return {k.rsplit('/', 1)[0] for k in _flat(batch_stats)}


def stage_regex(stage: str) -> re.Pattern:
  """The Flax-path pattern of a stage: ``STAGE_PATTERNS[stage]``, or the
  name itself as a regex."""
  try:
    return re.compile(STAGE_PATTERNS.get(stage, stage))
  except re.error as err:
    raise UserError(f'stage {stage!r} is neither a known stage '
                    f'({", ".join(STAGE_PATTERNS)}) nor a regex: {err}',
                    field='train.stages') from None


def trainable_mask(params: PyTree, batch_stats: PyTree, stage: str,
                   train_bn: bool = False, earlier: Sequence[str] = ()) -> PyTree:
  """Bool tree like ``params``: True where ``stage`` trains the leaf.

  The GLM is always frozen; BatchNorm parameters (modules that own
  ``batch_stats``) too unless ``train_bn`` (``model.train_bn``). A leaf
  that one of the ``earlier`` stages does not match stays frozen
  (``train.legacy_sticky_freeze``; ``stage_freeze_history``).
  """
  regexes = [stage_regex(s) for s in (*earlier, stage)]
  bn = batchnorm_modules(batch_stats)
  flat = _flat(params)
  mask = {k: all(r.fullmatch(k) for r in regexes) and not re.fullmatch(NEVER_TRAINED, k)
          and (train_bn or k.rsplit('/', 1)[0] not in bn) for k in flat}
  if not any(mask.values()):
    after = (f' after {", ".join(map(repr, earlier))} (train.legacy_sticky_freeze '
             'trains only what every earlier stage trained)' if earlier else '')
    raise UserError(f'stage {stage!r} trains no parameter{after} (a regex fully matching '
                    'Flax paths such as mask_head/.*; the GLM is always frozen, BatchNorm '
                    'parameters unless model.train_bn)', field='train.stages')
  return _unflat(mask)


def stage_freeze_history(config: ml_collections.ConfigDict, index: int) -> tuple[str, ...]:
  """The stages before stage ``index`` of ``train.stages`` whose freezing
  stays in force there: all of them with ``train.legacy_sticky_freeze``
  (the release's one-way ``set_trainable``), none otherwise."""
  if not config.train.legacy_sticky_freeze:
    return ()
  return tuple(name for name, *_ in schedule(config)[:index])


def decay_mask(params: PyTree, batch_stats: PyTree, biases: bool = True) -> PyTree:
  """Bool tree like ``params``: weight decay on every parameter but
  BatchNorm's (the release: all trained parameters without 'bn' in their
  name), biases only when ``biases`` (``train.decay_biases``)."""
  bn = batchnorm_modules(batch_stats)
  return _unflat({k: (biases or k.rsplit('/', 1)[-1] != 'bias')
                  and k.rsplit('/', 1)[0] not in bn for k in _flat(params)})


def create_optimizer(config: ml_collections.ConfigDict, params: PyTree,
                     batch_stats: PyTree, stage: str,
                     earlier: Sequence[str] = (),
                     learning_rate: Optional[Callable[[jax.Array], jax.Array]] = None
                     ) -> optax.GradientTransformation:
  """The optimizer of one stage (``earlier``: ``stage_freeze_history``;
  ``learning_rate``: optimizer step -> LR, default ``learning_rate_fn(config)``).
  Every stage's state has the same structure (the per-stage masks are
  stateless), so a state carries across stages."""
  train = trainable_mask(params, batch_stats, stage, config.model.train_bn, earlier)
  labels = jax.tree.map(lambda t: 'train' if t else 'freeze', train)
  decay = jax.tree.map(lambda t, d: t and d, train,
                       decay_mask(params, batch_stats, config.train.decay_biases))
  tc = config.train

  def freeze():
    return optax.multi_transform(
        {'train': optax.identity(), 'freeze': optax.set_to_zero()}, labels)
  return optax.chain(
      freeze(),                                    # frozen grads do not count in the norm
      optax.clip_by_global_norm(tc.grad_clip_norm),
      optax.add_decayed_weights(tc.weight_decay, mask=decay),
      optax.trace(decay=tc.momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate or learning_rate_fn(config)),
      freeze(),                                    # momentum left from an earlier stage
  )


def reset_momentum(opt_state: PyTree) -> PyTree:
  """Zeroes the momentum buffers (a fresh SGD, as at each release stage) in
  one program that keeps each buffer's sharding, so the next step takes them
  as they are (eager ``zeros_like`` would compile one program per shape)."""
  trace = optax.tree_utils.tree_get(opt_state, 'trace')
  zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t),
                  out_shardings=jax.tree.map(lambda x: x.sharding, trace))(trace)
  return optax.tree_utils.tree_set(opt_state, trace=zeros)


# --------------------------------------------------------------------- state

def create_train_state(config: ml_collections.ConfigDict, variables: PyTree,
                       rng: jax.Array) -> TrainState:
  """A fresh state (step 0) around model ``variables`` {'params', 'batch_stats'}."""
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  tx = create_optimizer(config, params, batch_stats, schedule(config)[0][0])
  # One program builds the optimizer state (eagerly, each zeros_like would
  # compile one per parameter shape).
  return TrainState(step=jax.device_put(np.zeros((), np.int32)), params=params,
                    batch_stats=batch_stats, opt_state=jax.jit(tx.init)(params), rng=rng,
                    lr_schedule=jax.device_put(lr_tables(config)))


def init_from_checkpoints(config: ml_collections.ConfigDict, variables: PyTree,
                          strict: bool = False) -> PyTree:
  """Applies ``config.init_from`` / ``config.init_patterns`` (comma-separated
  Orbax dirs and Flax-path regexes; ``checkpoint_port.partial_load``).

  Model leaves that no checkpoint holds with their shape keep their values
  (training: a new head starts from its initialisation) and one printed line
  counts them and names the first. With ``strict`` (evaluate / predict, where
  nothing would train them) they are a UserError naming ``init_from``.
  """
  dirs = [d.strip() for d in str(config.init_from).split(',') if d.strip()]
  if not dirs:
    return variables
  from sln_jax import checkpoint_port  # pylint: disable=g-import-not-at-top
  patterns = [p.strip() for p in str(config.init_patterns).split(',') if p.strip()]
  report = checkpoint_port.LoadReport()
  loaded = checkpoint_port.partial_load(variables, [(d, patterns) for d in dirs], report,
                                        strict=strict)
  if jax.process_index() == 0:
    print(f'init_from: {report.summary()}', flush=True)
  return loaded


# --------------------------------------------------------------------- steps

def make_train_step(model: Any, config: ml_collections.ConfigDict,
                    tx: Union[optax.GradientTransformation,
                              Callable[[Callable], optax.GradientTransformation]],
                    trainable: Optional[PyTree] = None) -> Callable:
  """Per-device step ``(state, batch) -> (state, metrics)`` for ``jax.pmap``
  with ``axis_name='batch'``; ``batch`` has a leading per-device batch axis.

  ``tx``: a function of the learning rate (step -> LR) that builds the
  optimizer: the step passes it the schedule of ``state.lr_schedule``, so
  the LRs, stage lengths and warm-up are inputs of the compiled program and
  a launch with another schedule loads it from the persistent cache; or an
  optimizer built with its LRs (it and the reported ``lr`` then follow
  ``config``, whatever the state carries).

  ``trainable`` (bool tree like params, e.g. ``trainable_mask``): frozen
  leaves enter the loss through ``stop_gradient``, so no gradient is computed
  for them (the GLM's backward pass is never built); their gradient is 0.
  With ``model.train_bn`` the BNs compute statistics over the whole global
  batch (summed over ``AXIS``) and the step returns their new running
  statistics (identical on every device).
  """
  train_bn = bool(config.model.train_bn)
  if train_bn:
    model = model.clone(bn_axis_name=AXIS)

  def loss_fn(params, batch_stats, batch, rngs):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p),
                            params, trainable)
    variables = {'params': params, 'batch_stats': batch_stats}
    if train_bn:
      (losses, metrics), new = model.apply(variables, batch, rngs, method='train_forward',
                                           mutable=['batch_stats'])
      batch_stats = new['batch_stats']
    else:
      losses, metrics = model.apply(variables, batch, rngs, method='train_forward')
    return losses['total'], (losses, metrics, batch_stats)

  def step(state: TrainState, batch: Batch):
    per_device = jax.tree.leaves(batch)[0].shape[0]
    step_rng = jax.random.fold_in(state.rng, state.step)
    first = jax.lax.axis_index(AXIS) * per_device
    rngs = jax.vmap(lambda i: jax.random.fold_in(step_rng, first + i))(
        jnp.arange(per_device))
    grads, (losses, metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rngs)
    grads, losses, metrics = jax.lax.pmean((grads, losses, metrics), AXIS)
    if callable(tx) and state.lr_schedule is not None:   # the state's schedule
      lr_fn = functools.partial(learning_rate_at, state.lr_schedule)
    else:                                                # the config's, as constants
      lr_fn = learning_rate_fn(config)
    opt = tx(lr_fn) if callable(tx) else tx
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {'loss/' + k: v for k, v in losses.items()}
    out.update({'metric/' + k: v for k, v in metrics.items()})
    out['lr'] = lr_fn(state.step)
    out['grad_norm'] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats=batch_stats), out
  return step


def make_stage_step(model: Any, config: ml_collections.ConfigDict, params: PyTree,
                    batch_stats: PyTree, stage: str, earlier: Sequence[str] = ()) -> Callable:
  """:func:`make_train_step` for one stage of ``train.stages`` (``earlier``:
  ``stage_freeze_history``): its optimizer and its trainable mask are built
  from the same ``(config, stage, earlier)``, so what the optimizer updates
  and what gets a gradient cannot disagree. The optimizer takes its learning
  rate from ``state.lr_schedule`` (:func:`make_train_step`)."""
  def tx(learning_rate):
    return create_optimizer(config, params, batch_stats, stage, earlier, learning_rate)
  trainable = trainable_mask(params, batch_stats, stage, config.model.train_bn, earlier)
  return make_train_step(model, config, tx, trainable)


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


def _pmap_sharding(devices: Optional[Sequence[Any]] = None) -> jax.sharding.Sharding:
  devices = list(devices or jax.local_devices())
  return jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))


def replicate(tree: PyTree, devices: Optional[Sequence[Any]] = None) -> PyTree:
  """Copies ``tree`` to ``devices`` (default: every local device) with the
  sharding ``jax.pmap`` returns (so the first step does not recompile)."""
  devices = list(devices or jax.local_devices())
  sharding = _pmap_sharding(devices)
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def shard(tree: PyTree) -> PyTree:
  """Puts host arrays with leading axes (local devices, ...) on the local
  devices, slice d on device d (the layout ``jax.pmap`` takes). Returns at
  once: the copies run asynchronously."""
  sharding = _pmap_sharding()
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def prefetch_to_devices(batches: Iterable[Batch], depth: int = 2) -> Iterator[Batch]:
  """Yields ``batches`` (host arrays, leading axes (local devices, ...)) as
  device arrays (:func:`shard`), keeping ``depth`` batches in flight so the
  host-to-device copies overlap the running step. ``depth`` 0: no lookahead
  (each batch is copied when it is asked for)."""
  it = iter(batches)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(it, n):
      queue.append(shard(batch))
  enqueue(max(1, depth))
  while queue:
    yield queue.popleft()
    enqueue(1)


def _first_shard(x: Any) -> Any:
  """The first local device's shard of a device array (leading axis of
  length 1 kept); other leaves as they are. Taking it queues no computation."""
  return x.addressable_data(0) if isinstance(x, jax.Array) else x


@jax.jit
def _drop_leading_axis(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x[0], tree)


def unreplicate(tree: PyTree) -> PyTree:
  """One copy of a tree replicated along a leading device axis, as arrays on
  the first local device. Slices that device's shard: ``x[0]`` on the whole
  array would run a computation across every device (0.45 s against 0.04 s
  for the synthetic model's train state on 8 CPU devices). One program drops
  the axis of every array leaf (per-leaf ``[0]`` would compile one per shape)."""
  leaves, treedef = jax.tree.flatten(tree)
  on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  sliced = dict(zip(on_device, _drop_leading_axis([_first_shard(leaves[i]) for i in on_device])))
  return jax.tree.unflatten(treedef, [sliced[i] if i in sliced else x[0]
                                      for i, x in enumerate(leaves)])


def first_replica(tree: PyTree) -> PyTree:
  """The host (numpy) values of the first local device's copy of each leaf
  (leading device axis dropped), e.g. a step's pmean-ed metrics.

  Copies one shard per leaf and queues no computation on the devices, so it
  waits only for the step that produced ``tree``; ``x[0]`` would queue a
  slice on every device behind the steps dispatched since, and the host
  would wait for those too.
  """
  return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(jax.tree.map(_first_shard, tree)))


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


def _global_replicated(tree: PyTree) -> PyTree:
  """Multi-process: host-local leaves (the same values on every process) ->
  jax.Arrays replicated over every device of every process, the form Orbax
  saves and restores across processes. One process: ``tree`` as it is."""
  if jax.process_count() == 1:
    return tree
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(jax.devices()), ('all',)), jax.sharding.PartitionSpec())
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def _host_local(tree: PyTree) -> PyTree:
  """Inverse of :func:`_global_replicated`: this process's copy of each leaf."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState,
                    force: bool = False) -> bool:
  """Saves an unreplicated ``state`` at its step (if the interval or ``force``).
  Every process calls it (with equal states) when there are several."""
  step = int(jax.device_get(state.step))
  if manager.latest_step() == step:
    return False
  saved = manager.save(step, args=ocp.args.StandardSave(_global_replicated(_to_tree(state))),
                       force=force)
  manager.wait_until_finished()
  return bool(saved)


def restore_checkpoint(manager: ocp.CheckpointManager, template: TrainState,
                       step: Optional[int] = None) -> Optional[TrainState]:
  """The latest (or ``step``) checkpoint shaped like ``template``; None if none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  from sln_jax import checkpoint_port  # pylint: disable=g-import-not-at-top
  try:
    with checkpoint_port.quiet_failed_reads():
      tree = _host_local(manager.restore(
          step, args=ocp.args.StandardRestore(_global_replicated(_to_tree(template)))))
  except Exception as err:  # pylint: disable=broad-except - reported as a UserError
    # Orbax raises ValueError when the tree structure or shapes differ (the
    # metadata says which), and a bare Exception over TensorStore's error
    # when an array file is damaged or truncated (is_read_failure).
    step_dir = os.path.join(manager.directory, str(step))
    problem = checkpoint_mismatch(step_dir, _to_tree(template))
    if problem:
      raise UserError(problem, path=step_dir) from None
    if not checkpoint_port.is_read_failure(err):
      if isinstance(err, ValueError):
        raise UserError(f'does not match this config\'s model '
                        f'({str(err).splitlines()[0][:200]}); {MISMATCH_HINT}',
                        path=step_dir) from None
      raise  # out of memory, a transient file-system error: not the checkpoint's fault
    raise checkpoint_port.unreadable_checkpoint(
        step_dir, err, 'a damaged or partly copied checkpoint? Remove this step '
        'directory to go back to the one before it; or, if it was written for another '
        'model config, use a new --workdir or that config') from None
  return TrainState(
      step=jnp.asarray(tree['step'], jnp.int32), params=tree['params'],
      batch_stats=tree['batch_stats'],
      opt_state=flax.serialization.from_state_dict(template.opt_state, tree['opt_state']),
      rng=jnp.asarray(tree['rng']), lr_schedule=template.lr_schedule)


_LAYER_COUNT = re.compile(r'(metric/layer\d+)_hit_px')


def layer_ratios(scalars: dict[str, float]) -> dict[str, float]:
  """Replaces the ``metric/layer{k}_{hit,target,pred}_px`` pixel counts
  (``sln.layer_pixel_counts``, averaged over the log window) by
  ``metric/layer{k}_recall`` = hit / target and ``metric/layer{k}_precision``
  = hit / pred; a ratio with no pixels under it is left out."""
  out = dict(scalars)
  for name in scalars:
    match = _LAYER_COUNT.fullmatch(name)
    if not match:
      continue
    base = match.group(1)
    hit = out.pop(name)
    for ratio, denominator in (('recall', '_target_px'), ('precision', '_pred_px')):
      total = out.pop(base + denominator, 0.0)
      if total > 0:
        out[f'{base}_{ratio}'] = hit / total
  return out


MISMATCH_HINT = ('was it written for another model config? Use a new --workdir or '
                 'the config it was trained with')


def checkpoint_mismatch(step_dir: str, expected: PyTree) -> Optional[str]:
  """Why the checkpoint in ``step_dir`` cannot be restored as ``expected``
  (``_to_tree`` of this config's state; arrays or shape structs): its
  missing, unexpected and differently shaped leaves, read from the
  checkpoint's metadata. None when they all fit (or there is no metadata)."""
  try:
    meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, 'default'))
    saved = _shapes(getattr(meta, 'item_metadata', meta))
  except Exception:  # pylint: disable=broad-except - no readable metadata: nothing to compare
    return None
  if not saved:  # Orbax gives empty metadata when it cannot read it (a damaged file)
    return None
  want = _shapes(expected)

  def problems(keep):
    w = {k: v for k, v in want.items() if keep(k)}
    h = {k: v for k, v in saved.items() if keep(k)}
    return [listing(title, items, limit=8) for title, items in (
        ('missing', sorted(set(w) - set(h))),
        ('unexpected', sorted(set(h) - set(w))),
        ('shape mismatches', [f'{k} {h[k]} != expected {w[k]}'
                              for k in sorted(set(w) & set(h)) if h[k] != w[k]]))
            if items]
  # The model's leaves first; the optimizer state mirrors them.
  found = problems(lambda k: not k.startswith('opt_state/')) or problems(lambda k: True)
  if not found:
    return None
  return f'does not match this config\'s model: {"; ".join(found)}; {MISMATCH_HINT}'


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints in ``workdir/checkpoints`` (directory names;
  nothing is read)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  # No CheckpointManager here: it synchronises the processes, and a process
  # that has gone on to create the directory would meet one still checking.
  return sorted(int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
                if n.isdigit())


def check_checkpoint_fits(config: ml_collections.ConfigDict, workdir: str,
                          variables: PyTree) -> None:
  """Raises a UserError when the latest checkpoint in ``workdir`` does not fit
  this config's model (from its metadata; nothing is read or allocated).
  main.py's modes call it before writing anything into ``workdir``."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = checkpoint_steps(workdir)
  problem = step_dir = None
  if steps:
    expected = jax.eval_shape(
        lambda v: _to_tree(create_train_state(config, v, jax.random.PRNGKey(0))), variables)
    step_dir = os.path.join(directory, str(max(steps)))
    problem = checkpoint_mismatch(step_dir, expected)
  if jax.process_count() > 1:   # every process checks before any creates the directory
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('sln_checkpoint_checked')
  if problem:
    raise UserError(problem, path=step_dir)


def _shapes(tree: PyTree) -> dict[str, tuple]:
  """'a/b/c' -> shape of every array leaf of ``tree`` (arrays or Orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path):
          tuple(getattr(leaf, 'shape', ()) or ()) for path, leaf in leaves}


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   variables: PyTree) -> tuple[PyTree, int]:
  """Model variables of the latest checkpoint in ``workdir`` (for evaluate /
  predict) and its step."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = checkpoint_manager(config, workdir, read_only=True) if os.path.isdir(directory) else None
  step = manager.latest_step() if manager is not None else None
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
          on_start: Optional[Callable[[], None]] = None,
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
    on_start: called once the state is initialised or restored (a checkpoint
      that cannot be read has been refused), before any batch is read.

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
  chief = jax.process_index() == 0  # one message per run, not per host
  if restored is not None:
    state = restored
    if chief:
      print(f'resuming from step {int(state.step)} ({manager.directory})', flush=True)
  if on_start is not None:
    on_start()
  start, end = int(state.step), total_steps(config)
  if start >= end:
    return state

  it = iter(make_train_iter())
  if start:
    if chief:
      print(f'skipping {start} batches to continue the data order', flush=True)
    for _ in range(start):
      next(it)
  device_batches = prefetch_to_devices(it, int(tc.device_prefetch))
  table = schedule(config)
  steps = {}
  rstate = replicate(state)
  global_batch = num_local * per_device * jax.process_count()
  sums, count, t_log = {}, 0, time.perf_counter()
  pbar = tqdm(total=end, initial=start, desc='train', unit='step', mininterval=1.0,
              disable=jax.process_index() != 0)

  def take(pending):
    """Reads one finished step's metrics (blocks until that step is done);
    stops on a non-finite loss."""
    step, out = pending
    out = first_replica(out)
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
    pbar.set_postfix(stage=table[stage_index(config, step)][0],
                     loss=f'{float(out["loss/total"]):.4f}', refresh=False)
    pbar.update(1)

  # Steps are dispatched ahead of the host: a step's metrics are read after
  # the next step is queued, and every checkpoint, log line and image summary
  # first waits for the metrics of the steps before it (so no checkpoint is
  # written after a non-finite loss).
  pending = None
  for step in range(start, end):
    k = stage_index(config, step)
    name = table[k][0]
    if k not in steps:
      steps[k] = jax.pmap(make_stage_step(model, config, state.params, state.batch_stats, name,
                                          stage_freeze_history(config, k)),
                          axis_name=AXIS, donate_argnums=(0,))
    if step == table[k][1] and step > 0 and tc.reset_momentum_per_stage:
      rstate = rstate.replace(opt_state=reset_momentum(rstate.opt_state))
    try:
      batch = next(device_batches)
    except StopIteration:
      raise UserError(f'training data ran out at step {step}',
                      field='dataset.train_split') from None
    rstate, out = steps[k](rstate, batch)
    if pending is not None:
      take(pending)
    pending = (step, out)
    count += 1
    done = step + 1
    log = done % max(1, tc.log_every) == 0 or done == end
    summary = (image_summary_fn is not None and tc.image_summary_every > 0
               and done % tc.image_summary_every == 0 and jax.process_index() == 0)
    save = done % max(1, tc.checkpoint_every) == 0 or done == end
    if log or summary or save:
      take(pending)
      pending = None
    if log:
      elapsed = time.perf_counter() - t_log
      scalars = layer_ratios({n: v / count for n, v in sums.items()})
      scalars['images_per_s'] = count * global_batch / max(elapsed, 1e-9)
      writer.write_scalars(done, scalars)
      sums, count, t_log = {}, 0, time.perf_counter()
    if summary:
      params, stats = unreplicate((rstate.params, rstate.batch_stats))
      one = jax.tree.map(lambda x: np.asarray(x)[0, :1], batch)
      writer.write_images(done, image_summary_fn({'params': params, 'batch_stats': stats}, one))
    if save:
      save_checkpoint(manager, unreplicate(rstate), force=done == end)
      writer.flush()
  pbar.close()
  writer.flush()
  return unreplicate(rstate)


# --------------------------------------------------------------------- model

def create_model(config: ml_collections.ConfigDict) -> tuple[Any, PyTree]:
  """``SLN(config.model)`` (loss weights from ``config.loss``) and its freshly
  initialised variables."""
  from sln_jax.models import sln  # pylint: disable=g-import-not-at-top
  model = sln.build_model(config)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  variables = sln.init_variables(model, rng, config.input.image_size)
  return model, {'params': variables['params'],
                 'batch_stats': variables.get('batch_stats', {})}


def make_image_summary_fn(model: Any, config: ml_collections.ConfigDict
                          ) -> Callable[[PyTree, Batch], dict]:
  """``(variables, batch of one image) -> {'prediction': (1, S, S, 3) uint8}``:
  the detections above ``predict.score_threshold`` drawn on the canvas."""
  from sln_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  infer = jax.jit(make_infer_fn(model))

  def fn(variables, batch):
    inputs = {k: batch[k] for k in ('image', 'glm_image', 'image_shape')}
    dets = jax.device_get(infer(variables, inputs))
    canvas = np.asarray(batch['image'][0])
    size = canvas.shape[:2]
    results = predict_lib.detections_to_results(
        0, {k: v[0] for k, v in dets.items()}, (1.0, 1.0), size,
        score_threshold=config.predict.score_threshold,
        mask_threshold=config.eval.mask_threshold,
        mask_paste=config.eval.mask_paste)
    return {'prediction': predict_lib.render_prediction(canvas, results)[None]}
  return fn
