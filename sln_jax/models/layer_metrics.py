"""Training metrics of the layered mask head: per-layer pixel counts over
the positive ROIs, behind the log's ``layer{k}_recall`` and
``layer{k}_precision`` (``sln_jax.training.loop.layer_ratios``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_pixel_counts(
    layer_logits: jax.Array,
    layer_targets: jax.Array,
    positive: jax.Array,
    activation: str = 'sigmoid',
) -> dict[str, jax.Array]:
  """Per-layer mask pixel counts over the positive ROIs, mean over images.

  Args:
    layer_logits: (B, R, M, M, L) ('sigmoid') or (B, R, M, M, 1 + L)
      ('softmax'); layer_targets: (B, R, M, M, L) in [0, 1]; positive:
      (B, R) bool.
    activation: ``model.layer_activation``. A pixel is predicted on layer k
      where its logit is > 0 ('sigmoid') or where class k is the argmax
      ('softmax').

  Returns:
    float32 scalars ``layer{k}_hit_px`` (predicted and target >= 0.5),
    ``layer{k}_target_px`` and ``layer{k}_pred_px`` for k = 1..L (1 = the
    visible layer, 2.. the occluded ones). The training log turns them into
    ``layer{k}_recall`` = hit / target and ``layer{k}_precision`` = hit / pred
    (``sln_jax.training.loop.layer_ratios``); counts, not ratios, so that
    averaging over images, devices and log steps pools the pixels.
  """
  keep = positive[:, :, None, None, None]
  if activation == 'softmax':
    num = layer_logits.shape[-1]
    pred = jax.nn.one_hot(jnp.argmax(layer_logits, axis=-1), num, dtype=bool)[..., 1:]
  else:
    pred = layer_logits > 0
  pred = pred & keep
  target = (layer_targets >= 0.5) & keep
  count = lambda x: jnp.mean(jnp.sum(x.astype(jnp.float32), axis=(1, 2, 3)), axis=0)
  hit, tgt, prd = count(pred & target), count(target), count(pred)
  out = {}
  for k in range(layer_targets.shape[-1]):
    out[f'layer{k + 1}_hit_px'] = hit[k]
    out[f'layer{k + 1}_target_px'] = tgt[k]
    out[f'layer{k + 1}_pred_px'] = prd[k]
  return out
