"""Which parameters train in each stage, and the optimizer that trains them.

The release's optimizer (apchenstu/SLN-Amodal model.py): zero the gradients of
frozen leaves, clip the global norm of the rest to ``train.grad_clip_norm``,
add L2 ``weight_decay * w`` to the gradients of every trained non-BatchNorm
parameter, biases included (``train.decay_biases=False``: kernels only), then
SGD with heavy-ball momentum (torch.optim.SGD). ``train.optimizer='adamw'``
(not in the release; for training from scratch) replaces the last two: Adam
(betas ``train.adam_b1`` / ``train.adam_b2``) with decoupled weight decay
on the same parameters. A stage trains the leaves its
pattern matches (``schedule.stage_regex``). BatchNorm scale/bias and
statistics and the GLM (``glm/*``) never train, except with
``model.train_bn``: then the backbone's and heads' BNs train with their
stage's modules. The release builds a new optimizer per
stage, so momentum restarts at each stage boundary
(``train.reset_momentum_per_stage``). QUIRK (``train.legacy_sticky_freeze``):
the release's ``set_trainable`` only ever freezes, so after its 'heads' stage
its '4+' and 'all' stages train the heads alone; the flag reproduces that by
training, in each stage, only what every earlier stage trained too.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sln_jax.errors import UserError
from sln_jax.parallel import PyTree
from sln_jax.training.schedule import learning_rate_fn, schedule, stage_regex

NEVER_TRAINED = r'glm/.*'


def _flat(tree: PyTree) -> dict:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _unflat(flat: dict) -> PyTree:
  return traverse_util.unflatten_dict(flat, sep='/')


def batchnorm_modules(batch_stats: PyTree) -> set[str]:
  """Module paths ('backbone/C1_bn') that hold BatchNorm statistics."""
  return {k.rsplit('/', 1)[0] for k in _flat(batch_stats)}


def trainable_mask(
    params: PyTree,
    batch_stats: PyTree,
    stage: str,
    train_bn: bool = False,
    earlier: Sequence[str] = (),
) -> PyTree:
  """Bool tree like ``params``: True where ``stage`` trains the leaf.

  The GLM is always frozen; BatchNorm parameters (modules that own
  ``batch_stats``) too unless ``train_bn`` (``model.train_bn``). A leaf
  that one of the ``earlier`` stages does not match stays frozen
  (``train.legacy_sticky_freeze``; ``stage_freeze_history``).
  """
  regexes = [stage_regex(s) for s in (*earlier, stage)]
  bn = batchnorm_modules(batch_stats)
  flat = _flat(params)
  mask = {
      k: all(r.fullmatch(k) for r in regexes)
      and not re.fullmatch(NEVER_TRAINED, k)
      and (train_bn or k.rsplit('/', 1)[0] not in bn)
      for k in flat
  }
  if not any(mask.values()):
    after = (
        f' after {", ".join(map(repr, earlier))} (train.legacy_sticky_freeze '
        'trains only what every earlier stage trained)'
        if earlier
        else ''
    )
    raise UserError(
        f'stage {stage!r} trains no parameter{after} (a regex fully matching '
        'Flax paths such as mask_head/.*; the GLM is always frozen, BatchNorm '
        'parameters unless model.train_bn)',
        field='train.stages',
    )
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
  return _unflat(
      {
          k: (biases or k.rsplit('/', 1)[-1] != 'bias') and k.rsplit('/', 1)[0] not in bn
          for k in _flat(params)
      }
  )


def create_optimizer(
    config: ml_collections.ConfigDict,
    params: PyTree,
    batch_stats: PyTree,
    stage: str,
    earlier: Sequence[str] = (),
    learning_rate: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> optax.GradientTransformation:
  """The optimizer of one stage (``earlier``: ``stage_freeze_history``;
  ``learning_rate``: optimizer step -> LR, default ``learning_rate_fn(config)``).
  Every stage's state has the same structure (the per-stage masks are
  stateless), so a state carries across stages."""
  train = trainable_mask(params, batch_stats, stage, config.model.train_bn, earlier)
  labels = jax.tree.map(lambda t: 'train' if t else 'freeze', train)
  decay = jax.tree.map(
      lambda t, d: t and d, train, decay_mask(params, batch_stats, config.train.decay_biases)
  )
  tc = config.train

  def freeze():
    return optax.multi_transform({'train': optax.identity(), 'freeze': optax.set_to_zero()}, labels)

  kind = tc.get('optimizer', 'sgd')
  if kind == 'sgd':
    update = (
        optax.add_decayed_weights(tc.weight_decay, mask=decay),
        optax.trace(decay=tc.momentum, nesterov=False),
    )
  elif kind == 'adamw':
    update = (
        optax.scale_by_adam(b1=tc.adam_b1, b2=tc.adam_b2),
        optax.add_decayed_weights(tc.weight_decay, mask=decay),
    )
  else:
    raise UserError(f'{kind!r} is not one of sgd, adamw', field='train.optimizer')
  return optax.chain(
      freeze(),  # frozen grads do not count in the norm
      optax.clip_by_global_norm(tc.grad_clip_norm),
      *update,
      optax.scale_by_learning_rate(learning_rate or learning_rate_fn(config)),
      freeze(),  # momentum left from an earlier stage
  )


def reset_momentum(opt_state: PyTree) -> PyTree:
  """Zeroes the momentum buffers (a fresh SGD, as at each release stage; for
  Adam its moments and step count, a fresh Adam) in one program that keeps
  each buffer's sharding, so the next step takes them as they are (eager
  ``zeros_like`` would compile one program per shape)."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  if any(is_adam(x) for x in jax.tree.leaves(opt_state, is_leaf=is_adam)):
    return _zeroed(opt_state, is_adam)
  trace = optax.tree_utils.tree_get(opt_state, 'trace')
  return optax.tree_utils.tree_set(opt_state, trace=_zeroed(trace, lambda x: False))


def _zeroed(tree: PyTree, is_target: Callable[[object], bool]) -> PyTree:
  """``tree`` with every leaf zeroed (only the leaves inside nodes that
  ``is_target`` picks, when any does), sharding kept."""
  picked = any(is_target(x) for x in jax.tree.leaves(tree, is_leaf=is_target))

  def zero(node):
    if picked and not is_target(node):
      return node
    return jax.tree.map(jnp.zeros_like, node)

  return jax.jit(
      lambda t: jax.tree.map(zero, t, is_leaf=lambda x: picked and is_target(x)),
      out_shardings=jax.tree.map(lambda x: x.sharding, tree),
  )(tree)
