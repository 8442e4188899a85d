"""Generates the synthetic amodal dataset (COCOA schema and layout).

  python scripts/make_synthetic.py --out data/synthetic --num-train 400 \\
      --num-val 50 --image-size 128 --seed 0

Writes <out>/annotations/COCO_amodal_{train,val}2014.json and
<out>/{train,val}2014/*.png atomically (nothing is left behind on error) and
prints the occlusion statistics as one JSON object per split.
"""

from __future__ import annotations

import argparse
import json
import os

from input_pipeline import synthetic
from sln_jax import cli, errors, files


def _parse(argv=None) -> argparse.Namespace:
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True, help='output dataset directory')
  p.add_argument('--num-train', type=int, default=400)
  p.add_argument('--num-val', type=int, default=50)
  p.add_argument('--image-size', type=int, default=128)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--min-objects', type=int, default=synthetic.SceneParams.min_objects)
  p.add_argument('--max-objects', type=int, default=synthetic.SceneParams.max_objects)
  p.add_argument(
      '--occlusion',
      type=float,
      default=synthetic.SceneParams.occlusion,
      help='probability that an object is placed over another',
  )
  p.add_argument('--stuff-prob', type=float, default=synthetic.SceneParams.stuff_prob)
  p.add_argument('--format', choices=('png', 'jpg'), default='png')
  p.add_argument('--no-overwrite', action='store_true', help='fail if --out exists')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  for flag in ('num_train', 'num_val'):
    if getattr(args, flag) < 0:
      raise errors.UserError(
          f'must be >= 0, got {getattr(args, flag)}', field='--' + flag.replace('_', '-')
      )
  if args.num_train + args.num_val == 0:
    raise errors.UserError('nothing to generate', field='--num-train')
  if args.image_size < 32:
    raise errors.UserError(f'must be >= 32, got {args.image_size}', field='--image-size')
  params = synthetic.SceneParams(
      min_objects=args.min_objects,
      max_objects=args.max_objects,
      occlusion=args.occlusion,
      stuff_prob=args.stuff_prob,
  )
  try:
    params.validate()
  except errors.UserError as err:
    raise errors.UserError(err.message, field='--' + err.field.replace('_', '-')) from None
  if args.no_overwrite and os.path.exists(args.out):
    raise errors.UserError('exists; refusing to overwrite (--no-overwrite)', path=args.out)
  files.check_output_dir(args.out, replaceable=synthetic.looks_generated)
  splits = {k: v for k, v in (('train', args.num_train), ('val', args.num_val)) if v > 0}
  with files.atomic_output_dir(
      args.out, overwrite=not args.no_overwrite, replaceable=synthetic.looks_generated
  ) as tmp:
    stats = synthetic.generate_dataset(
        tmp,
        splits,
        image_size=args.image_size,
        seed=args.seed,
        params=params,
        image_format=args.format,
        progress=True,
    )
  for split, s in stats.items():
    print(json.dumps({'split': split, **s}))
  print(f'wrote {os.path.abspath(args.out)}')
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
