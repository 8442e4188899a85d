"""Predicts with an exported SLN (``sln-export``'s ``.sln`` file), without
the training stack.

  python scripts/predict_exported.py model.sln IMAGE_OR_DIR [...] --out DIR

Writes ``<stem>.json`` (COCO results: amodal ``segmentation``,
``visible_mask``, ``depth_layer``) and ``<stem>.png`` (picture) per image
into DIR, as ``--mode=predict`` does. Imports jax, numpy, PIL and
pycocotools only (``sln_jax/exported.py``). Bad input ends with one line,
exit code 2; an unreadable image is reported and skipped.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
import tqdm

from sln_jax import cli, exported, files
from sln_jax.evaluation import render


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', help='the .sln file')
  parser.add_argument('images', nargs='+', help='image files or directories of images')
  parser.add_argument('--out', required=True, help='output directory')
  args = parser.parse_args(argv)
  model = exported.load(args.model)
  paths = exported.input_images(args.images)
  files.make_dirs(args.out)
  written = 0
  for k, path in enumerate(tqdm.tqdm(paths, desc='predict', unit='image', mininterval=1.0)):
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert('RGB'))
    except Exception as err:  # noqa: BLE001 - any decoder failure: report, go on
      tqdm.tqdm.write(f'skipping {path}: unreadable image ({type(err).__name__}: {err})')
      continue
    model.write_prediction(
        image,
        render.image_id_of(stem, k),
        os.path.join(args.out, stem + '.json'),
        os.path.join(args.out, stem + '.png'),
    )
    written += 1
  print(f'wrote predictions for {written} images to {args.out}', flush=True)
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
