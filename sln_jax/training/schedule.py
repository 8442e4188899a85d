"""The training schedule: stages of (name, steps, learning rate).

``train.stages`` lists (name or parameter regex, steps, lr); ``train.num_steps``
truncates or extends the last stage (-1: the stages' total). The learning rate
of a step is data of the step (``lr_tables``), not a constant of its program,
so another schedule reuses the compiled step; ``train.warmup_steps`` ramps it
linearly from zero. A stage's trainable set is ``STAGE_PATTERNS[name]`` or
the stage name as a regex fully matching Flax paths ('a/b/c').
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sln_jax.config_values import is_int, is_number
from sln_jax.errors import UserError

# Flax path regexes (full match on 'a/b/c') of each named stage's trainable set;
# any other stage name is used as a regex itself (as in the release).
STAGE_PATTERNS = {
    'heads': r'(fpn|rpn|box_head|mask_head|layering_head)/.*',
    '4+': r'(backbone/C[45]_[^/]*|fpn|rpn|box_head|mask_head|layering_head)/.*',
    'all': r'(?!glm/).*',
}


def schedule(config: ml_collections.ConfigDict) -> list[tuple[str, int, int, float]]:
  """(stage name, first step, end step, lr) per stage, truncated/extended to
  ``train.num_steps`` (-1: the stages' total)."""
  stages = [tuple(s) for s in config.train.stages]
  if not stages:
    raise UserError('needs at least one (name, steps, lr) stage', field='train.stages')
  out, start = [], 0
  for entry in stages:
    if (
        len(entry) != 3
        or not isinstance(entry[0], str)
        or not is_int(entry[1])
        or entry[1] < 1
        or not is_number(entry[2])
        or entry[2] < 0
    ):
      raise UserError(
          f'bad stage {entry!r}: expected (name, steps >= 1, lr >= 0)', field='train.stages'
      )
    stage_regex(entry[0])
    name, steps, lr = entry[0], int(entry[1]), float(entry[2])
    out.append((name, start, start + steps, lr))
    start += steps
  total = int(config.train.num_steps)
  if total == -1:
    return out
  if total < 1:
    raise UserError(f"{total} is not -1 (the stages' total) or positive", field='train.num_steps')
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
  return {
      'ends': np.asarray([e for _, _, e, _ in table[:-1]], np.int32),
      'lrs': np.asarray([lr for *_, lr in table], np.float32),
      'warmup_scale': np.float32(1) / np.float32(max(1, int(config.train.warmup_steps))),
  }


def learning_rate_at(tables: dict, step: jax.Array) -> jax.Array:
  """LR at ``step`` (0-based): the stage's LR times a linear warm-up, min(1,
  (step + 1) * warmup_scale), i.e. over the first 1 / warmup_scale steps.

  The warm-up multiplies by the float32 reciprocal of its length, the form
  XLA gives a division by a compile-time constant, so the LRs are, to the
  last bit, those of a step compiled with the warm-up length as a constant."""
  step = jnp.asarray(step, jnp.int32)
  lr = jnp.asarray(tables['lrs'])[jnp.searchsorted(jnp.asarray(tables['ends']), step, side='right')]
  ramp = (step + 1).astype(jnp.float32) * jnp.asarray(tables['warmup_scale'], jnp.float32)
  return lr * jnp.minimum(1.0, ramp)


def learning_rate_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """step -> LR under ``config`` (:func:`learning_rate_at` of its tables)."""
  return functools.partial(learning_rate_at, lr_tables(config))


def stage_regex(stage: str) -> re.Pattern:
  """The Flax-path pattern of a stage: ``STAGE_PATTERNS[stage]``, or the
  name itself as a regex."""
  try:
    return re.compile(STAGE_PATTERNS.get(stage, stage))
  except re.error as err:
    raise UserError(
        f'stage {stage!r} is neither a known stage '
        f'({", ".join(STAGE_PATTERNS)}) nor a regex: {err}',
        field='train.stages',
    ) from None
