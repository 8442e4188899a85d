"""The evaluation report: a self-contained ``index.html`` with its pictures
beside it.

  report/index.html        metric tables, charts, gallery
  report/pr_amodal.png     precision-recall curves per occlusion subset
  report/pr_visible.png    (when the results carry visible masks)
  report/depth_order.png   right / wrong / undecided pairs
  report/images/<id>.png   ground truth beside prediction, best and worst images

Every number comes from what the evaluation already computed (the
``metrics.evaluate`` table and curves, ``occlusion.occlusion_metrics``);
table cells carry the exact value in ``data-value`` so the page can be
checked against metrics.json. The gallery ranks images by their amodal IoU
(``per_image_amodal_iou``). The report is built in a sibling directory and
moved into place when complete, so a failed run leaves no half-written one.
"""

from __future__ import annotations

import html
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from sln_jax import files
from sln_jax.evaluation import report_figures
from sln_jax.evaluation.occlusion import match_masks
from sln_jax.evaluation.results_check import as_rle
from sln_jax.visualization import pictures

GALLERY_SIZE = 6  # best and worst images each


def per_image_amodal_iou(
    gt: Sequence, dets: Sequence[dict], score_threshold: float = 0.5, iou_threshold: float = 0.5
) -> dict[int, dict]:
  """How well each image's objects are found and segmented.

  Args:
    gt: list[records.ImageAnnotation].
    dets: ``results_check.check_results`` items.

  Returns ``{image_id: {'iou', 'objects', 'matched', 'false_positives'}}``
  for the images with ground truth: 'iou' is the mean over the image's
  objects of the amodal IoU with the detection matched to it
  (``occlusion.match_masks`` over the detections with ``score >=
  score_threshold``), 0 for an object left unmatched.
  """
  by_image: dict[int, list] = {}
  for d in dets:
    if d['score'] >= score_threshold:
      by_image.setdefault(int(d['image_id']), []).append(d)
  out = {}
  for ann in gt:
    if not ann.instances:
      continue
    kept = sorted(by_image.get(int(ann.image_id), []), key=lambda d: -d['score'])
    g_rles = [
        as_rle(i.amodal_rle, ann.height, ann.width, 'ground truth', f'image {ann.image_id}')
        for i in ann.instances
    ]
    ious, matched = match_masks([d['amodal'] for d in kept], g_rles, iou_threshold)
    total = sum(float(ious[row, g]) for g, row in matched.items())
    out[int(ann.image_id)] = {
        'iou': total / len(g_rles),
        'objects': len(g_rles),
        'matched': len(matched),
        'false_positives': len(kept) - len(matched),
    }
  return out


def gallery_choice(scores: Mapping[int, dict], size: int) -> tuple[list[int], list[int]]:
  """(best, worst): up to ``size`` image ids each, by 'iou' (ties: lower id
  first), no image in both."""
  ranked = sorted(scores, key=lambda i: (-scores[i]['iou'], i))
  best = ranked[: min(size, (len(ranked) + 1) // 2)]
  rest = [i for i in reversed(ranked) if i not in best]
  return best, rest[:size]


# ------------------------------------------------------------------ HTML
_STYLE = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.name { text-align: left; }
.meta { color: #555; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 16px; }
.gallery figure { margin: 0; width: 520px; }
.gallery img { width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 13px; }
img.chart { max-width: 100%; }
"""


def _fmt(value: Optional[float], percent: bool = True) -> str:
  if value is None or value < 0:
    return '-'
  return f'{100 * value:.1f}' if percent else f'{value:.3f}'


def _cell(key: str, value: Optional[float], percent: bool = True) -> str:
  data = '' if value is None else f' data-value="{float(value)!r}"'
  return f'<td data-metric="{html.escape(key)}"{data}>{_fmt(value, percent)}</td>'


def _percent_table(title: str, label_heads: Sequence[str], names: Sequence[str], rows) -> str:
  """An HTML table of metric values in %: ``rows`` are (labels, key prefix,
  {name: value}); each value cell's data-metric is ``<prefix>/<name>``."""
  out = [f'<h3>{html.escape(title)}</h3><table><tr>']
  out += [f'<th>{html.escape(h)}</th>' for h in list(label_heads) + list(names)]
  out.append('</tr>')
  for labels, prefix, values in rows:
    out.append(
        '<tr>'
        + ''.join(f'<td class="name">{html.escape(str(v))}</td>' for v in labels)
        + ''.join(_cell(f'{prefix}/{n}', values[n]) for n in names)
        + '</tr>'
    )
  out.append('</table>')
  return ''.join(out)


def _metric_tables(metrics: Mapping[str, Any]) -> str:
  """One table per branch: rows (occlusion subset, part)."""
  out = []
  for branch, table in metrics.items():
    names = list(next(iter(next(iter(table.values())).values())))
    rows = [
        ((subset, part), f'{branch}/{subset}/{part}', row)
        for subset, parts in table.items()
        for part, row in parts.items()
    ]
    out.append(_percent_table(f'{branch} masks (%)', ('occlusion', 'part'), names, rows))
  return '\n'.join(out)


def _per_category_tables(per_category: Mapping[str, Mapping[str, Mapping]]) -> str:
  """One table per branch: rows (category id, name)."""
  out = []
  for branch, table in per_category.items():
    if not table:
      continue
    names = [n for n in next(iter(table.values())) if n != 'name']
    rows = [((cid, row['name']), f'{branch}/category/{cid}', row) for cid, row in table.items()]
    title = f'{branch} masks per category (%)'
    out.append(_percent_table(title, ('id', 'category'), names, rows))
  return '\n'.join(out)


def _depth_table(occluded: Mapping[str, Any]) -> str:
  rows = []
  for name, key in (('chained layers', 'depth_order'), ('pixel votes', 'depth_order_votes')):
    d = occluded.get(key)
    if d is None:
      continue
    counts = ''.join(
        f'<td data-metric="{key}/{c}" data-value="{int(d[c])}">{int(d[c])}</td>'
        for c in ('correct', 'wrong', 'undecided', 'pairs')
    )
    things = d.get('things', {})
    rows.append(
        f'<tr><td class="name">{name}</td>'
        + _cell(f'{key}/accuracy', d['accuracy'])
        + counts
        + _cell(f'{key}/things/accuracy', things.get('accuracy'))
        + '</tr>'
    )
  if not rows:
    return '<p>No depth order: the results carry no depth layers or visible masks.</p>'
  return (
      '<table><tr><th>from</th><th>accuracy (%)</th><th>right</th><th>wrong</th>'
      '<th>undecided</th><th>pairs</th><th>things only (%)</th></tr>' + '\n'.join(rows) + '</table>'
  )


def _mask_table(masks: Mapping[str, Any]) -> str:
  hidden = masks.get('hidden_pixels', {})
  return (
      '<table><tr><th>matched</th><th>amodal mIoU</th><th>visible mIoU</th>'
      '<th>occluded-part mIoU</th><th>objects hiding '
      f'\u2265 {int(masks["min_occluded_px"])} px</th>'
      '<th>hidden px predicted visible</th><th>occluded</th><th>absent</th></tr><tr>'
      f'<td data-metric="masks/matched" data-value="{int(masks["matched"])}">'
      f'{int(masks["matched"])}</td>'
      + _cell('masks/amodal_miou', masks['amodal_miou'], False)
      + _cell('masks/visible_miou', masks['visible_miou'], False)
      + _cell('masks/occluded_miou', masks['occluded_miou'], False)
      + f'<td data-metric="masks/occluded" data-value="{int(masks["occluded"])}">'
      f'{int(masks["occluded"])}</td>'
      + ''.join(
          _cell(f'masks/hidden_pixels/{k}', hidden.get(k), False)
          for k in ('visible', 'occluded', 'absent')
      )
      + '</tr></table>'
  )


def _gallery(title: str, ids: Sequence[int], scores: Mapping[int, dict], links: Mapping) -> str:
  figs = []
  for i in ids:
    s = scores[i]
    text = (
        f'image {i}: amodal IoU {s["iou"]:.3f}, {s["matched"]} of {s["objects"]} objects '
        f'matched, {s["false_positives"]} false positives'
    )
    link = links.get(i)
    picture = (
        f'<a href="{link}"><img src="{link}" alt="image {i}"></a>'
        if link
        else '<p>(no picture: the image file was not found)</p>'
    )
    figs.append(
        f'<figure data-image-id="{i}" data-iou="{s["iou"]!r}">{picture}'
        f'<figcaption>{html.escape(text)}</figcaption></figure>'
    )
  return f'<h3>{html.escape(title)}</h3><div class="gallery">' + '\n'.join(figs) + '</div>'


def write_report(
    out_dir: str,
    gt: Sequence,
    dets: Sequence[dict],
    metrics: Mapping[str, Any],
    curves: Mapping[str, Any],
    occluded: Mapping[str, Any],
    *,
    images_dir: Optional[str] = None,
    score_threshold: float = 0.5,
    gallery_size: int = GALLERY_SIZE,
    title: str = 'SLN evaluation',
    details: Sequence[str] = (),
    per_category: Optional[Mapping[str, Any]] = None,
) -> str:
  """Writes the report into ``out_dir`` (replacing one there); returns the
  path of its index.html.

  Args:
    gt: the scored ground truth, list[records.ImageAnnotation].
    dets: the scored results, ``results_check.check_results`` items.
    metrics, curves: ``metrics.evaluate``'s table and its ``curves``.
    occluded: ``occlusion.occlusion_metrics``'s report.
    images_dir: where the annotations' ``file_name``s are; None: the gallery
      has no pictures.
    details: lines shown under the title (run, checkpoint, protocol).
    per_category: ``metrics.evaluate``'s per-category table (class-aware
      evaluation), shown after the class-averaged tables.
  """
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, 'images'))
  charts = []
  for branch in curves:
    name = f'pr_{branch}.png'
    report_figures.precision_recall_figure(
        curves[branch], f'{branch} masks: precision and recall', os.path.join(tmp, name)
    )
    charts.append(name)
  depth = [occluded.get('depth_order'), occluded.get('depth_order_votes')]
  if any(d is not None for d in depth):
    report_figures.depth_order_figure(*depth, os.path.join(tmp, 'depth_order.png'))

  scores = per_image_amodal_iou(gt, dets, score_threshold)
  best, worst = gallery_choice(scores, gallery_size)
  links = _draw_gallery(tmp, gt, dets, best + worst, images_dir, score_threshold)

  body = [
      f'<h1>{html.escape(title)}</h1>',
      ''.join(f'<p class="meta">{html.escape(line)}</p>' for line in details),
      f'<p class="meta">{len(gt)} images, {len(dets)} detections; pictures and mask '
      f'quality use detections with score \u2265 {score_threshold:.2f}, matched to '
      'ground truth at amodal IoU \u2265 0.5.</p>',
      '<h2>Mask AP and AR</h2>',
      _metric_tables(metrics),
      _per_category_tables(per_category or {}),
      '<h2>Precision and recall by occlusion</h2>',
      ''.join(f'<p><img class="chart" src="{c}" alt="{c}"></p>' for c in charts),
      '<h2>Depth order</h2>',
      _depth_table(occluded),
  ]
  if any(d is not None for d in depth):
    body.append('<p><img class="chart" src="depth_order.png" alt="depth order"></p>')
  body += [
      '<h2>Masks of matched detections</h2>',
      _mask_table(occluded['masks']),
      '<h2>Images</h2>',
      '<p class="meta">Ranked by amodal IoU: the mean over an image\'s objects of the IoU with '
      'the detection matched to it, 0 for a missed object.</p>',
      _gallery('Best', best, scores, links),
      _gallery('Worst', worst, scores, links),
  ]
  page = (
      '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
      f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n'
      + '\n'.join(body)
      + '\n</body></html>\n'
  )
  with open(os.path.join(tmp, 'index.html'), 'w', encoding='utf-8') as f:
    f.write(page)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return os.path.join(out_dir, 'index.html')


def _draw_gallery(
    tmp: str,
    gt: Sequence,
    dets: Sequence[dict],
    ids: Sequence[int],
    images_dir: Optional[str],
    score_threshold: float,
) -> dict[int, str]:
  """Draws ``comparison_picture`` of each image in ``ids`` into
  ``tmp/images/<id>.png``; returns {image id: relative link} for those whose
  image file exists."""
  if images_dir is None:
    return {}
  by_id = {int(a.image_id): a for a in gt}
  wanted = set(ids)
  results = {i: [] for i in wanted}
  for d in dets:
    if int(d['image_id']) in wanted:
      results[int(d['image_id'])].append(d)
  links = {}
  for i in tqdm(ids, desc='report pictures', unit='image', disable=len(ids) < 4):
    ann = by_id[i]
    path = os.path.join(images_dir, ann.file_name)
    if not os.path.isfile(path):
      continue
    with Image.open(path) as im:
      image = np.asarray(im.convert('RGB'))
    picture = pictures.comparison_picture(image, ann, results[i], score_threshold)
    link = f'images/{i}.png'
    with files.atomic_output_file(os.path.join(tmp, link), 'wb') as f:
      pictures.save_png(picture, f)
    links[i] = link
  return links
