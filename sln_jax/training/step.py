"""Per-device train and inference steps, for ``jax.pmap`` over ``parallel.AXIS``.

The loss of a step is the mean over the global batch of per-image losses:
``SLN.train_forward`` reduces every term per image before averaging over the
device's images (``sln_jax.losses``), and ``lax.pmean`` averages gradients
over devices, each holding the same number of images, so N devices give the
step one device gives. Each image's PRNG key is ``fold_in(fold_in(state.rng,
step), global image index)``, so the randomness does not depend on the device
count either.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sln_jax.parallel import AXIS, Batch, PyTree
from sln_jax.training.optimizer import create_optimizer, trainable_mask
from sln_jax.training.schedule import learning_rate_at, learning_rate_fn
from sln_jax.training.state import TrainState


def make_train_step(
    model: Any,
    config: ml_collections.ConfigDict,
    make_optimizer: Callable[[Callable], optax.GradientTransformation],
    trainable: Optional[PyTree] = None,
) -> Callable:
  """Per-device step ``(state, batch) -> (state, metrics)`` for ``jax.pmap``
  with ``axis_name='batch'``; ``batch`` has a leading per-device batch axis.

  ``make_optimizer``: a function of the learning rate (step -> LR) that builds
  the optimizer. The step passes it the schedule of ``state.lr_schedule``, so
  the LRs, stage lengths and warm-up are inputs of the compiled program and a
  launch with another schedule loads it from the persistent cache (a state
  without one uses the config's schedule as constants).

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
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    variables = {'params': params, 'batch_stats': batch_stats}
    if train_bn:
      (losses, metrics), new = model.apply(
          variables, batch, rngs, method='train_forward', mutable=['batch_stats']
      )
      batch_stats = new['batch_stats']
    else:
      losses, metrics = model.apply(variables, batch, rngs, method='train_forward')
    return losses['total'], (losses, metrics, batch_stats)

  def step(state: TrainState, batch: Batch):
    per_device = jax.tree.leaves(batch)[0].shape[0]
    step_rng = jax.random.fold_in(state.rng, state.step)
    first = jax.lax.axis_index(AXIS) * per_device
    rngs = jax.vmap(lambda i: jax.random.fold_in(step_rng, first + i))(jnp.arange(per_device))
    grads, (losses, metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rngs
    )
    grads, losses, metrics = jax.lax.pmean((grads, losses, metrics), AXIS)
    if state.lr_schedule is not None:  # the state's schedule
      lr_fn = functools.partial(learning_rate_at, state.lr_schedule)
    else:  # the config's, as constants
      lr_fn = learning_rate_fn(config)
    opt = make_optimizer(lr_fn)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {'loss/' + k: v for k, v in losses.items()}
    out.update({'metric/' + k: v for k, v in metrics.items()})
    out['lr'] = lr_fn(state.step)
    out['grad_norm'] = optax.tree.norm(grads)
    return (
        state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
        ),
        out,
    )

  return step


def make_stage_step(
    model: Any,
    config: ml_collections.ConfigDict,
    params: PyTree,
    batch_stats: PyTree,
    stage: str,
    earlier: Sequence[str] = (),
) -> Callable:
  """:func:`make_train_step` for one stage of ``train.stages`` (``earlier``:
  ``stage_freeze_history``): its optimizer and its trainable mask are built
  from the same ``(config, stage, earlier)``, so what the optimizer updates
  and what gets a gradient cannot disagree. The optimizer takes its learning
  rate from ``state.lr_schedule`` (:func:`make_train_step`)."""

  def make_optimizer(learning_rate):
    return create_optimizer(config, params, batch_stats, stage, earlier, learning_rate)

  trainable = trainable_mask(params, batch_stats, stage, config.model.train_bn, earlier)
  return make_train_step(model, config, make_optimizer, trainable)


def make_infer_fn(model: Any) -> Callable:
  """Per-device ``(variables, batch) -> detections`` for ``jax.pmap``."""

  def infer(variables, batch):
    return model.apply(
        variables, batch['image'], batch['glm_image'], batch['image_shape'], method='infer'
    )

  return infer


def make_box_prompted_infer_fn(model: Any) -> Callable:
  """Per-device ``(variables, batch) -> masks of the batch's ground-truth
  boxes`` for ``jax.pmap``: ``SLN.infer_boxes`` on ``gt_boxes`` (B, M, 4)
  canvas pixels, ``gt_valid`` (B, M) and ``gt_classes`` (B, M), returning
  ``SLN.infer``'s dict with one slot per ground-truth slot."""

  def infer(variables, batch):
    return model.apply(
        variables,
        batch['image'],
        batch['glm_image'],
        batch['image_shape'],
        batch['gt_boxes'],
        batch['gt_valid'],
        batch['gt_classes'],
        method='infer_boxes',
    )

  return infer
