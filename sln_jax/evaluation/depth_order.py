"""Depth order of an image's instances as a directed acyclic graph (numpy).

Pairwise evidence (pixels where one instance hides or is drawn over another)
can be contradictory: A over B, B over C, C over A. ``acyclic_relations``
keeps the strongest consistent subset, and ``chain_depth`` turns it into a
depth rank per instance. The ground-truth readers (KINS: visible over
hidden pixels) and the predictions (``sln_jax.evaluation.results``: pixel
votes of the layer maps) share this rule.
"""

import numpy as np


def acyclic_relations(weight: np.ndarray) -> np.ndarray:
  """(N, N) evidence -> (N, N) bool relations that form a DAG.

  ``weight[a, b] > 0``: evidence that a is in front of b (both directions of
  a pair may have some). Relations are taken by decreasing weight (ties:
  smaller a, then smaller b), and one is dropped when b is already in front
  of a through the relations taken, so a cycle loses its weakest link and
  nothing else. Relations of an acyclic input are all kept.
  """
  weight = np.asarray(weight)
  n = weight.shape[0]
  front, back = np.nonzero(weight > 0)
  first = np.lexsort((back, front, -weight[front, back]))
  reach = np.eye(n, dtype=bool)  # reach[a, b]: a in front of b through kept relations
  kept = np.zeros((n, n), bool)
  for e in first:
    a, b = front[e], back[e]
    if reach[b, a]:
      continue
    kept[a, b] = True
    if not reach[a, b]:
      reach[reach[:, a]] |= reach[b]
  return kept


def chain_depth(kept: np.ndarray) -> np.ndarray:
  """(N, N) bool DAG (``kept[a, b]``: a in front of b) -> (N,) int64 depth:
  the length of the longest chain in front of each instance (0 = nothing in
  front), so depth[b] >= depth[a] + 1 for every relation."""
  kept = np.asarray(kept, bool)
  n = kept.shape[0]
  depth = np.zeros(n, np.int64)
  for _ in range(n):  # a DAG settles within N - 1 rounds
    new = np.maximum(depth, np.where(kept, depth[:, None] + 1, 0).max(axis=0, initial=0))
    if np.array_equal(new, depth):
      break
    depth = new
  return depth
