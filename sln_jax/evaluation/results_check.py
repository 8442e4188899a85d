"""Validation of COCO-style results files before they are scored.

Every mask field (``amodal_mask``, ``segmentation``, ``visible_mask``) is COCO
RLE (``counts`` str/bytes or an uncompressed list) or a polygon, sized as its
image; a bad one is one UserError naming the file, the result's index and the
field. Compressed RLE strings are decoded in bulk to check that their runs
cover the image exactly.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from sln_jax.errors import UserError


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
  sid = np.repeat(np.arange(n), lens)  # string of each char
  bad_char = np.bincount(sid, (c < 0) | (c > 63), n) > 0
  last = np.cumsum(lens) - 1
  more = (c & 0x20) != 0
  truncated = np.zeros(n, bool)
  truncated[lens > 0] = more[last[lens > 0]]
  ends = ~more
  ends[last[lens > 0]] = True  # no value spans two strings
  end_at = np.flatnonzero(ends)
  starts = np.concatenate([[0], end_at[:-1] + 1])
  gid = np.cumsum(ends) - ends  # value of each char
  k = np.arange(c.size) - starts[gid]
  x = np.add.reduceat((c & 0x1F) << (5 * k), starts) if c.size else np.zeros(0, np.int64)
  neg = (c[end_at] & 0x10) != 0
  x[neg] -= np.left_shift(1, 5 * (k[end_at][neg] + 1))
  owner = sid[end_at]  # string of each value
  count = np.bincount(owner, minlength=n)
  first = np.concatenate([[0], np.cumsum(count)[:-1]])
  j = np.arange(x.size) - first[owner]  # run index in its string
  # Per parity of j, a running sum (run 0 left out) minus its value before
  # the string's first run.
  runs = x.copy()
  before = first[owner] - 1  # last value of the previous string
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


def rle_totals(counts: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """:func:`rle_counts` of many strings at once, reduced to what the checks
  need: per string, the sum of its runs, whether none is negative, and
  whether it is well formed.

  One vectorised pass over the concatenated strings: a call per string
  would pay numpy's per-call overhead for every mask, and results hold two
  masks per detection. A malformed string (outside the alphabet,
  truncated, not ASCII) is not well formed and its sum and sign are
  meaningless: :func:`rle_counts` says what is wrong with it. (A well-formed
  string may have any sum, negative ones included.)
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
  return total, nonneg, ~(bad_char | truncated | ~ascii_ok)


def _check_runs(runs, h: int, w: int, path: str, field: str) -> None:
  runs = np.asarray(runs, np.int64)
  _check_cover(int(runs.sum()), bool((runs >= 0).all()), h, w, path, field)


def _check_cover(total: int, nonneg: bool, h: int, w: int, path: str, field: str) -> None:
  if not nonneg or total != h * w:
    raise UserError(f'RLE counts do not cover the {h}x{w} image', path=path, field=field)


_MASK_FIELDS = ('amodal_mask', 'segmentation', 'visible_mask')


_UNCHECKED = (None, True)  # as_rle's totals for check_counts=False


def _string_rle_totals(results: Sequence, chunk_chars: int = 1 << 16) -> dict:
  """{(result index, field): (sum of runs, no run negative)} of every mask
  of ``results`` given as a compressed RLE string (:func:`rle_totals`, on
  chunks of about ``chunk_chars`` characters, so that its arrays stay in
  the CPU cache); malformed strings are left out."""
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
      total, nonneg, good = rle_totals(counts[start : i + 1])
      out.update(
          (key, (t, ok))
          for key, t, ok, g in zip(where[start : i + 1], total.tolist(), nonneg.tolist(), good)
          if g
      )
      start, chars = i + 1, 0
  return out


def as_rle(
    seg: Any, h: int, w: int, path: str, field: str, totals: Optional[tuple[int, bool]] = None
) -> dict:
  """Any COCO mask encoding -> compressed RLE of size (h, w).

  ``totals``: this mask's entry of :func:`_string_rle_totals` when known
  (None: not known, or malformed: the string is decoded alone);
  ``_UNCHECKED``: a string's runs are not checked (``check_counts=False``).
  """
  if isinstance(seg, dict) and 'counts' in seg and 'size' in seg:
    size = seg['size']
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)
    ):
      raise UserError(
          f'mask size must be [height, width] integers, got ' f'{size!r}',
          path=path,
          field=field + '.size',
      )
    if [int(s) for s in size] != [h, w]:
      raise UserError(
          f'mask size {list(seg["size"])} != image size {[h, w]}', path=path, field=field
      )
    if isinstance(seg['counts'], list):
      if not all(isinstance(v, numbers.Integral) for v in seg['counts']):
        raise UserError('RLE counts must be integers', path=path, field=field)
      _check_runs(seg['counts'], h, w, path, field)
      return mask_utils.frPyObjects(seg, h, w)
    if isinstance(seg['counts'], (str, bytes)):
      if totals is _UNCHECKED:
        return {'size': [h, w], 'counts': seg['counts']}
      if totals is not None:
        _check_cover(totals[0], totals[1], h, w, path, field)
        return {'size': [h, w], 'counts': seg['counts']}
      try:
        runs = rle_counts(seg['counts'])
      except (ValueError, UnicodeEncodeError) as err:
        raise UserError(f'malformed RLE counts ({err})', path=path, field=field) from None
      _check_runs(runs, h, w, path, field)
      return {'size': [h, w], 'counts': seg['counts']}
  elif isinstance(seg, list) and seg:
    polys = seg if isinstance(seg[0], list) else [seg]
    if all(
        isinstance(p, list)
        and len(p) >= 6
        and len(p) % 2 == 0
        and all(isinstance(v, numbers.Real) for v in p)
        for p in polys
    ):
      return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
  raise UserError('not a COCO mask (RLE {size, counts} or polygon list)', path=path, field=field)


class CheckedResults(list):
  """What :func:`check_results` returns: the checked detections, and the
  ground truth image sizes they were checked against (``sizes``)."""

  def __init__(self, items, sizes: Mapping[int, tuple[int, int]]):
    super().__init__(items)
    self.sizes = dict(sizes)


def check_results(
    results: Any, gt: Sequence, path: str = 'results', *, check_counts: bool = True
) -> CheckedResults:
  """Validates a results list and returns it with masks as compressed RLE.

  Each returned dict carries ``image_id``, ``score``, ``category_id``,
  ``amodal`` (RLE), ``visible`` (RLE or None) and the original ``depth_layer``
  when present. Raises ``UserError`` naming ``path`` and the offending field.
  ``metrics.evaluate``, ``metrics.per_class_ap`` and
  ``occlusion.depth_order_accuracy`` take either; results already checked
  against the same images are not checked again (pass the checked list to
  score one result set several ways). ``check_counts=False`` skips decoding
  the compressed RLE strings to check that their runs cover the image (the
  costly part of the check on large images): only for results this library
  encoded itself (``results.detections_to_results``).
  """
  sizes = {int(a.image_id): (int(a.height), int(a.width)) for a in gt}
  if isinstance(results, CheckedResults):
    if results.sizes != sizes:  # checked against other images: do these hold them?
      for k, d in enumerate(results):
        if sizes.get(d['image_id']) != tuple(d['amodal']['size']):
          raise UserError(
              f'image id {d["image_id"]} is not in the ground truth '
              f'(or has another size there)',
              path=path,
              field=f'[{k}].image_id',
          )
    return CheckedResults(results, sizes)
  if not isinstance(results, list):
    raise UserError(
        f'expected a JSON list of detections, got ' f'{type(results).__name__}', path=path
    )
  has_visible = any(isinstance(r, dict) and 'visible_mask' in r for r in results)
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
    if (
        not isinstance(image_id, numbers.Integral)
        or isinstance(image_id, bool)
        or int(image_id) not in sizes
    ):
      raise UserError(
          f'image id {image_id!r} is not in the ground truth', path=path, field=f'{where}.image_id'
      )
    h, w = sizes[int(image_id)]
    key = 'amodal_mask' if 'amodal_mask' in r else 'segmentation'
    if key not in r:
      raise UserError('missing', path=path, field=f'{where}.segmentation')
    score = r.get('score')
    if not isinstance(score, numbers.Real) or not np.isfinite(score):
      raise UserError('missing or not a finite number', path=path, field=f'{where}.score')
    category_id = r.get('category_id', 1)
    if not isinstance(category_id, numbers.Integral):
      raise UserError('not an integer', path=path, field=f'{where}.category_id')
    visible = None
    if has_visible:
      if 'visible_mask' not in r:
        raise UserError(
            'missing (other results carry visible masks)', path=path, field=f'{where}.visible_mask'
        )
      visible = as_rle(
          r['visible_mask'], h, w, path, f'{where}.visible_mask', known(k, 'visible_mask')
      )
    item = {
        'image_id': int(image_id),
        'score': float(score),
        'category_id': int(category_id),
        'amodal': as_rle(r[key], h, w, path, f'{where}.{key}', known(k, key)),
        'visible': visible,
    }
    if 'depth_layer' in r:
      if not isinstance(r['depth_layer'], numbers.Real):
        raise UserError('not a number', path=path, field=f'{where}.depth_layer')
      item['depth_layer'] = r['depth_layer']
    out.append(item)
  return CheckedResults(out, sizes)
