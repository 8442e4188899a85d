"""Milliseconds per image of the exported program against the same model in
process (docs/benchmarks.md, "Exported inference").

  python tools/benchmark_exported.py --config=configs/synthetic.py \\
      --checkpoint WORKDIR --model model.sln [--repeats 50]

Both run ``SLN.infer`` on one preprocessed image (batch 1, the config's
canvas) after a warm-up call that compiles; the median of ``--repeats``
timed calls (each waits for its outputs) is printed as one JSON line.
"""

from __future__ import annotations

import functools
import json
import statistics
import time

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from sln_jax import cli, exported, preprocess
from sln_jax.checkpoints.manager import load_variables
from sln_jax.training.state import create_model
from sln_jax.training.step import make_infer_fn

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'Training workdir.')
flags.DEFINE_string('model', None, 'The exported .sln file.')
flags.DEFINE_integer('repeats', 50, 'Timed calls.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.')


def _median_ms(fn) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - t))
  return statistics.median(times)


def main() -> int:
  config = _CONFIG.value
  model, variables = create_model(config)
  variables, _ = load_variables(config, FLAGS.checkpoint, variables)
  image = np.random.default_rng(0).integers(0, 256, (config.input.image_size,) * 2 + (3,), np.uint8)
  canvas, shape, _, glm = preprocess.preprocess_image(
      image, config.input.image_size, config.input.resize_mode, config.model.glm.image_size
  )
  batch = {'image': canvas[None], 'glm_image': glm[None], 'image_shape': shape[None]}
  infer = jax.jit(make_infer_fn(model))
  loaded = exported.load(FLAGS.model)
  row = {
      'device': jax.devices()[0].device_kind,
      'canvas': config.input.image_size,
      'in_process_ms': round(_median_ms(lambda: infer(variables, batch)), 2),
      'exported_ms': round(_median_ms(lambda: loaded.infer(canvas, glm, shape)), 2),
  }
  print(json.dumps(row))
  return 0


if __name__ == '__main__':
  app.run(
      lambda argv: cli.run_cli(main),
      flags_parser=functools.partial(cli.parse_flags, config_flag=_CONFIG),
  )
