"""Draws ground truth and (optionally) predictions of amodal annotations.

  python scripts/visualize.py --format cocoa --annotations GT.json --images DIR \\
      --out vis/ [--results DT.json --score 0.5] [--image-ids 1,7] [--max-images 20]

Writes one ``<image stem>.png`` per image into --out, drawn by
``sln_jax.visualization.pictures``: the image enlarged to 768 pixels or more
on its long side, each object back to front with its visible part filled,
its hidden part hatched in a lighter tone and its amodal outline, tagged with
its depth (0 = front) and score. With --results (COCO-style results JSON, as
main.py's predict/evaluate modes and scripts/evaluate.py use) the ground
truth is on the left and the predictions with score >= --score on the
right: matched pairs share a colour, false positives and missed objects are
dashed and tagged. Without it, the ground truth alone.

Every input is checked before the first picture is written (annotations,
results, that each image file exists with the annotated size); a problem ends
with one line naming the file and the field, exit code 2. Each PNG is
written atomically.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from input_pipeline import readers
from sln_jax import cli, errors, files
from sln_jax.evaluation import results_check
from sln_jax.visualization import pictures


def _parse_ids(text: str) -> list[int]:
  try:
    return [int(t) for t in text.split(',') if t.strip()]
  except ValueError:
    raise errors.UserError(
        f'not a comma-separated list of integers: {text!r}', field='--image-ids'
    ) from None


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--format', required=True, choices=readers.FILE_FORMATS)
  parser.add_argument('--annotations', required=True, help='ground-truth JSON')
  parser.add_argument('--images', required=True, help='images directory')
  parser.add_argument('--out', required=True, help='directory for the PNGs')
  parser.add_argument('--results', default=None, help='COCO-style results JSON (optional)')
  parser.add_argument(
      '--score',
      '--score-threshold',
      dest='score',
      type=float,
      default=0.5,
      help='predictions below this score are not drawn or matched',
  )
  parser.add_argument('--image-ids', default='', help='comma-separated ids (default: all)')
  parser.add_argument('--max-images', type=int, default=0, help='0: no limit')
  args = parser.parse_args(argv)

  gt = readers.load_annotations(args.format, args.annotations, args.images)  # checks the images
  chosen = gt
  if args.image_ids:
    by_id = {a.image_id: a for a in gt}
    ids = _parse_ids(args.image_ids)
    unknown = [i for i in ids if i not in by_id]
    if unknown:
      raise errors.UserError(
          f'image ids {unknown} are not in {args.annotations}', field='--image-ids'
      )
    chosen = [by_id[i] for i in ids]
  if args.max_images > 0:
    chosen = chosen[: args.max_images]

  predictions = None
  if args.results is not None:
    raw = files.read_json(args.results)
    predictions = {a.image_id: [] for a in gt}
    for r in results_check.check_results(raw, gt, path=args.results):
      predictions[r['image_id']].append(r)

  os.makedirs(args.out, exist_ok=True)
  for annotation in tqdm(chosen, desc='visualize', unit='image', disable=len(chosen) < 2):
    path = os.path.join(args.images, annotation.file_name)
    with Image.open(path) as im:
      image = np.asarray(im.convert('RGB'))
    if predictions is None:
      picture = pictures.ground_truth_picture(image, annotation)
    else:
      picture = pictures.comparison_picture(
          image, annotation, predictions[annotation.image_id], args.score
      )
    stem = os.path.splitext(os.path.basename(path))[0]
    with files.atomic_output_file(os.path.join(args.out, stem + '.png'), 'wb') as f:
      pictures.save_png(picture, f)
  print(f'wrote {len(chosen)} pictures to {args.out}')
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
