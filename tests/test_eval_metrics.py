"""DAVIS J and F, OK-VOS / ReasonVOS summaries and ReasonSeg gIoU / cIoU.

Hand-computed values first; then agreement with a straightforward per-frame NumPy /
OpenCV implementation of the DAVIS code on random masks (the reference below is
written from the DAVIS definitions, independently of the module under test).
"""

import math

import cv2
import numpy as np
import pytest

from segresearch_jax.eval import metrics

# ----------------------------------------------------------------------------
# Reference: the DAVIS per-frame definitions, written plainly.
# ----------------------------------------------------------------------------


def ref_seg2bmap(seg: np.ndarray) -> np.ndarray:
  seg = seg.astype(bool)
  e = np.zeros_like(seg)
  s = np.zeros_like(seg)
  se = np.zeros_like(seg)
  e[:, :-1] = seg[:, 1:]
  s[:-1, :] = seg[1:, :]
  se[:-1, :-1] = seg[1:, 1:]
  b = seg ^ e | seg ^ s | seg ^ se
  b[-1, :] = seg[-1, :] ^ e[-1, :]
  b[:, -1] = seg[:, -1] ^ s[:, -1]
  b[-1, -1] = 0
  return b


def ref_disk(radius: int) -> np.ndarray:
  r = np.arange(-radius, radius + 1)
  x, y = np.meshgrid(r, r)
  return (x**2 + y**2 <= radius**2).astype(np.uint8)


def ref_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
  radius = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(gt.shape))
  fb, gb = ref_seg2bmap(pred), ref_seg2bmap(gt)
  kernel = ref_disk(int(radius))
  fd = cv2.dilate(fb.astype(np.uint8), kernel)
  gd = cv2.dilate(gb.astype(np.uint8), kernel)
  n_fg, n_gt = fb.sum(), gb.sum()
  if n_fg == 0 and n_gt > 0:
    p, r = 1, 0
  elif n_fg > 0 and n_gt == 0:
    p, r = 0, 1
  elif n_fg == 0 and n_gt == 0:
    p, r = 1, 1
  else:
    p, r = (fb * gd).sum() / n_fg, (gb * fd).sum() / n_gt
  return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def ref_j(gt: np.ndarray, pred: np.ndarray) -> float:
  union = np.sum(gt | pred)
  return 1.0 if union == 0 else np.sum(gt & pred) / union


def pixel(h: int, w: int, y: int, x: int) -> np.ndarray:
  m = np.zeros((h, w), bool)
  m[y, x] = True
  return m


# ----------------------------------------------------------------------------
# Hand-computed values.
# ----------------------------------------------------------------------------


def test_boundary_radius_is_ceil_of_diagonal_fraction():
  assert metrics.boundary_radius(480, 854) == 8  # 0.008 * 979.6 = 7.84
  assert metrics.boundary_radius(48, 64) == 1  # 0.008 * 80 = 0.64
  assert metrics.boundary_radius(1080, 1920) == 18  # 0.008 * 2202.9 = 17.6
  assert metrics.boundary_radius(10, 10, bound_th=3) == 3
  with pytest.raises(ValueError, match="whole"):
    metrics.boundary_radius(10, 10, bound_th=2.5)
  with pytest.raises(ValueError, match="positive"):
    metrics.boundary_radius(10, 10, bound_th=0)


def test_seg2bmap_of_one_pixel():
  # An interior pixel: itself, left, above and above-left differ from a neighbour.
  b = metrics.seg2bmap(pixel(6, 7, 3, 4))
  assert sorted(zip(*np.nonzero(b))) == [(2, 3), (2, 4), (3, 3), (3, 4)]
  # The bottom-right corner pixel is never a boundary pixel (DAVIS rule); its
  # neighbours to the left, above and above-left are.
  b = metrics.seg2bmap(pixel(4, 5, 3, 4))
  assert sorted(zip(*np.nonzero(b))) == [(2, 3), (2, 4), (3, 3)]
  # A full mask has no boundary at all.
  assert not metrics.seg2bmap(np.ones((4, 5), bool)).any()
  # A one-row image: the only boundary pixel is the mask pixel itself.
  b = metrics.seg2bmap(np.array([[True, False]]))
  assert b.tolist() == [[True, False]]


def test_jaccard_hand_computed():
  gt = np.zeros((5, 5), bool)
  gt[1:3, 1:3] = True  # 4 px
  pred = np.zeros((5, 5), bool)
  pred[2:4, 2:4] = True  # 4 px, 1 px overlap
  assert metrics.jaccard(gt, pred) == pytest.approx(1 / 7)
  assert metrics.jaccard(gt, gt) == 1.0
  empty = np.zeros((5, 5), bool)
  assert metrics.jaccard(empty, empty) == 1.0  # Both empty: 1 (DAVIS).
  assert metrics.jaccard(gt, empty) == 0.0
  per_frame = metrics.jaccard(np.stack([gt, empty, gt]), np.stack([pred, empty, empty]))
  np.testing.assert_allclose(per_frame, [1 / 7, 1.0, 0.0])


def test_f_measure_empty_masks():
  empty = np.zeros((6, 8), bool)
  square = np.zeros((6, 8), bool)
  square[2:4, 2:5] = True
  assert metrics.f_measure(empty, empty) == 1.0  # Both boundaries empty.
  assert metrics.f_measure(square, empty) == 0.0  # One empty: P or R is 0.
  assert metrics.f_measure(empty, square) == 0.0
  assert metrics.f_measure(square, square) == 1.0
  # A full mask has an empty boundary, so against anything else F is 0 (DAVIS).
  full = np.ones((6, 8), bool)
  assert metrics.f_measure(full, full) == 1.0
  assert metrics.f_measure(full, square) == 0.0


def test_f_measure_one_pixel_masks():
  # 64x48 gives radius 1: the disk is the pixel and its 4-neighbours.
  h, w = 48, 64
  gt = pixel(h, w, 5, 5)  # boundary {(4,4), (4,5), (5,4), (5,5)}
  # Two columns right: boundary {(4,6), (4,7), (5,6), (5,7)}; (4,5)-(4,6) and
  # (5,5)-(5,6) match each way, so P = R = 2/4 and F = 0.5.
  assert metrics.f_measure(gt, pixel(h, w, 5, 7)) == pytest.approx(0.5)
  # One down and right: boundary {(5,5), (5,6), (6,5), (6,6)}; gt's (4,4) and pred's
  # (6,6) have no 4-neighbour in the other set, the rest do: P = R = 3/4.
  assert metrics.f_measure(gt, pixel(h, w, 6, 6)) == pytest.approx(0.75)
  # Far apart: nothing matches.
  assert metrics.f_measure(gt, pixel(h, w, 20, 30)) == 0.0
  assert metrics.jaccard(gt, pixel(h, w, 5, 7)) == 0.0


def test_f_measure_disk_edge():
  # Radius 2 (whole pixels): offsets (1, 1) and (2, 0) are in the disk, (2, 1) is not.
  h, w = 20, 20
  gt = np.zeros((h, w), bool)
  gt[10, :] = True  # A horizontal line; its boundary is rows 9 and 10.
  near = np.zeros((h, w), bool)
  near[12, :] = True  # Boundary rows 11 and 12: row 12 is 2 away from row 10.
  far = np.zeros((h, w), bool)
  far[13, :] = True  # Boundary rows 12 and 13: row 13 is 3 away, row 12 is 2 away.
  # near: every boundary pixel has a partner within 2 rows -> F = 1.
  assert metrics.f_measure(gt, near, bound_th=2) == pytest.approx(1.0)
  # far: gt row 9 and pred row 13 are unmatched; half on each side: F = 0.5.
  assert metrics.f_measure(gt, far, bound_th=2) == pytest.approx(0.5)


def test_single_frame_and_stack_agree():
  rng = np.random.default_rng(0)
  gt = rng.random((3, 30, 40)) < 0.3
  pred = rng.random((3, 30, 40)) < 0.3
  j, f = metrics.j_and_f(gt, pred)
  for t in range(3):
    assert metrics.jaccard(gt[t], pred[t]) == pytest.approx(j[t])
    assert metrics.f_measure(gt[t], pred[t]) == pytest.approx(f[t])
  np.testing.assert_allclose(metrics.f_measure(gt, pred), f)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.jaccard(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
  with pytest.raises(ValueError, match=r"\[H, W\] or \[T, H, W\]"):
    metrics.f_measure(np.zeros((4,), bool), np.zeros((4,), bool))
  with pytest.raises(TypeError, match="threshold"):
    metrics.f_measure(np.zeros((4, 4)), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="non-empty image"):
    metrics.j_and_f(np.zeros((2, 0, 4), bool), np.zeros((2, 0, 4), bool))


# ----------------------------------------------------------------------------
# Agreement with the reference on random masks.
# ----------------------------------------------------------------------------


def blobs(rng: np.random.Generator, t: int, h: int, w: int) -> np.ndarray:
  """Random ellipses, sometimes touching the image border, sometimes absent."""
  yy, xx = np.mgrid[:h, :w]
  out = np.zeros((t, h, w), bool)
  for i in range(t):
    for _ in range(int(rng.integers(0, 3))):
      cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
      ay, ax = rng.uniform(0.05, 0.5) * h, rng.uniform(0.05, 0.5) * w
      out[i] |= ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 < 1
  return out


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_reference_on_random_masks(seed):
  rng = np.random.default_rng(seed)
  h, w = int(rng.integers(1, 70)), int(rng.integers(1, 90))
  kind = seed % 3
  if kind == 0:  # Salt and pepper: many tiny components and holes.
    gt = rng.random((4, h, w)) < rng.uniform(0.05, 0.95)
    pred = rng.random((4, h, w)) < rng.uniform(0.05, 0.95)
  else:  # Blobs, with pred a jittered copy of gt or independent.
    gt = blobs(rng, 4, h, w)
    pred = np.roll(gt, int(rng.integers(-3, 4)), axis=2) if kind == 1 else blobs(rng, 4, h, w)
  for bound_th in (0.008, 0.05, 0.2, 3):
    j, f = metrics.j_and_f(gt, pred, bound_th)
    for t in range(4):
      assert j[t] == pytest.approx(ref_j(gt[t], pred[t]), abs=1e-12)
      assert f[t] == pytest.approx(ref_f(gt[t], pred[t], bound_th), abs=1e-12), (t, bound_th)


def test_agrees_with_reference_at_davis_resolution():
  rng = np.random.default_rng(7)
  gt = blobs(rng, 3, 480, 854)
  pred = np.roll(gt, 5, axis=1) ^ (rng.random(gt.shape) < 0.001)
  j, f = metrics.j_and_f(gt, pred)
  for t in range(3):
    assert j[t] == pytest.approx(ref_j(gt[t], pred[t]), abs=1e-12)
    assert f[t] == pytest.approx(ref_f(gt[t], pred[t]), abs=1e-12)


# ----------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------


def test_video_scores_means_over_frames():
  gt = np.zeros((2, 48, 64), bool)
  gt[0, 5, 5] = True
  pred = np.zeros_like(gt)
  pred[0, 5, 7] = True  # Frame 0: J 0, F 0.5; frame 1: both empty, J = F = 1.
  s = metrics.video_scores(gt, pred)
  assert s["J"] == pytest.approx(0.5)
  assert s["F"] == pytest.approx(0.75)
  assert s["JF"] == pytest.approx(0.625)
  assert s["frames"] == 2


def test_okvos_summary_counts_missing_as_zero():
  per_sample = [
    {"id": "a", "ability": "one-hop", "J": 0.8, "F": 0.6},
    {"id": "b", "ability": "one-hop", "J": 0.4, "F": 0.2},
    {"id": "c", "ability": "multi-hop", "J": None, "F": None},  # No prediction.
    {"id": "d", "ability": "relational", "J": 1.0, "F": 1.0},
  ]
  expected = per_sample + [{"id": "e", "ability": "relational"}]  # Absent: scores 0.
  s = metrics.okvos_summary(
    per_sample, expected=[{"id": r["id"], "ability": r["ability"]} for r in expected]
  )
  assert list(s) == ["one-hop", "multi-hop", "relational", "overall"]  # in-video absent.
  assert s["one-hop"]["J"] == pytest.approx(0.6)
  assert s["one-hop"]["F"] == pytest.approx(0.4)
  assert s["one-hop"]["JF"] == pytest.approx(0.5)
  assert s["multi-hop"]["JF"] == 0.0 and s["multi-hop"]["missing"] == 1
  assert s["relational"]["J"] == pytest.approx(0.5) and s["relational"]["count"] == 2
  # Overall is the mean over samples (5), not over categories.
  assert s["overall"]["J"] == pytest.approx((0.8 + 0.4 + 0 + 1.0 + 0) / 5)
  assert s["overall"]["F"] == pytest.approx((0.6 + 0.2 + 0 + 1.0 + 0) / 5)
  assert s["overall"]["missing"] == 2
  table = metrics.format_summary(s)
  assert "overall" in table and "one-hop" in table


def test_summary_errors():
  with pytest.raises(ValueError, match="Unknown ability"):
    metrics.okvos_summary([{"id": "a", "ability": "two-hop", "J": 1, "F": 1}])
  with pytest.raises(ValueError, match="Duplicate"):
    metrics.jf_summary([{"id": "a", "J": 1, "F": 1}, {"id": "a", "J": 0, "F": 0}])
  with pytest.raises(ValueError, match="at least one"):
    metrics.jf_summary([])
  with pytest.raises(ValueError, match="non-finite"):
    metrics.jf_summary([{"id": "a", "J": float("nan"), "F": 1}])


def test_jf_summary_reasonvos():
  s = metrics.jf_summary(
    [{"id": "x", "J": 0.5, "F": 0.7}, {"id": "y", "J": 0.3, "F": 0.1}],
    expected=[{"id": "x"}, {"id": "y"}, {"id": "z"}],
  )
  assert s["J"] == pytest.approx(0.8 / 3)
  assert s["F"] == pytest.approx(0.8 / 3)
  assert s["count"] == 3 and s["missing"] == 1


def test_giou_ciou_hand_computed():
  gt1 = np.zeros((4, 4), np.uint8)
  gt1[0:2, 0:2] = 1  # 4 px
  gt1[3, 3] = 255  # Ignored.
  pred1 = np.zeros((4, 4), bool)
  pred1[0:2, 0:1] = True  # 2 px inside the target
  pred1[3, 3] = True  # On an ignored pixel: counts for nothing.
  # Image 1: inter 2, union 4 -> IoU 0.5.
  gt2 = np.zeros((3, 3), np.uint8)
  pred2 = np.zeros((3, 3), bool)  # Both empty: IoU 1, adds nothing to cIoU.
  gt3 = np.zeros((2, 5), bool)
  gt3[0, :] = True  # 5 px
  # Image 3: no prediction -> inter 0, union 5.
  s = metrics.giou_ciou([gt1, gt2, gt3], [pred1, pred2, None])
  assert s["gIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert s["cIoU"] == pytest.approx(2 / 9)
  assert s["count"] == 3
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.giou_ciou([gt1], [np.zeros((2, 2), bool)])
  with pytest.raises(ValueError, match="predictions"):
    metrics.giou_ciou([gt1], [])
  assert math.isclose(metrics.giou_ciou([gt2], [pred2])["cIoU"], 1.0)


@pytest.mark.parametrize(
  "shape", [(1, 1), (1, 5), (4, 1), (2, 1, 5), (3, 4, 1), (2, 7, 9), (2, 3, 6, 5)]
)
def test_seg2bmap_matches_reference_on_any_shape(shape):
  rng = np.random.default_rng(sum(shape))
  seg = rng.random(shape) < 0.5
  expected = np.stack([ref_seg2bmap(s) for s in seg.reshape(-1, *shape[-2:])]).reshape(shape)
  np.testing.assert_array_equal(metrics.seg2bmap(seg), expected)
