"""The evaluation report's charts (matplotlib, written as PNG).

Precision-recall curves come from ``metrics.precision_curves`` (COCOeval's
precision array), never from a second matching; the depth-order chart from
``occlusion.depth_order_accuracy``'s counts.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from matplotlib.figure import Figure
import numpy as np

from sln_jax import files

SUBSET_TITLES = {
    'all': 'all objects',
    'none': 'not occluded',
    'partial': 'partly occluded (\u2264 25%)',
    'heavy': 'heavily occluded (> 25%)',
}


def _save(fig: Figure, path: str) -> None:
  with files.atomic_output_file(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=100)


def precision_recall_figure(curves: Mapping[str, Mapping[str, Any]], title: str, path: str) -> None:
  """One panel per occlusion subset of ``curves`` ({SUBSET:
  precision_curves}): precision against recall at IoU 0.50 and 0.75 and
  averaged over IoU 0.50:0.95, each labelled with its AP. Points where COCO
  leaves precision undefined (-1) are not drawn."""
  subsets = [s for s in SUBSET_TITLES if s in curves]
  subsets += [s for s in curves if s not in SUBSET_TITLES]
  fig = Figure(figsize=(4.0 * len(subsets), 3.8), layout='constrained')
  axes = fig.subplots(1, len(subsets), squeeze=False)[0]
  for ax, subset in zip(axes, subsets):
    c = curves[subset]
    thr = np.asarray(c['iou_thresholds'])
    recall = np.asarray(c['recall'])
    prec = np.asarray(c['precision'], np.float64)  # (T, R)
    defined = prec > -1
    lines = []
    for name, rows in (
        ('IoU 0.50', np.isclose(thr, 0.5)),
        ('IoU 0.75', np.isclose(thr, 0.75)),
        ('IoU 0.50:0.95', np.ones_like(thr, bool)),
    ):
      p = prec[rows]
      ok = defined[rows].all(axis=0)
      if not ok.any():
        continue
      y = p[:, ok].mean(axis=0)
      ap = float(p[defined[rows]].mean())
      lines.append(ax.plot(recall[ok], y, label=f'{name}: AP {100 * ap:.1f}')[0])
    ax.set_title(SUBSET_TITLES.get(subset, subset), fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('recall')
    ax.set_ylabel('precision')
    ax.grid(alpha=0.3)
    if lines:
      ax.legend(loc='lower left', fontsize=8)
    else:
      ax.text(0.5, 0.5, 'no ground truth', ha='center', va='center', transform=ax.transAxes)
  fig.suptitle(title)
  _save(fig, path)


def depth_order_figure(
    layers: Optional[Mapping[str, Any]], votes: Optional[Mapping[str, Any]], path: str
) -> None:
  """Stacked bars of right / wrong / undecided ordered pairs for the chained
  layers and the pixel votes (``occlusion.depth_order_accuracy`` results;
  None: not available)."""
  rows = [(n, d) for n, d in (('layers', layers), ('pixel votes', votes)) if d is not None]
  fig = Figure(figsize=(6.5, 0.9 + 0.7 * max(len(rows), 1)), layout='constrained')
  ax = fig.subplots()
  colours = {'correct': '#3a923a', 'wrong': '#c03d3e', 'undecided': '#b0b0b0'}
  for y, (_, d) in enumerate(rows):
    left = 0
    for key, colour in colours.items():
      ax.barh(y, d[key], left=left, color=colour, label=key if y == 0 else None)
      left += d[key]
  ax.set_yticks(range(len(rows)), [n for n, _ in rows])
  ax.set_xlabel('pairs of matched, overlapping objects')
  if rows:
    fig.legend(loc='outside upper right', fontsize=8, ncols=3)
  fig.suptitle('depth order', x=0.02, ha='left')
  _save(fig, path)
