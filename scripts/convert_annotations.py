"""Converts COCOA / D2SA / KINS annotations to the release's layer files.

  python scripts/convert_annotations.py --format {cocoa,cocoa_cls,d2sa,kins} \
      --annotations A.json --images DIR --out DIR

Writes one ``<image stem>.npz`` (array ``layer``, uint64 (H, W)) per image
with instances, byte-compatible with the original release's files. ``--out``
may be the images directory (the release keeps each ``.npz`` beside its
image): layer files of the same name are replaced, every other file in
``--out`` is kept. All layers are written to a temporary folder inside
``--out`` first and moved in only when every one succeeded; on bad input the
script prints one line naming the file and the field and exits 2.
"""

from __future__ import annotations

import argparse
import os

from tqdm import tqdm

from input_pipeline import legacy_layers, readers
from sln_jax import cli, errors, files


def parse_args(argv=None) -> argparse.Namespace:
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--format', required=True, choices=readers.FILE_FORMATS)
  parser.add_argument('--annotations', required=True, help='annotation json')
  parser.add_argument('--images', required=True, help='images directory')
  parser.add_argument('--out', required=True, help='output directory')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not os.path.isdir(args.images):
    raise errors.UserError('images directory not found', path=args.images, field='--images')
  stats = readers.ReadStats()
  anns = readers.load_annotations(args.format, args.annotations, args.images, stats=stats)
  stems = {}
  for ann in anns:  # refuse before writing anything
    legacy_layers.check_capacity(ann, args.annotations)
    stem = os.path.splitext(os.path.basename(ann.file_name))[0]
    if stem in stems:
      raise errors.UserError(
          f'images {stems[stem]} and {ann.file_name} share the output name ' f'{stem}.npz',
          path=args.annotations,
          field='images.file_name',
      )
    stems[stem] = ann.file_name
  with files.atomic_files_into(args.out) as tmp:
    for ann in tqdm(anns, desc='layers', unit='image'):
      stem = os.path.splitext(os.path.basename(ann.file_name))[0]
      legacy_layers.write_legacy_layers(
          os.path.join(tmp, stem + '.npz'), ann, source=args.annotations
      )
  print(
      f'wrote {len(anns)} layer files ({stats.num_instances} instances) to '
      f'{args.out}; skipped {stats.skipped_empty} images with no instances'
  )
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
