"""Speed of SLN training and inference steps on device-resident synthetic batches.

  python scripts/benchmark.py --config=configs/default.py --mode=train --steps=20
  python scripts/benchmark.py --config=configs/default.py --mode=infer --dtype=bfloat16 --peer

Prints one JSON line per measurement: device, dtype, batch, image size,
compile_s, step_ms, images_per_s, model FLOPs per image (XLA cost analysis),
MFU against --peak_tflops, and with --peer the same step of torchvision's
Mask R-CNN R101-FPN at the same image size, batch and dtype policy (autocast
for bf16) with the ratio of images/s. Needs no TensorFlow: batches are built
in numpy and put on the device once; the timed loop only dispatches steps.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Model/config file.')
flags.DEFINE_enum('mode', 'train', ['train', 'infer'], 'What to time.')
flags.DEFINE_integer('steps', 10, 'Timed steps (after one compile + one warm-up step).')
flags.DEFINE_integer('batch', 0, 'Global batch; 0 = config.train.batch_size.')
flags.DEFINE_integer('image_size', 0, 'Canvas size; 0 = config.input.image_size.')
flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16'], 'Compute dtype; "" = config.model.dtype.')
flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of the device for MFU (0: guess from the device kind).')
flags.DEFINE_bool('peer', False, 'Also time torchvision Mask R-CNN R101-FPN (needs torch + torchvision).')
flags.DEFINE_string('output', '', 'Append the JSON lines to this file too.')
FLAGS = flags.FLAGS

# Dense bf16 peak TFLOP/s by device kind (fp32 runs use TF32 tensor cores on NVIDIA).
_PEAKS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0, 'TPU v5': 197.0}


def synthetic_batch(config, batch: int, size: int, rng: np.random.Generator) -> dict:
  """A batch in the pipeline's layout (docs/architecture.md), no device axis."""
  m = config.input.max_instances
  k = config.input.gt_mask_size
  num_layers = config.model.num_layers
  g = config.model.glm.image_size
  n_obj = min(8, m)
  y1 = rng.uniform(0, size * 0.6, (batch, n_obj))
  x1 = rng.uniform(0, size * 0.6, (batch, n_obj))
  h = rng.uniform(size * 0.1, size * 0.4, (batch, n_obj))
  w = rng.uniform(size * 0.1, size * 0.4, (batch, n_obj))
  boxes = np.zeros((batch, m, 4), np.float32)
  boxes[:, :n_obj] = np.stack([y1, x1, y1 + h, x1 + w], -1)
  valid = np.zeros((batch, m), bool)
  valid[:, :n_obj] = True
  layers = np.zeros((batch, m, k, k, num_layers), np.float32)
  layers[:, :n_obj, k // 4: 3 * k // 4, k // 4: 3 * k // 4, 0] = 1.0
  return {
      'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
      'glm_image': rng.integers(0, 256, (batch, g, g, 3), dtype=np.uint8),
      'image_shape': np.full((batch, 2), size, np.float32),
      'image_scale': np.ones((batch, 2), np.float32),
      'image_id': np.arange(batch, dtype=np.int32),
      'gt_boxes': boxes, 'gt_classes': valid.astype(np.int32), 'gt_valid': valid,
      'gt_layers': layers,
      'gt_occlude_rate': np.zeros((batch, m), np.float32),
      'gt_is_stuff': np.zeros((batch, m), bool),
      'gt_depth_rank': np.zeros((batch, m), np.int32),
  }


def _timed(fn, args, steps: int):
  import jax
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get('flops', 0.0))
  out = compiled(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = compiled(*args)
  jax.block_until_ready(out)
  step_s = (time.perf_counter() - t0) / steps
  return compile_s, step_s, flops


def benchmark_sln(config, mode: str, batch: int, size: int, steps: int) -> dict:
  import jax
  import optax
  from sln_jax.models import sln as sln_lib

  model = sln_lib.SLN(config.model)
  variables = sln_lib.init_variables(model, jax.random.PRNGKey(0), size)
  np_batch = synthetic_batch(config, batch, size, np.random.default_rng(0))
  dev_batch = jax.device_put(np_batch)
  if mode == 'train':
    tx = optax.chain(optax.clip_by_global_norm(config.train.grad_clip_norm),
                     optax.sgd(1e-3, momentum=config.train.momentum))
    params, stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)

    def step(params, opt_state, b, rng):
      def loss_fn(p):
        losses, _ = model.apply({'params': p, 'batch_stats': stats}, b, rng,
                                method=sln_lib.SLN.train_forward)
        return losses['total']
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    # No donation: the timed loop re-feeds the same inputs to every call.
    fn = jax.jit(step)
    args = (params, opt_state, dev_batch, jax.random.PRNGKey(1))
  else:
    def infer(v, b):
      return model.apply(v, b['image'], b['glm_image'], b['image_shape'],
                         method=sln_lib.SLN.infer)
    fn = jax.jit(infer)
    args = (variables, dev_batch)
  compile_s, step_s, flops = _timed(fn, args, steps)
  return dict(compile_s=compile_s, step_s=step_s, flops=flops,
              params=sln_lib.count_parameters(variables))


def benchmark_peer(mode: str, batch: int, size: int, steps: int, dtype: str) -> dict:
  """torchvision Mask R-CNN R101-FPN, same image size, batch and dtype policy."""
  import torch
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  backbone = resnet_fpn_backbone(backbone_name='resnet101', weights=None, trainable_layers=3)
  model = MaskRCNN(backbone, num_classes=2, min_size=size, max_size=size).to(device)
  rng = np.random.default_rng(0)
  images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
  targets = []
  for _ in range(batch):
    n = 8
    xy = rng.uniform(0, size * 0.6, (n, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (n, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32, device=device)
    masks = torch.zeros(n, size, size, dtype=torch.uint8, device=device)
    for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
      masks[j, y0:y1, x0:x1] = 1
    targets.append({'boxes': boxes, 'labels': torch.ones(n, dtype=torch.int64, device=device),
                    'masks': masks})
  use_bf16 = dtype == 'bfloat16'
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

  def run_once():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
      if mode == 'train':
        model.train()
        losses = model(images, targets)
        loss = sum(losses.values())
      else:
        model.eval()
        with torch.no_grad():
          model(images)
        return
    opt.zero_grad()
    loss.backward()
    opt.step()

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()
  run_once(); run_once(); sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    run_once()
  sync()
  step_s = (time.perf_counter() - t0) / steps
  return dict(step_s=step_s, images_per_s=batch / step_s, device=device)


def main(argv):
  del argv
  import jax
  config = _CONFIG.value
  if FLAGS.dtype:
    config.model.dtype = FLAGS.dtype
  batch = FLAGS.batch or config.train.batch_size
  size = FLAGS.image_size or config.input.image_size
  if FLAGS.image_size:
    config.input.image_size = size
  dev = jax.devices()[0]
  r = benchmark_sln(config, FLAGS.mode, batch, size, FLAGS.steps)
  peak = FLAGS.peak_tflops or next(
      (v for k, v in _PEAKS.items() if k.lower() in dev.device_kind.lower()), 0.0)
  images_per_s = batch / r['step_s']
  result = {
      'device': f'{dev.platform}:{dev.device_kind}', 'num_devices': jax.device_count(),
      'mode': FLAGS.mode, 'dtype': config.model.dtype, 'batch': batch, 'image_size': size,
      'glm': bool(config.model.glm.enabled), 'compile_s': round(r['compile_s'], 3),
      'step_ms': round(r['step_s'] * 1e3, 3), 'images_per_s': round(images_per_s, 3),
      'flops_per_image': r['flops'] / batch, 'params': int(r['params']),
      'mfu': (round(r['flops'] / r['step_s'] / (peak * 1e12), 4) if peak and r['flops'] else None),
  }
  if FLAGS.peer:
    try:
      p = benchmark_peer(FLAGS.mode, batch, size, FLAGS.steps, config.model.dtype)
      result['peer'] = 'torchvision MaskRCNN R101-FPN'
      result['peer_images_per_s'] = round(p['images_per_s'], 3)
      result['ratio'] = round(images_per_s / p['images_per_s'], 3)
    except ImportError as err:
      result['peer'] = f'unavailable ({err})'
  line = json.dumps(result)
  print(line, flush=True)
  if FLAGS.output:
    with open(FLAGS.output, 'a') as f:
      f.write(line + '\n')


if __name__ == '__main__':
  app.run(main)
