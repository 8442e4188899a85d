"""Scores a COCO-style amodal results file (COCO's rules by default, or amodalAPI's).

  python scripts/evaluate.py --format cocoa --annotations GT.json \
      --results DT.json --output M.json [--protocol coco|amodalapi] [--classes] \
      [--report DIR --images IMAGES]

Writes M.json atomically as {"amodal": {SUBSET: {PART: {METRIC: value}}},
"visible": {...}} (see sln_jax/evaluation/metrics.py) and prints a table:
class-agnostic by default (every object one class, as SLN reports), or with
--classes COCO's class-aware AP averaged over the annotation file's
categories, plus M_per_category.json ({BRANCH: {ID: {"name", METRIC:
value}}}; -1 for a category without ground truth).
--report writes the HTML report into DIR (DIR/index.html: tables,
precision-recall curves, depth order, and the best and worst images drawn
from --images; sln_jax/evaluation/report.py). Bad input ends with one line
naming the file and the field, exit code 2.
"""

from __future__ import annotations

import json
import os

from input_pipeline import readers
from sln_jax import cli, errors, files
from sln_jax.evaluation import metrics as metrics_lib
from sln_jax.evaluation import occlusion, report, results_check


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--format', required=True, choices=readers.FILE_FORMATS)
  parser.add_argument('--annotations', required=True, help='ground-truth JSON')
  parser.add_argument('--results', required=True, help='COCO-style results JSON')
  parser.add_argument('--output', required=True, help='metrics JSON to write')
  parser.add_argument('--protocol', default='coco', choices=metrics_lib.PROTOCOLS)
  parser.add_argument(
      '--classes',
      action='store_true',
      help="class-aware AP (COCO's useCats=1, averaged over the annotation file's categories) "
      'and the per-category table, written to <output stem>_per_category.json',
  )
  parser.add_argument('--images', default=None, help='images directory (needed by --report)')
  parser.add_argument('--report', default=None, metavar='DIR', help='write the HTML report here')
  parser.add_argument(
      '--score',
      type=float,
      default=0.5,
      help="the report's pictures and per-image numbers use detections of this score or more",
  )
  args = parser.parse_args(argv)
  if args.report and not args.images:
    raise errors.UserError('--report draws the images: give --images', field='--images')

  if not os.path.isfile(args.annotations):
    raise errors.UserError('no such file', path=args.annotations)
  # Images without objects stay in: detections on them are false positives.
  gt = readers.load_annotations(args.format, args.annotations, args.images, keep_empty=True)
  results = files.read_json(args.results)
  checked = results_check.check_results(results, gt, args.results)  # once for both scorings
  curves, per_category = {}, {}
  metrics = metrics_lib.evaluate(
      gt,
      checked,
      protocol=args.protocol,
      curves=curves,
      category_agnostic=not args.classes,
      categories=readers.load_categories(args.format, args.annotations) if args.classes else None,
      per_category=per_category,
      results_path=args.results,
  )
  with files.atomic_output_file(args.output) as f:
    json.dump(metrics, f, indent=1)
  print(metrics_lib.format_table(metrics), end='')
  if args.classes:
    per_category_path = os.path.splitext(args.output)[0] + '_per_category.json'
    with files.atomic_output_file(per_category_path) as f:
      json.dump(per_category, f, indent=1)
    print(metrics_lib.format_per_category(per_category), end='')
    print(f'wrote {per_category_path}')
  occluded = occlusion.occlusion_metrics(gt, checked)
  text = occlusion.format_occlusion(occluded) if results else ''
  if text:
    print(text)
  print(f'wrote {args.output}')
  if args.report:
    index = report.write_report(
        args.report,
        gt,
        checked,
        metrics,
        curves,
        occluded,
        images_dir=args.images,
        score_threshold=args.score,
        title=f'Evaluation of {os.path.basename(args.results)}',
        details=[f'ground truth {args.annotations}', f'protocol {args.protocol}'],
        per_category=per_category,
    )
    print(f'wrote {index}')
  return 0


def run() -> None:
  """The console command (pyproject.toml)."""
  cli.run_cli(main)


if __name__ == '__main__':
  run()
