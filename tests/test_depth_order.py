"""Tests for sln_jax/depth_order.py: greedy cycle breaking and chain depth,
against a plain re-statement of the rule."""

import hypothesis
import hypothesis.strategies as st
import numpy as np

from sln_jax.evaluation import depth_order


def test_hand_cases():
  # A chain 0 > 1 > 2 and an unrelated 3: every relation kept.
  w = np.zeros((4, 4))
  w[0, 1] = w[1, 2] = 1
  kept = depth_order.acyclic_relations(w)
  np.testing.assert_array_equal(kept, w > 0)
  np.testing.assert_array_equal(depth_order.chain_depth(kept), [0, 1, 2, 0])
  # Both directions of one pair: the larger overlap wins.
  w = np.array([[0, 3], [10, 0]])
  np.testing.assert_array_equal(depth_order.acyclic_relations(w), [[False, False], [True, False]])
  # Cycle 0 > 1 (10), 1 > 2 (8), 2 > 0 (5): 2 > 0 goes; with 2 > 0 at 8 too,
  # the tie goes to the relation with the smaller front: 1 > 2 is kept.
  w = np.zeros((3, 3))
  w[0, 1], w[1, 2], w[2, 0] = 10, 8, 5
  assert sorted(zip(*np.nonzero(depth_order.acyclic_relations(w)))) == [(0, 1), (1, 2)]
  w[2, 0] = 8
  assert sorted(zip(*np.nonzero(depth_order.acyclic_relations(w)))) == [(0, 1), (1, 2)]
  w[1, 2] = 4  # now 1 > 2 is the weakest link
  assert sorted(zip(*np.nonzero(depth_order.acyclic_relations(w)))) == [(0, 1), (2, 0)]
  np.testing.assert_array_equal(
      depth_order.chain_depth(depth_order.acyclic_relations(w)), [1, 2, 0]
  )
  empty = np.zeros((0, 0))
  assert depth_order.acyclic_relations(empty).shape == (0, 0)
  assert depth_order.chain_depth(empty).shape == (0,)


def _reference(weight):
  """The rule written plainly: relations by (-weight, front, back); keep one
  unless its back already reaches its front (depth-first search); depth =
  longest kept chain in front (memoised recursion)."""
  n = len(weight)
  behind = {a: set() for a in range(n)}

  def reaches(a, b):
    stack, seen = [a], set()
    while stack:
      x = stack.pop()
      if x == b:
        return True
      if x not in seen:
        seen.add(x)
        stack.extend(behind[x])
    return False

  for _, a, b in sorted(
      (-float(weight[a][b]), a, b) for a in range(n) for b in range(n) if weight[a][b] > 0
  ):
    if not reaches(b, a):
      behind[a].add(b)
  memo = {}

  def depth(b):
    if b not in memo:
      memo[b] = max((depth(a) + 1 for a in range(n) if b in behind[a]), default=0)
    return memo[b]

  return {(a, b) for a in range(n) for b in behind[a]}, [depth(b) for b in range(n)]


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.data())
def test_property_matches_the_plain_rule(data):
  """Random evidence (both directions, cycles, ties): the same relations and
  depths as the reference; the kept relations are respected by the depths;
  evidence consistent with a ranking keeps every relation."""
  n = data.draw(st.integers(0, 9))
  weight = np.array(
      data.draw(st.lists(st.integers(-3, 4), min_size=n * n, max_size=n * n)), np.int64
  ).reshape(n, n)
  np.fill_diagonal(weight, 0)
  kept = depth_order.acyclic_relations(weight)
  depth = depth_order.chain_depth(kept)
  want_kept, want_depth = _reference(weight)
  assert set(zip(*map(lambda v: v.tolist(), np.nonzero(kept)))) == want_kept
  assert depth.tolist() == want_depth
  a, b = np.nonzero(kept)
  assert np.all(depth[a] < depth[b]) and depth.max(initial=0) < max(n, 1)
  rank = np.array(data.draw(st.permutations(range(n))), np.int64)
  consistent = np.where(rank[:, None] < rank[None, :], np.abs(weight), 0)
  np.testing.assert_array_equal(depth_order.acyclic_relations(consistent), consistent > 0)
