"""Anchors against a loop transcription of the release and hand values."""

import numpy as np

from sln_jax.ops import anchors


def _loop_anchors(image_size, scales, ratios, strides, anchor_stride):
  out = []
  for scale, stride in zip(scales, strides):
    rows = int(np.ceil(image_size[0] / stride))
    cols = int(np.ceil(image_size[1] / stride))
    for r in range(0, rows, anchor_stride):
      for c in range(0, cols, anchor_stride):
        for ratio in ratios:
          h, w = scale / np.sqrt(ratio), scale * np.sqrt(ratio)
          cy, cx = r * stride, c * stride
          out.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
  return np.asarray(out, np.float32)


def test_matches_loop_transcription():
  args = ((128, 192), (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
  for stride in (1, 2):
    got = anchors.generate_anchors(*args, anchor_stride=stride)
    want = _loop_anchors(*args, stride)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(got) == anchors.num_anchors(args[0], 3, args[3], stride)


def test_hand_values():
  a = anchors.generate_anchors((64, 64), (32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
  # P2 is 16x16 cells, 3 ratios.
  assert len(a) == 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)
  s = np.sqrt(2.0)
  # First cell, ratio 0.5 (tall: h = 32 * sqrt 2, w = 32 / sqrt 2), centre 0.
  np.testing.assert_allclose(a[0], [-16 * s, -16 / s, 16 * s, 16 / s], rtol=1e-6)
  np.testing.assert_allclose(a[1], [-16, -16, 16, 16])
  # Second column of P2: centre x = 4 (no half-stride offset).
  np.testing.assert_allclose(a[4], [-16, -12, 16, 20])
  # Second row of P2 starts after 16 columns.
  np.testing.assert_allclose(a[16 * 3 + 1], [-12, -16, 20, 16])
  # P6 anchor (last), ratio 2: wide 512 * sqrt 2 by 512 / sqrt 2, centre 0.
  np.testing.assert_allclose(a[-1], [-256 / s, -256 * s, 256 / s, 256 * s], rtol=1e-6)


def test_non_multiple_canvas_rounds_cells_up():
  """Cells per level are ceil(size / stride) (Matterport
  compute_backbone_shapes; TF-SAME strided convs): 100x130 has 25x33 P2 cells."""
  args = ((100, 130), (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
  assert anchors.feature_shapes(args[0], args[3]) == ((25, 33), (13, 17), (7, 9), (4, 5), (2, 3))
  got = anchors.generate_anchors(*args)
  assert len(got) == 3 * (25 * 33 + 13 * 17 + 7 * 9 + 4 * 5 + 2 * 3)
  assert len(got) == anchors.num_anchors(args[0], 3, args[3])
  np.testing.assert_allclose(got, _loop_anchors(*args, 1), rtol=1e-6)
  # Last P2 cell: centre (24 * 4, 32 * 4), ratio 2.
  s = np.sqrt(2.0)
  np.testing.assert_allclose(
      got[3 * 25 * 33 - 1], [96 - 16 / s, 128 - 16 * s, 96 + 16 / s, 128 + 16 * s], rtol=1e-6
  )
