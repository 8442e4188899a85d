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
pixels. pycocotools reads and encodes the masks; faster-coco-eval (pycocotools'
``evaluateImg`` and ``accumulate`` in C++, the same numbers; the tests compare
them with pycocotools' COCOeval) matches and accumulates, about 6x faster on
the 24 tables (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import io
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

from faster_coco_eval import COCOeval_faster
from faster_coco_eval import faster_eval_api_cpp
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sln_jax.cliutil import UserError

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


# --------------------------------------------------------------- validation
def _decode_rle_strings(raw: Sequence[bytes]) -> tuple[np.ndarray, ...]:
  """Run lengths of compressed COCO RLE strings (pycocotools' rleFrString),
  all strings in one vectorised pass.

  6 bits per char (offset 48), 5 value bits, 0x20 = more chars follow, sign
  bit 0x10 in a value's last char, runs from the third on stored as
  differences to the run two before. Returns (runs, owner: the string of
  each run, first: index of each string's first run, count: runs per
  string, bad_char, truncated); the runs of a malformed string are
  meaningless.
  """
  n = len(raw)
  lens = np.fromiter((len(r) for r in raw), np.int64, n)
  c = np.frombuffer(b''.join(raw), np.uint8).astype(np.int64) - 48
  sid = np.repeat(np.arange(n), lens)                     # string of each char
  bad_char = np.bincount(sid, (c < 0) | (c > 63), n) > 0
  last = np.cumsum(lens) - 1
  more = (c & 0x20) != 0
  truncated = np.zeros(n, bool)
  truncated[lens > 0] = more[last[lens > 0]]
  ends = ~more
  ends[last[lens > 0]] = True                             # no value spans two strings
  end_at = np.flatnonzero(ends)
  starts = np.concatenate([[0], end_at[:-1] + 1])
  gid = np.cumsum(ends) - ends                            # value of each char
  k = np.arange(c.size) - starts[gid]
  x = np.add.reduceat((c & 0x1f) << (5 * k), starts) if c.size else np.zeros(0, np.int64)
  neg = (c[end_at] & 0x10) != 0
  x[neg] -= np.left_shift(1, 5 * (k[end_at][neg] + 1))
  owner = sid[end_at]                                     # string of each value
  count = np.bincount(owner, minlength=n)
  first = np.concatenate([[0], np.cumsum(count)[:-1]])
  j = np.arange(x.size) - first[owner]                    # run index in its string
  # Per parity of j, a running sum (run 0 left out) minus its value before
  # the string's first run.
  runs = x.copy()
  before = first[owner] - 1                               # last value of the previous string
  for parity in (0, 1):
    sel = (j % 2 == parity) & (j > 0)
    csum = np.cumsum(np.where(sel, x, 0))
    runs[sel] = csum[sel] - np.where(before[sel] >= 0, csum[np.maximum(before[sel], 0)], 0)
  return runs, owner, first, count, bad_char, truncated


def rle_counts(counts: str | bytes) -> np.ndarray:
  """Run lengths of one compressed COCO RLE string (:func:`_decode_rle_strings`).
  Raises ValueError when malformed (UnicodeEncodeError for non-ASCII text)."""
  raw = counts.encode('ascii') if isinstance(counts, str) else bytes(counts)
  runs, _, _, _, bad_char, truncated = _decode_rle_strings([raw])
  if bad_char[0]:
    raise ValueError('character outside the RLE alphabet')
  if truncated[0]:
    raise ValueError('truncated')
  return runs


def rle_totals(counts: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
  """:func:`rle_counts` of many strings at once, reduced to what the checks
  need: per string, the sum of its runs and whether none is negative.

  One vectorised pass over the concatenated strings (a call per string
  costs ~70 us of numpy overhead; results hold two masks per detection). A
  malformed string (outside the alphabet, truncated, not ASCII) gets sum -1:
  :func:`rle_counts` says what is wrong with it.
  """
  raw, ascii_ok = [], np.ones(len(counts), bool)
  for i, s in enumerate(counts):
    try:
      raw.append(s.encode('ascii') if isinstance(s, str) else bytes(s))
    except UnicodeEncodeError:
      raw.append(b'')
      ascii_ok[i] = False
  runs, _, first, count, bad_char, truncated = _decode_rle_strings(raw)
  has = count > 0
  total = np.zeros(len(raw), np.int64)
  nonneg = np.ones(len(raw), bool)
  if runs.size:
    total[has] = np.add.reduceat(runs, first[has])
    nonneg[has] = np.minimum.reduceat(runs, first[has]) >= 0
  total[bad_char | truncated | ~ascii_ok] = -1
  return total, nonneg


def _check_runs(runs, h: int, w: int, path: str, field: str) -> None:
  runs = np.asarray(runs, np.int64)
  _check_cover(int(runs.sum()), bool((runs >= 0).all()), h, w, path, field)


def _check_cover(total: int, nonneg: bool, h: int, w: int, path: str, field: str) -> None:
  if not nonneg or total != h * w:
    raise UserError(f'RLE counts do not cover the {h}x{w} image', path=path,
                    field=field)


_MASK_FIELDS = ('amodal_mask', 'segmentation', 'visible_mask')

_UNCHECKED = (None, True)   # _as_rle's totals for check_counts=False


def _string_rle_totals(results: Sequence, chunk_chars: int = 1 << 16) -> dict:
  """{(result index, field): (sum of runs, no run negative)} of every mask
  of ``results`` given as a compressed RLE string (:func:`rle_totals`, on
  chunks of about ``chunk_chars`` characters: its arrays then stay in the
  CPU cache, 2-3x faster than one pass over everything); sum -1 when
  malformed."""
  where, counts = [], []
  for k, r in enumerate(results):
    if isinstance(r, dict):
      for key in _MASK_FIELDS:
        seg = r.get(key)
        if isinstance(seg, dict) and isinstance(seg.get('counts'), (str, bytes)):
          where.append((k, key))
          counts.append(seg['counts'])
  out, start, chars = {}, 0, 0
  for i, c in enumerate(counts):
    chars += len(c)
    if chars >= chunk_chars or i == len(counts) - 1:
      total, nonneg = rle_totals(counts[start:i + 1])
      out.update(zip(where[start:i + 1], zip(total.tolist(), nonneg.tolist())))
      start, chars = i + 1, 0
  return out


def _as_rle(seg: Any, h: int, w: int, path: str, field: str,
            totals: Optional[tuple[int, bool]] = None) -> dict:
  """Any COCO mask encoding -> compressed RLE of size (h, w).

  ``totals``: this mask's entry of :func:`_string_rle_totals` when known;
  ``_UNCHECKED``: a string's runs are not checked (``check_counts=False``).
  """
  if isinstance(seg, dict) and 'counts' in seg and 'size' in seg:
    size = seg['size']
    if not (isinstance(size, list) and len(size) == 2 and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool)
        for s in size)):
      raise UserError(f'mask size must be [height, width] integers, got '
                      f'{size!r}', path=path, field=field + '.size')
    if [int(s) for s in size] != [h, w]:
      raise UserError(f'mask size {list(seg["size"])} != image size {[h, w]}',
                      path=path, field=field)
    if isinstance(seg['counts'], list):
      if not all(isinstance(v, numbers.Integral) for v in seg['counts']):
        raise UserError('RLE counts must be integers', path=path, field=field)
      _check_runs(seg['counts'], h, w, path, field)
      return mask_utils.frPyObjects(seg, h, w)
    if isinstance(seg['counts'], (str, bytes)):
      if totals is _UNCHECKED:
        return {'size': [h, w], 'counts': seg['counts']}
      if totals is not None and totals[0] >= 0:
        _check_cover(totals[0], totals[1], h, w, path, field)
        return {'size': [h, w], 'counts': seg['counts']}
      try:
        runs = rle_counts(seg['counts'])
      except (ValueError, UnicodeEncodeError) as err:
        raise UserError(f'malformed RLE counts ({err})', path=path,
                        field=field) from None
      _check_runs(runs, h, w, path, field)
      return {'size': [h, w], 'counts': seg['counts']}
  elif isinstance(seg, list) and seg:
    polys = seg if isinstance(seg[0], list) else [seg]
    if all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and
           all(isinstance(v, numbers.Real) for v in p) for p in polys):
      return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
  raise UserError('not a COCO mask (RLE {size, counts} or polygon list)',
                  path=path, field=field)


class CheckedResults(list):
  """What :func:`check_results` returns: the checked detections, and the
  ground truth image sizes they were checked against (``sizes``)."""

  def __init__(self, items, sizes: Mapping[int, tuple[int, int]]):
    super().__init__(items)
    self.sizes = dict(sizes)


def check_results(results: Any, gt: Sequence, path: str = 'results', *,
                  check_counts: bool = True) -> CheckedResults:
  """Validates a results list and returns it with masks as compressed RLE.

  Each returned dict carries ``image_id``, ``score``, ``category_id``,
  ``amodal`` (RLE), ``visible`` (RLE or None) and the original ``depth_layer``
  when present. Raises ``UserError`` naming ``path`` and the offending field.
  ``evaluate``, ``per_class_ap`` and ``depth_order_accuracy`` take either;
  results already checked against the same images are not checked again
  (pass the checked list to score one result set several ways).
  ``check_counts=False`` skips decoding the compressed RLE strings to check
  that their runs cover the image (most of the time on large images): only
  for results this library encoded itself (``predict.detections_to_results``).
  """
  sizes = {int(a.image_id): (int(a.height), int(a.width)) for a in gt}
  if isinstance(results, CheckedResults):
    if results.sizes != sizes:   # checked against other images: do these hold them?
      for k, d in enumerate(results):
        if sizes.get(d['image_id']) != tuple(d['amodal']['size']):
          raise UserError(f'image id {d["image_id"]} is not in the ground truth '
                          f'(or has another size there)', path=path, field=f'[{k}].image_id')
    return CheckedResults(results, sizes)
  if not isinstance(results, list):
    raise UserError(f'expected a JSON list of detections, got '
                    f'{type(results).__name__}', path=path)
  has_visible = any(isinstance(r, dict) and 'visible_mask' in r
                    for r in results)
  totals = _string_rle_totals(results) if check_counts else None

  def known(k: int, key: str):
    return _UNCHECKED if totals is None else totals.get((k, key))
  out = []
  for k, r in enumerate(results):
    where = f'[{k}]'
    if not isinstance(r, dict):
      raise UserError('expected an object', path=path, field=where)
    if 'image_id' not in r:
      raise UserError('missing', path=path, field=f'{where}.image_id')
    image_id = r['image_id']
    if (not isinstance(image_id, numbers.Integral) or isinstance(image_id, bool)
        or int(image_id) not in sizes):
      raise UserError(f'image id {image_id!r} is not in the ground truth',
                      path=path, field=f'{where}.image_id')
    h, w = sizes[int(image_id)]
    key = 'amodal_mask' if 'amodal_mask' in r else 'segmentation'
    if key not in r:
      raise UserError('missing', path=path, field=f'{where}.segmentation')
    score = r.get('score')
    if not isinstance(score, numbers.Real) or not np.isfinite(score):
      raise UserError('missing or not a finite number', path=path,
                      field=f'{where}.score')
    category_id = r.get('category_id', 1)
    if not isinstance(category_id, numbers.Integral):
      raise UserError('not an integer', path=path, field=f'{where}.category_id')
    visible = None
    if has_visible:
      if 'visible_mask' not in r:
        raise UserError('missing (other results carry visible masks)',
                        path=path, field=f'{where}.visible_mask')
      visible = _as_rle(r['visible_mask'], h, w, path, f'{where}.visible_mask',
                        known(k, 'visible_mask'))
    item = {'image_id': int(image_id), 'score': float(score),
            'category_id': int(category_id),
            'amodal': _as_rle(r[key], h, w, path, f'{where}.{key}', known(k, key)),
            'visible': visible}
    if 'depth_layer' in r:
      if not isinstance(r['depth_layer'], numbers.Real):
        raise UserError('not a number', path=path, field=f'{where}.depth_layer')
      item['depth_layer'] = r['depth_layer']
    out.append(item)
  return CheckedResults(out, sizes)


# --------------------------------------------------------------- COCO objects
def _quiet_coco(dataset: dict) -> COCO:
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _gt_coco(gt: Sequence, mask_key: str, category_agnostic: bool) -> COCO:
  images, anns, cats = [], [], set()
  for a in gt:
    images.append({'id': int(a.image_id), 'height': int(a.height),
                   'width': int(a.width), 'file_name': a.file_name})
    for inst in a.instances:
      rle = _as_rle(getattr(inst, mask_key), int(a.height), int(a.width),
                    'ground truth', f'image {a.image_id}.{mask_key}')
      cat = 1 if category_agnostic else int(inst.category_id)
      cats.add(cat)
      anns.append({
          'id': len(anns) + 1, 'image_id': int(a.image_id), 'category_id': cat,
          'segmentation': rle, 'area': float(mask_utils.area(rle)),
          'bbox': mask_utils.toBbox(rle).tolist(), 'iscrowd': 0,
          'occlude_rate': float(inst.occlude_rate),
          'is_stuff': bool(inst.is_stuff)})
  if category_agnostic:
    cats.add(1)
  return _quiet_coco({'images': images, 'annotations': anns,
                      'categories': [{'id': c} for c in sorted(cats)]})


def _dt_coco(gt_coco: COCO, dets: Sequence[dict], mask_key: str,
             category_agnostic: bool) -> COCO:
  anns = []
  for d in dets:
    rle = d[mask_key]
    anns.append({
        'id': len(anns) + 1, 'image_id': d['image_id'],
        'category_id': 1 if category_agnostic else d['category_id'],
        'segmentation': rle, 'area': float(mask_utils.area(rle)),
        'bbox': mask_utils.toBbox(rle).tolist(), 'iscrowd': 0,
        'score': d['score']})
  return _quiet_coco({'images': gt_coco.dataset['images'], 'annotations': anns,
                      'categories': gt_coco.dataset['categories']})


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

  def __init__(self, gt_coco: COCO, dt_coco: COCO, *, use_cats: bool,
               max_dets: Sequence[int], skip_empty: bool):
    super().__init__(gt_coco, dt_coco, iouType='segm',
                     print_function=lambda *args, **kwargs: None)
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
    super()._prepare()   # sets every GT's ignore to its iscrowd
    p = self.params
    self._gt_anns = self.cocoGt.loadAnns(self.cocoGt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds))
    self._apply_ignore()
    if self._skip_empty:   # amodalAPI: no evaluation where GT or detections are missing
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
      self.evaluate()   # index, IoUs, matching and accumulation
      self._evaluated = True
    else:
      self._apply_ignore()
      p = self._paramsEval
      cat_ids = p.catIds if p.useCats else [-1]
      ious = [[self.ious[i, c] for c in cat_ids] for i in p.imgIds]
      self.eval = faster_eval_api_cpp.COCOevalEvaluateAccumulate(
          p, ious, self.gt_dataset, self.dt_dataset, p.imgIds, p.catIds, bool(p.useCats))
    return self.eval


def _mean_defined(x: np.ndarray) -> float:
  x = x[x > -1]
  return float(np.mean(x)) if x.size else -1.0


def _summary(ev: dict, params, max_dets: Sequence[int]) -> dict:
  """COCOeval.summarize's numbers for area 'all' (as a dict)."""
  prec, rec = ev['precision'], ev['recall']  # (T,R,K,A,M), (T,K,A,M)
  thr = np.asarray(params.iouThrs)
  t50 = np.where(np.isclose(thr, 0.5))[0]
  t75 = np.where(np.isclose(thr, 0.75))[0]
  out = {'AP': _mean_defined(prec[:, :, :, 0, -1]),
         'AP50': _mean_defined(prec[t50][:, :, :, 0, -1]),
         'AP75': _mean_defined(prec[t75][:, :, :, 0, -1])}
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
    raise UserError(f'unknown protocol {protocol!r}; expected one of '
                    f'{PROTOCOLS}',
                    field=field)


def _branch(gt: Sequence, dets: Sequence[dict], gt_key: str, dt_key: str, *,
            protocol: str, category_agnostic: bool, max_dets: Sequence[int],
            subsets: Sequence[str], parts: Sequence[str]) -> dict:
  gt_coco = _gt_coco(gt, gt_key, category_agnostic)
  dt_coco = _dt_coco(gt_coco, dets, dt_key, category_agnostic)
  ev = _SubsetEval(gt_coco, dt_coco, use_cats=not category_agnostic,
                   max_dets=max_dets, skip_empty=protocol == 'amodalapi')
  table: dict = {}
  for subset in subsets:
    table[subset] = {}
    for part in parts:
      result = ev.run(_ignore_rule(subset, part))
      table[subset][part] = _summary(result, ev.params, max_dets)
  return table


def evaluate(gt: Sequence, results: Sequence[dict], *, protocol: str = 'coco',
             category_agnostic: bool = True,
             max_dets: Sequence[int] = (1, 10, 100),
             subsets: Sequence[str] = tuple(SUBSETS),
             parts: Sequence[str] = PARTS,
             results_path: str = 'results') -> dict:
  """Scores ``results`` against ``gt`` (list[ImageAnnotation]).

  Returns ``{"amodal": {SUBSET: {PART: {METRIC: value}}}, "visible": {...}}``
  with METRIC in ``metric_names(max_dets)``, values in [0, 1] and -1 where
  undefined (no GT in the cell). "visible" (GT visible masks vs. result
  ``visible_mask``) is present only when the results carry visible masks.
  AP uses the largest of ``max_dets`` detections per image.
  """
  check_protocol(protocol)
  dets = check_results(results, gt, results_path)
  kw = dict(protocol=protocol, category_agnostic=category_agnostic,
            max_dets=max_dets, subsets=subsets, parts=parts)
  out = {'amodal': _branch(gt, dets, 'amodal_rle', 'amodal', **kw)}
  if any(d['visible'] is not None for d in dets):
    out['visible'] = _branch(gt, dets, 'visible_rle', 'visible', **kw)
  return out


def per_class_ap(gt: Sequence, results: Sequence[dict], *,
                 protocol: str = 'coco', max_dets: Sequence[int] = (1, 10, 100),
                 results_path: str = 'results') -> dict[int, float]:
  """Amodal AP per GT category id (useCats=1; subset 'all', part 'both').

  For D2SA-style data with category ids; -1 for a category whose AP is
  undefined. Detections of categories absent from the GT are not scored.
  """
  check_protocol(protocol)
  dets = check_results(results, gt, results_path)
  gt_coco = _gt_coco(gt, 'amodal_rle', category_agnostic=False)
  dt_coco = _dt_coco(gt_coco, dets, 'amodal', category_agnostic=False)
  ev = _SubsetEval(gt_coco, dt_coco, use_cats=True, max_dets=max_dets,
                   skip_empty=protocol == 'amodalapi')
  result = ev.run(lambda g: False)
  cat_ids = ev._paramsEval.catIds  # pylint: disable=protected-access
  return {int(c): _mean_defined(result['precision'][:, :, k, 0, -1])
          for k, c in enumerate(cat_ids)}


# --------------------------------------------------------------- depth order
def depth_order_accuracy(gt: Sequence, results: Sequence[dict], *,
                         score_threshold: float = 0.5,
                         iou_threshold: float = 0.5,
                         pairwise: Optional[Mapping[int, np.ndarray]] = None,
                         results_path: str = 'results') -> dict:
  """Share of correctly ordered pairs of matched, overlapping objects.

  Per image: detections with ``score >= score_threshold`` are matched greedily
  (highest score first) to the unmatched GT with the highest amodal IoU, if
  that IoU is ``>= iou_threshold``. Every pair of matched detections whose GT
  objects' amodal masks intersect and whose GT ``depth_rank`` differ (lower =
  in front) is scored. The predicted order of detections a, b is, when
  ``pairwise`` is given, ``pairwise[image_id][a, b]`` (+1: a in front of b,
  -1 behind, 0 undecided; a, b index that image's detections in results order),
  otherwise from ``depth_layer`` (lower = in front). Undecided (equal layers,
  0) counts as wrong.

  Returns ``{'accuracy': float (-1 if no pair), 'correct': int, 'wrong':
  int, 'undecided': int, 'pairs': int}`` (correct + wrong + undecided =
  pairs).
  """
  dets = check_results(results, gt, results_path)
  by_image: dict[int, list] = {}
  for k, d in enumerate(dets):
    by_image.setdefault(d['image_id'], []).append((k, d))
  tally = {1: 0, -1: 0, 0: 0}  # right, wrong, undecided
  for ann in gt:
    image_id = int(ann.image_id)
    image_dets = by_image.get(image_id, [])
    if not ann.instances or not image_dets:
      continue
    # Position of each detection among this image's detections (results order).
    local = {k: i for i, (k, _) in enumerate(image_dets)}
    kept = [(k, d) for k, d in image_dets if d['score'] >= score_threshold]
    kept.sort(key=lambda kd: -kd[1]['score'])
    if not kept:
      continue
    g_rles = [_as_rle(i.amodal_rle, ann.height, ann.width, 'ground truth',
                      f'image {image_id}.amodal_rle') for i in ann.instances]
    ious = np.asarray(mask_utils.iou([d['amodal'] for _, d in kept], g_rles,
                                     [0] * len(g_rles))).reshape(len(kept), -1)
    det_of_gt: dict[int, int] = {}
    for row, (k, _) in enumerate(kept):
      cand = [(ious[row, g], g) for g in range(len(g_rles))
              if g not in det_of_gt and ious[row, g] >= iou_threshold]
      if cand:
        det_of_gt[max(cand)[1]] = k
    overlap = np.asarray(mask_utils.iou(g_rles, g_rles, [0] * len(g_rles))
                         ).reshape(len(g_rles), -1) > 0
    matched = sorted(det_of_gt)
    for x, gi in enumerate(matched):
      for gj in matched[x + 1:]:
        ri, rj = ann.instances[gi].depth_rank, ann.instances[gj].depth_rank
        if not overlap[gi, gj] or ri == rj:
          continue
        a, b = det_of_gt[gi], det_of_gt[gj]
        pred = _predicted_order(dets, a, b, local, image_id, pairwise,
                                results_path)
        tally[pred * (1 if ri < rj else -1)] += 1
  pairs = sum(tally.values())
  return {'accuracy': tally[1] / pairs if pairs else -1.0, 'correct': tally[1],
          'wrong': tally[-1], 'undecided': tally[0], 'pairs': pairs}


def format_depth_order(depth: Mapping[str, Any]) -> str:
  """One line for a :func:`depth_order_accuracy` result."""
  if not depth['pairs']:
    return 'depth order: no matched pair of overlapping objects to score'
  return (f"depth order: {depth['correct']}/{depth['pairs']} pairs of matched, "
          f"overlapping objects ordered right, {depth['wrong']} wrong, "
          f"{depth['undecided']} undecided (accuracy {depth['accuracy']:.3f})")


def _predicted_order(dets, a, b, local, image_id, pairwise, path) -> int:
  if pairwise is not None:
    if image_id not in pairwise:
      raise UserError(f'no pairwise order for image {image_id}',
                      field='pairwise')
    return int(np.sign(pairwise[image_id][local[a], local[b]]))
  for k in (a, b):
    if 'depth_layer' not in dets[k]:
      raise UserError('missing (needed for depth order)', path=path,
                      field=f'[{k}].depth_layer')
  la, lb = dets[a]['depth_layer'], dets[b]['depth_layer']
  return int(np.sign(lb - la))


# --------------------------------------------------------------- table
def format_table(metrics: Mapping[str, Mapping]) -> str:
  """A readable fixed-width table of an ``evaluate`` result (values in %)."""
  lines = []
  for branch, table in metrics.items():
    first = next(iter(next(iter(table.values())).values()))
    names = list(first)
    lines.append(f'{branch} masks (%)')
    lines.append(f'{"subset":<9}{"part":<8}'
                 + ''.join(f'{n:>8}' for n in names))
    for subset, parts in table.items():
      for part, row in parts.items():
        vals = ''.join(f'{"-":>8}' if row[n] < 0 else f'{100 * row[n]:>8.1f}'
                       for n in names)
        lines.append(f'{subset:<9}{part:<8}{vals}')
    lines.append('')
  return '\n'.join(lines).rstrip() + '\n'
