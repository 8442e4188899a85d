"""Amodal instance segmentation metrics (the amodalAPI protocol on COCO's matching).

Scores COCO-style results against ``records.ImageAnnotation`` ground truth.
Matching is COCO's: mask IoU, thresholds 0.50:0.05:0.95, 101 recall points,
area range "all", greedy by score. On top of COCO:

  * occlusion subsets by GT ``occlude_rate``, both ends inclusive as in the
    amodalAPI (a GT is ignored iff ``rate < lo or rate > hi``), so 1e-5 and
    0.25 belong to both neighbouring subsets;
  * thing/stuff parts by GT ``is_stuff``.

GT outside the evaluated subset/part is *ignored*: it is never a miss, and a
detection matched to it is neither a true nor a false positive (COCOeval's
``ignore`` flag, set after ``_prepare``, which would otherwise overwrite it
with ``iscrowd``; ``iscrowd`` stays 0, so IoU is plain IoU).

Protocols: ``'coco'`` (default) counts the GT of images without detections as
misses and detections on images without GT as false positives.
``'amodalapi'`` reproduces the original evaluator, which drops every image
that has no detections or no GT (per category when categories are used). The
original's slicing bug that also drops the last image is *not* reproduced.

Result fields: ``image_id``, ``score``, ``segmentation`` (amodal mask; an
``amodal_mask`` field takes precedence), optional ``visible_mask``,
``category_id`` (default 1), ``depth_layer`` (lower = in front). Masks are COCO
RLE (``counts`` str/bytes or uncompressed list) or polygons, in original image
pixels. Every scoring function here validates the results first
(``results_check.check_results``; a ``CheckedResults`` list is taken as it
is). pycocotools reads and encodes the masks; faster-coco-eval (pycocotools'
``evaluateImg`` and ``accumulate`` in C++, the same numbers; the tests compare
them with pycocotools' COCOeval) matches and accumulates.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Mapping, Optional, Sequence

from faster_coco_eval import COCOeval_faster, faster_eval_api_cpp
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sln_jax.errors import UserError
from sln_jax.evaluation.results_check import as_rle, check_results

# GT occlude_rate ranges, inclusive at both ends (amodalAPI Params.occRng).
SUBSETS = {
    'all': (0.0, 1000.0),
    'none': (0.0, 1e-5),
    'partial': (1e-5, 0.25),
    'heavy': (0.25, 1.0),
}


PARTS = ('both', 'things', 'stuff')


PROTOCOLS = ('coco', 'amodalapi')


_AREA_ALL = [0.0, 1e10]


def metric_names(max_dets: Sequence[int] = (1, 10, 100)) -> list[str]:
  """['AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100'] for the default max_dets."""
  return ['AP', 'AP50', 'AP75'] + [f'AR{m}' for m in sorted(max_dets)]


# --------------------------------------------------------------- COCO objects
def _quiet_coco(dataset: dict) -> COCO:
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _gt_coco(
    gt: Sequence, mask_key: str, category_agnostic: bool, categories: Optional[Sequence[int]] = None
) -> COCO:
  """COCO ground truth of ``gt``; its categories are ``categories`` (the
  annotation file's ids) when given and not category-agnostic, else the ids
  the instances carry."""
  images, anns, cats = [], [], set()
  for a in gt:
    images.append(
        {
            'id': int(a.image_id),
            'height': int(a.height),
            'width': int(a.width),
            'file_name': a.file_name,
        }
    )
    for inst in a.instances:
      rle = as_rle(
          getattr(inst, mask_key),
          int(a.height),
          int(a.width),
          'ground truth',
          f'image {a.image_id}.{mask_key}',
      )
      cat = 1 if category_agnostic else int(inst.category_id)
      cats.add(cat)
      anns.append(
          {
              'id': len(anns) + 1,
              'image_id': int(a.image_id),
              'category_id': cat,
              'segmentation': rle,
              'area': float(mask_utils.area(rle)),
              'bbox': mask_utils.toBbox(rle).tolist(),
              'iscrowd': 0,
              'occlude_rate': float(inst.occlude_rate),
              'is_stuff': bool(inst.is_stuff),
          }
      )
  if category_agnostic:
    cats.add(1)
  elif categories is not None:
    cats = set(int(c) for c in categories)
  return _quiet_coco(
      {'images': images, 'annotations': anns, 'categories': [{'id': c} for c in sorted(cats)]}
  )


def _dt_coco(gt_coco: COCO, dets: Sequence[dict], mask_key: str, category_agnostic: bool) -> COCO:
  anns = []
  for d in dets:
    rle = d[mask_key]
    anns.append(
        {
            'id': len(anns) + 1,
            'image_id': d['image_id'],
            'category_id': 1 if category_agnostic else d['category_id'],
            'segmentation': rle,
            'area': float(mask_utils.area(rle)),
            'bbox': mask_utils.toBbox(rle).tolist(),
            'iscrowd': 0,
            'score': d['score'],
        }
    )
  return _quiet_coco(
      {
          'images': gt_coco.dataset['images'],
          'annotations': anns,
          'categories': gt_coco.dataset['categories'],
      }
  )


# --------------------------------------------------------------- evaluator
class _SubsetEval(COCOeval_faster):
  """COCO matching and accumulation with a GT ignore rule and the amodalAPI
  empty-image skip.

  faster-coco-eval's ``COCOeval_faster``: pycocotools' ``evaluateImg`` and
  ``accumulate`` in C++ (the tests compare every number with pycocotools'
  COCOeval). ``run(ignore_fn)`` evaluates with GT ``ignore = ignore_fn(gt)``;
  the annotation index and the IoUs are built by the first call and reused
  by the next ones, which only re-match.
  """

  def __init__(
      self,
      gt_coco: COCO,
      dt_coco: COCO,
      *,
      use_cats: bool,
      max_dets: Sequence[int],
      skip_empty: bool,
  ):
    super().__init__(gt_coco, dt_coco, iouType='segm', print_function=lambda *args, **kwargs: None)
    p = self.params
    p.imgIds = sorted(gt_coco.getImgIds())
    p.catIds = sorted(gt_coco.getCatIds())
    p.useCats = int(use_cats)
    p.maxDets = sorted(int(m) for m in max_dets)
    p.areaRng = [list(_AREA_ALL)]
    p.areaRngLbl = ['all']
    self._skip_empty = skip_empty
    self._ignore_fn: Callable[[dict], bool] = lambda g: False
    self._gt_anns: list = []
    self._evaluated = False

  def _group(self, ann: dict):
    """What the matching pools: (image, category), or the image alone
    when categories are not used."""
    return (ann['image_id'], ann['category_id']) if self.params.useCats else ann['image_id']

  def _prepare(self):
    super()._prepare()  # sets every GT's ignore to its iscrowd
    p = self.params
    self._gt_anns = self.cocoGt.loadAnns(self.cocoGt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds))
    self._apply_ignore()
    if self._skip_empty:  # amodalAPI: no evaluation where GT or detections are missing
      dts = self.cocoDt.loadAnns(self.cocoDt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds))
      both = {self._group(g) for g in self._gt_anns} & {self._group(d) for d in dts}
      for dataset, anns in ((self.gt_dataset, self._gt_anns), (self.dt_dataset, dts)):
        dataset.clean()
        for a in anns:
          if self._group(a) in both:
            dataset.append_ref(a['image_id'], a['category_id'], a)

  def _apply_ignore(self):
    for g in self._gt_anns:
      g['ignore'] = int(bool(self._ignore_fn(g)))

  def run(self, ignore_fn: Callable[[dict], bool]) -> dict:
    """Evaluates and accumulates; returns ``self.eval``."""
    self._ignore_fn = ignore_fn
    if not self._evaluated:
      self.evaluate()  # index, IoUs, matching and accumulation
      self._evaluated = True
    else:
      self._apply_ignore()
      p = self._paramsEval
      cat_ids = p.catIds if p.useCats else [-1]
      ious = [[self.ious[i, c] for c in cat_ids] for i in p.imgIds]
      self.eval = faster_eval_api_cpp.COCOevalEvaluateAccumulate(
          p, ious, self.gt_dataset, self.dt_dataset, p.imgIds, p.catIds, bool(p.useCats)
      )
    return self.eval


def _mean_defined(x: np.ndarray) -> float:
  x = x[x > -1]
  return float(np.mean(x)) if x.size else -1.0


def _summary(ev: dict, params, max_dets: Sequence[int], cats=slice(None)) -> dict:
  """COCOeval.summarize's numbers for area 'all' (as a dict), over the
  category indices ``cats`` (all: COCO's category average)."""
  prec, rec = ev['precision'][:, :, cats], ev['recall'][:, cats]  # (T,R,K,A,M), (T,K,A,M)
  thr = np.asarray(params.iouThrs)
  t50 = np.where(np.isclose(thr, 0.5))[0]
  t75 = np.where(np.isclose(thr, 0.75))[0]
  out = {
      'AP': _mean_defined(prec[:, :, :, 0, -1]),
      'AP50': _mean_defined(prec[t50][:, :, :, 0, -1]),
      'AP75': _mean_defined(prec[t75][:, :, :, 0, -1]),
  }
  for mi, m in enumerate(sorted(max_dets)):
    out[f'AR{m}'] = _mean_defined(rec[:, :, 0, mi])
  return out


def _ignore_rule(subset: str, part: str) -> Callable[[dict], bool]:
  lo, hi = SUBSETS[subset]

  def ignore(g: dict) -> bool:
    rate = g['occlude_rate']
    if rate < lo or rate > hi:
      return True
    if part == 'things':
      return g['is_stuff']
    if part == 'stuff':
      return not g['is_stuff']
    return False

  return ignore


def check_protocol(protocol: str, field: str = 'protocol') -> None:
  """UserError naming ``field`` unless ``protocol`` is one of PROTOCOLS."""
  if protocol not in PROTOCOLS:
    raise UserError(f'unknown protocol {protocol!r}; expected one of ' f'{PROTOCOLS}', field=field)


def _branch(
    gt: Sequence,
    dets: Sequence[dict],
    gt_key: str,
    dt_key: str,
    *,
    protocol: str,
    category_agnostic: bool,
    max_dets: Sequence[int],
    subsets: Sequence[str],
    parts: Sequence[str],
    curves: Optional[dict] = None,
    categories: Optional[Sequence[int]] = None,
    per_category: Optional[dict] = None,
) -> dict:
  """One branch's table; with ``curves`` (a dict) also fills
  ``curves[subset]`` with ``precision_curves`` of part 'both', and with
  ``per_category`` (a dict) ``per_category[category id]`` with the
  ``_summary`` of that category alone (subset 'all', part 'both')."""
  gt_coco = _gt_coco(gt, gt_key, category_agnostic, categories)
  dt_coco = _dt_coco(gt_coco, dets, dt_key, category_agnostic)
  ev = _SubsetEval(
      gt_coco,
      dt_coco,
      use_cats=not category_agnostic,
      max_dets=max_dets,
      skip_empty=protocol == 'amodalapi',
  )
  table: dict = {}
  for subset in subsets:
    table[subset] = {}
    for part in parts:
      result = ev.run(_ignore_rule(subset, part))
      table[subset][part] = _summary(result, ev.params, max_dets)
      if curves is not None and part == 'both':
        curves[subset] = precision_curves(result, ev.params)
      if per_category is not None and subset == 'all' and part == 'both':
        for k, c in enumerate(ev._paramsEval.catIds):  # pylint: disable=protected-access
          per_category[int(c)] = _summary(result, ev.params, max_dets, cats=[k])
  return table


def precision_curves(ev: dict, params) -> dict:
  """COCOeval's precision array as curves: ``{'iou_thresholds': (T,),
  'recall': (R,), 'precision': (T, R)}`` lists, area 'all', the largest
  maxDets, averaged over the categories that define it (-1 where none
  does: no ground truth, or recall never reached)."""
  prec = np.asarray(ev['precision'])[:, :, :, 0, -1]  # (T, R, K)
  defined = prec > -1
  count = defined.sum(axis=-1)
  mean = np.where(count > 0, np.where(defined, prec, 0.0).sum(-1) / np.maximum(count, 1), -1.0)
  return {
      'iou_thresholds': [float(t) for t in params.iouThrs],
      'recall': [float(r) for r in params.recThrs],
      'precision': mean.tolist(),
  }


def evaluate(
    gt: Sequence,
    results: Sequence[dict],
    *,
    protocol: str = 'coco',
    category_agnostic: bool = True,
    max_dets: Sequence[int] = (1, 10, 100),
    subsets: Sequence[str] = tuple(SUBSETS),
    parts: Sequence[str] = PARTS,
    results_path: str = 'results',
    curves: Optional[dict] = None,
    categories: Optional[Sequence[Mapping[str, Any]]] = None,
    per_category: Optional[dict] = None,
) -> dict:
  """Scores ``results`` against ``gt`` (list[ImageAnnotation]).

  Returns ``{"amodal": {SUBSET: {PART: {METRIC: value}}}, "visible": {...}}``
  with METRIC in ``metric_names(max_dets)``, values in [0, 1] and -1 where
  undefined (no GT in the cell). "visible" (GT visible masks vs. result
  ``visible_mask``) is present only when the results carry visible masks.
  AP uses the largest of ``max_dets`` detections per image. With
  ``curves`` (an empty dict), it is filled with ``{BRANCH: {SUBSET:
  precision_curves(...)}}`` of part 'both', from the same evaluation.

  Class-aware (``category_agnostic=False``): COCO's useCats=1, every number
  the mean over categories. ``categories`` ([{'id', 'name'}], the annotation
  file's, ``readers.load_categories``) are the categories scored: one with no
  ground truth is -1 and left out of the means, as in COCO, and a result
  whose ``category_id`` is not among them is a ``UserError`` naming
  ``results_path``, its index and the id. Without ``categories``, the ids
  the ground truth carries. ``per_category`` (an empty dict) is filled with
  ``{BRANCH: {CATEGORY ID (str): {'name', METRIC: value}}}`` for subset
  'all', part 'both'.
  """
  check_protocol(protocol)
  dets = check_results(results, gt, results_path)
  cat_ids = None
  if categories is not None and not category_agnostic:
    cat_ids = [int(c['id']) for c in categories]
    check_categories(dets, cat_ids, results_path)
  kw = dict(
      protocol=protocol,
      category_agnostic=category_agnostic,
      max_dets=max_dets,
      subsets=subsets,
      parts=parts,
  )
  branches = [('amodal', 'amodal_rle')]
  if any(d['visible'] is not None for d in dets):
    branches.append(('visible', 'visible_rle'))
  out = {}
  names = {int(c['id']): str(c.get('name', c['id'])) for c in categories or ()}
  for branch, gt_key in branches:
    branch_curves = None if curves is None else curves.setdefault(branch, {})
    by_cat = None if per_category is None or category_agnostic else {}
    out[branch] = _branch(
        gt,
        dets,
        gt_key,
        branch,
        curves=branch_curves,
        categories=cat_ids,
        per_category=by_cat,
        **kw,
    )
    if by_cat is not None:
      per_category[branch] = {
          str(c): {'name': names.get(c, str(c)), **row} for c, row in sorted(by_cat.items())
      }
  return out


def check_categories(dets: Sequence[dict], cat_ids: Sequence[int], results_path: str) -> None:
  """UserError naming ``results_path``, the result's index and its id for
  the first result whose ``category_id`` is not in ``cat_ids``."""
  known = set(int(c) for c in cat_ids)
  for k, d in enumerate(dets):
    if int(d['category_id']) not in known:
      raise UserError(
          f'category_id {d["category_id"]} is not among the annotation file\'s '
          f'{len(known)} categories (ids {sorted(known)})',
          path=results_path,
          field=f'[{k}].category_id',
      )


def format_per_category(per_category: Mapping[str, Mapping[str, Mapping]]) -> str:
  """A fixed-width table of ``evaluate``'s ``per_category`` (values in %;
  '-' where a category has no ground truth)."""
  lines = []
  for branch, rows in per_category.items():
    if not rows:
      continue
    names = [n for n in next(iter(rows.values())) if n != 'name']
    lines.append(f'{branch} masks per category (%)')
    lines.append(f'{"id":>4}  {"category":<18}' + ''.join(f'{n:>8}' for n in names))
    for cid, row in rows.items():
      vals = ''.join(f'{"-":>8}' if row[n] < 0 else f'{100 * row[n]:>8.1f}' for n in names)
      lines.append(f'{cid:>4}  {row["name"][:18]:<18}{vals}')
    lines.append('')
  return '\n'.join(lines).rstrip() + '\n' if lines else ''


def per_class_ap(
    gt: Sequence,
    results: Sequence[dict],
    *,
    protocol: str = 'coco',
    max_dets: Sequence[int] = (1, 10, 100),
    results_path: str = 'results',
) -> dict[int, float]:
  """Amodal AP per GT category id (useCats=1; subset 'all', part 'both'):
  ``evaluate``'s ``per_category`` AP over the categories the ground truth
  carries; -1 for a category whose AP is undefined. Detections of
  categories absent from the GT are not scored.
  """
  per_category: dict = {}
  evaluate(
      gt,
      results,
      protocol=protocol,
      category_agnostic=False,
      max_dets=max_dets,
      subsets=('all',),
      parts=('both',),
      results_path=results_path,
      per_category=per_category,
  )
  return {int(c): row['AP'] for c, row in per_category['amodal'].items()}


# --------------------------------------------------------------- depth order
# --------------------------------------------------------------- table
def format_table(metrics: Mapping[str, Mapping]) -> str:
  """A readable fixed-width table of an ``evaluate`` result (values in %)."""
  lines = []
  for branch, table in metrics.items():
    first = next(iter(next(iter(table.values())).values()))
    names = list(first)
    lines.append(f'{branch} masks (%)')
    lines.append(f'{"subset":<9}{"part":<8}' + ''.join(f'{n:>8}' for n in names))
    for subset, parts in table.items():
      for part, row in parts.items():
        vals = ''.join(f'{"-":>8}' if row[n] < 0 else f'{100 * row[n]:>8.1f}' for n in names)
        lines.append(f'{subset:<9}{part:<8}{vals}')
    lines.append('')
  return '\n'.join(lines).rstrip() + '\n'
