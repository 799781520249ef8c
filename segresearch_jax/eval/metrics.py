"""Segmentation metrics: DAVIS J and F; OK-VOS, ReasonVOS, ReVOS summaries; ReasonSeg gIoU / cIoU.

J and F follow the DAVIS definitions exactly (docs/method.md §7), the same ones the official
Seg-ReSearch evaluation uses:

- J, region similarity: |gt ∩ pred| / |gt ∪ pred| per frame, 1 when both are empty.
- F, boundary F-measure: both masks are reduced to one-pixel boundaries with DAVIS'
  `seg2bmap`; a boundary pixel is matched when the other boundary has a pixel inside a
  disk of radius ceil(bound_th × image diagonal) around it (what `cv2.dilate` with
  `skimage.morphology.disk` computes); precision = matched pred / pred boundary
  pixels, recall = matched gt / gt boundary pixels, F = 2PR / (P + R). Both boundaries
  empty gives 1; exactly one empty gives 0.

The per-frame functions take bool masks [T, H, W] (or [H, W]) and work on whole
chunks of frames with NumPy. They give exactly the numbers of the per-frame DAVIS code
(integer counts, no approximation) with much less work:

1. every frame is cropped to a window around both masks; outside it both masks and
   both boundaries are empty, so nothing there can change J or F. The windows of a
   chunk share one size, so every later step is one vectorised op over the chunk;
2. no boundary image is dilated. The disk of radius r is the union over dy of
   horizontal runs of half-width isqrt(r² − dy²), so a boundary pixel is matched
   when, for some dy, the other boundary dilated horizontally by that half-width is
   set at (x, y + dy). Those r + 1 horizontal dilations are grown on the bit-packed
   boundary (64 pixels a machine word) and read only at the boundary pixels, which
   are few.

Frames go through in chunks of about 4 M pixels so the intermediate arrays stay in
the CPU caches. `benchmarks/eval_speed.py` compares with the per-frame DAVIS code.

Summaries (`okvos_summary`, `jf_summary`, `revos_summary`) count a sample with no
prediction as 0 (the official evaluation skips it; docs/differences.md). ReasonSeg's
`reasonseg_summary` groups images by query kind (short / long = is_sentence), and
`revos_summary` averages its two categories' means for "overall", as the official
evaluators do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_BOUND_TH = 0.008
OKVOS_ABILITIES = ("in-video", "one-hop", "multi-hop", "relational")
OVERALL = "overall"
IGNORE_LABEL = 255
# Pixels (frames x H x W) processed at once; see `_jf`.
_CHUNK_PIXELS = 1 << 22

# ----------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------


def _as_masks(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
  """Both masks as bool [T, H, W]; also whether the input was a single [H, W] frame."""
  gt, pred = np.asarray(gt), np.asarray(pred)
  for name, m in (("gt", gt), ("pred", pred)):
    if m.dtype != bool and not np.issubdtype(m.dtype, np.integer):
      raise TypeError(
        f"{name} mask must be bool or integer (nonzero = target), got {m.dtype}; "
        "threshold probabilities or logits first."
      )
    if m.ndim not in (2, 3):
      raise ValueError(f"{name} mask must be [H, W] or [T, H, W], got shape {m.shape}.")
  if gt.shape != pred.shape:
    raise ValueError(f"gt and pred masks differ in shape: {gt.shape} vs {pred.shape}.")
  if gt.shape[-1] == 0 or gt.shape[-2] == 0:
    raise ValueError(f"Masks must have a non-empty image size, got shape {gt.shape}.")
  single = gt.ndim == 2
  if single:
    gt, pred = gt[None], pred[None]
  # Nonzero is the target, as DAVIS' astype(bool); a no-op (no copy) for bool input.
  return gt.astype(bool, copy=False), pred.astype(bool, copy=False), single


def boundary_radius(height: int, width: int, bound_th: float = DEFAULT_BOUND_TH) -> int:
  """The matching radius in pixels: ceil(bound_th × diagonal), or bound_th itself if >= 1.

  Computed with the same float expression as DAVIS so the ceiling never differs.
  """
  if not bound_th > 0:
    raise ValueError(f"bound_th must be positive, got {bound_th}.")
  if bound_th >= 1:
    if bound_th != int(bound_th):
      raise ValueError(f"A bound_th >= 1 is a radius in pixels and must be whole, got {bound_th}.")
    return int(bound_th)
  return int(np.ceil(bound_th * np.linalg.norm((height, width))))


# ----------------------------------------------------------------------------
# Boundaries and matching.
# ----------------------------------------------------------------------------


def seg2bmap(seg: np.ndarray) -> np.ndarray:
  """DAVIS' one-pixel boundary map of a mask, vectorised over leading axes.

  A pixel is on the boundary when it differs from its east, south or south-east
  neighbour; on the last row only east counts, on the last column only south, and the
  bottom-right pixel is never a boundary (the DAVIS / BSDS rule, offsetting boundaries
  half a pixel towards the origin).

  Args:
    seg: bool [..., H, W].

  Returns:
    bool [..., H, W].
  """
  seg = np.ascontiguousarray(seg, dtype=bool)
  if seg.ndim < 2:
    raise ValueError(f"seg2bmap needs [..., H, W], got shape {seg.shape}.")
  w = seg.shape[-1]
  b = np.zeros_like(seg)
  # On the flat array the east / south / south-east neighbours are +1, +W, +W+1, so
  # the interior rule is three contiguous XORs; the last row and column of every
  # image read the wrong neighbours there and are overwritten below.
  flat, out = seg.reshape(-1), b.reshape(-1)
  n = max(flat.size - w - 1, 0)
  c, interior = flat[:n], out[:n]
  np.bitwise_xor(c, flat[1 : n + 1], out=interior)  # east
  other = c ^ flat[w : n + w]  # south
  interior |= other
  np.bitwise_xor(c, flat[w + 1 : n + w + 1], out=other)  # south-east
  interior |= other
  b[..., -1, :-1] = seg[..., -1, :-1] ^ seg[..., -1, 1:]
  b[..., :-1, -1] = seg[..., :-1, -1] ^ seg[..., 1:, -1]
  b[..., -1, -1] = False
  return b


def _windows(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Crops each frame to one shared window size around both masks.

  The window covers each frame's union bounding box grown by one pixel (clipped to the
  image), which holds every boundary pixel of both masks: a boundary pixel lies in a
  mask or just above / left of it. Where the window's last row or column is not the
  image's, it is outside the box, so DAVIS' last-row/last-column rule gives 0 there,
  the same as the full image: the window's boundary map equals the image's, and J's
  counts are unchanged.

  Args:
    gt, pred: bool [T, H, W].

  Returns:
    g, p: bool [T, h, w], one window per frame (all zeros for a frame where both
    masks are empty).
  """
  num_frames, height, width = gt.shape
  rows = gt.any(axis=2) | pred.any(axis=2)  # [T, H]
  present = rows.any(axis=1)
  y0 = rows.argmax(axis=1)
  y1 = height - 1 - rows[:, ::-1].argmax(axis=1)
  x0 = np.zeros(num_frames, dtype=np.int64)
  x1 = np.zeros(num_frames, dtype=np.int64)
  for t in np.flatnonzero(present):
    # Columns only over the rows the masks span: less to read than whole frames.
    band = slice(y0[t], y1[t] + 1)
    cols = gt[t, band].any(axis=0) | pred[t, band].any(axis=0)
    x0[t] = cols.argmax()
    x1[t] = width - 1 - cols[::-1].argmax()
  y0, y1 = np.where(present, y0, 0), np.where(present, y1, 0)
  h = int(min(height, (y1 - y0 + 3).max()))
  w = int(min(width, (x1 - x0 + 3).max()))
  sy = np.clip(y0 - 1, 0, height - h)
  sx = np.clip(x0 - 1, 0, width - w)
  g = np.zeros((num_frames, h, w), dtype=bool)
  p = np.zeros_like(g)
  for t in np.flatnonzero(present):
    g[t] = gt[t, sy[t] : sy[t] + h, sx[t] : sx[t] + w]
    p[t] = pred[t, sy[t] : sy[t] + h, sx[t] : sx[t] + w]
  return g, p


def _pack_padded(boundary: np.ndarray, radius: int, row_bytes: int) -> np.ndarray:
  """Bit-packs boundary maps into a zero-padded flat layout made for disk matching.

  Args:
    boundary: bool [T, h, w].
    radius: the disk radius r.
    row_bytes: bytes per padded row, with 8 * row_bytes >= w + r.

  Returns:
    uint8 [n], n a multiple of 8: the bits of a [T, r + h + r, 8 * row_bytes] array
    (pixel i = bit i % 8 of byte i // 8) holding each map at rows [r, r + h), columns
    [0, w). With r empty rows around each frame and at least r empty columns after
    each row, a run of up to r pixels along the flat array, or r rows up or down,
    never leaves its own row or frame.
  """
  num_frames, h, w = boundary.shape
  padded = np.zeros((num_frames, h + 2 * radius, row_bytes), dtype=np.uint8)
  packed = np.packbits(boundary, axis=-1, bitorder="little")  # [T, h, ceil(w / 8)]
  padded[:, radius : radius + h, : packed.shape[-1]] = packed
  flat = padded.reshape(-1)
  return np.concatenate([flat, np.zeros(-flat.size % 8, dtype=np.uint8)])


def _matched(points: np.ndarray, packed: np.ndarray, radius: int, row_bytes: int) -> np.ndarray:
  """Which points have a pixel of the packed map within `radius`.

  "Within" means inside the DAVIS disk {(dx, dy): dx² + dy² <= r²}, which is the union
  over dy of horizontal runs of half-width isqrt(r² − dy²). So a point is matched when,
  for some dy, the horizontal dilation of the map by that half-width is set at
  (y + dy, x). The dilations grow one pixel a step, 64 pixels a word (two shifts with
  the carries between words), and each is probed only at the (sparse) points, right
  after it is made.

  Args:
    points: int64 [n] bit indices of the points in `packed`'s layout.
    packed: uint8 from `_pack_padded`.
    radius: the disk radius r.
    row_bytes: bytes per padded row.

  Returns:
    bool [n].
  """
  near = np.zeros(points.size, dtype=bool)
  byte_index, bit = points >> 3, (points & 7).astype(np.uint8)
  words = packed.view(np.dtype("<u8"))  # Little-endian: pixel i = bit i % 64 of word i // 64.
  one, last = np.uint64(1), np.uint64(63)
  half_widths = [(dy, math.isqrt(radius * radius - dy * dy)) for dy in range(-radius, radius + 1)]
  for half in range(radius + 1):
    if half:
      up = words << one  # Pixel i -> i + 1.
      up[1:] |= words[:-1] >> last
      down = words >> one  # Pixel i -> i - 1.
      down[:-1] |= words[1:] << last
      up |= down
      up |= words
      words = up
    as_bytes = words.view(np.uint8)
    for dy, hw in half_widths:
      if hw == half:
        near |= ((as_bytes[byte_index + dy * row_bytes] >> bit) & 1).astype(bool)
  return near


def _f_from_counts(n_pred, n_gt, m_pred, m_gt) -> np.ndarray:
  """DAVIS precision / recall / F from boundary counts and match counts, per frame."""
  n_pred, n_gt = np.asarray(n_pred, np.float64), np.asarray(n_gt, np.float64)
  precision = np.divide(m_pred, n_pred, out=np.ones_like(n_pred), where=n_pred > 0)
  recall = np.divide(m_gt, n_gt, out=np.ones_like(n_gt), where=n_gt > 0)
  # One side empty: DAVIS sets (P, R) to (1, 0) or (0, 1), so F = 0.
  precision[(n_pred > 0) & (n_gt == 0)] = 0.0
  recall[(n_pred == 0) & (n_gt > 0)] = 0.0
  total = precision + recall
  return np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)


def _jf(gt: np.ndarray, pred: np.ndarray, bound_th: float, want_j: bool):
  """J (if wanted) and F per frame for bool [T, H, W] masks, a chunk of frames at a time.

  Chunks of about `_CHUNK_PIXELS` keep every intermediate array in the CPU caches;
  whole long videos at once run about 1.5x slower, the steps being memory-bound.
  """
  num_frames, height, width = gt.shape
  step = max(1, _CHUNK_PIXELS // (height * width))
  parts = [
    _jf_chunk(gt[i : i + step], pred[i : i + step], bound_th, want_j)
    for i in range(0, num_frames, step)
  ]
  j = np.concatenate([part[0] for part in parts]) if want_j else None
  return j, np.concatenate([part[1] for part in parts])


def _jf_chunk(gt: np.ndarray, pred: np.ndarray, bound_th: float, want_j: bool):
  """J (if wanted) and F per frame for bool [T, H, W] masks."""
  num_frames, height, width = gt.shape
  radius = boundary_radius(height, width, bound_th)
  g, p = _windows(gt, pred)
  j = None
  if want_j:
    inter = np.array([np.count_nonzero(g[t] & p[t]) for t in range(num_frames)])
    size_g = np.array([np.count_nonzero(g[t]) for t in range(num_frames)])
    size_p = np.array([np.count_nonzero(p[t]) for t in range(num_frames)])
    union = size_g + size_p - inter
    j = np.divide(inter, union, out=np.ones(num_frames), where=union > 0)
  _, h, w = g.shape
  row_bytes = -(-(w + radius) // 8)
  gb, pb = seg2bmap(g), seg2bmap(p)
  counts, matched = [], []
  for points_map, other_map in ((pb, gb), (gb, pb)):
    flat = np.flatnonzero(points_map)
    frame, rest = np.divmod(flat, h * w)
    y, x = np.divmod(rest, w)
    counts.append(np.bincount(frame, minlength=num_frames))
    near = np.zeros(flat.size, dtype=bool)
    if flat.size and other_map.any():
      bits = ((frame * (h + 2 * radius) + y + radius) * row_bytes) * 8 + x
      near = _matched(bits, _pack_padded(other_map, radius, row_bytes), radius, row_bytes)
    matched.append(np.bincount(frame[near], minlength=num_frames))
  (n_pred, n_gt), (m_pred, m_gt) = counts, matched
  return j, _f_from_counts(n_pred, n_gt, m_pred, m_gt)


# ----------------------------------------------------------------------------
# Per-frame metrics.
# ----------------------------------------------------------------------------


def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray | float:
  """Region similarity J per frame (DAVIS): IoU, 1 when both masks are empty.

  Args:
    gt, pred: bool (or integer, nonzero = target) [T, H, W] or [H, W].

  Returns:
    float64 [T], or a float for [H, W] input.
  """
  gt, pred, single = _as_masks(gt, pred)
  inter = np.count_nonzero(gt & pred, axis=(1, 2))
  union = np.count_nonzero(gt | pred, axis=(1, 2))
  j = np.divide(inter, union, out=np.ones(gt.shape[0]), where=union > 0)
  return float(j[0]) if single else j


def f_measure(
  gt: np.ndarray, pred: np.ndarray, bound_th: float = DEFAULT_BOUND_TH
) -> np.ndarray | float:
  """Boundary F-measure per frame (DAVIS, see the module docstring).

  F is symmetric in its two masks; the names only say which side is precision.

  Args:
    gt, pred: bool (or integer, nonzero = target) [T, H, W] or [H, W].
    bound_th: matching radius as a fraction of the image diagonal (rounded up), or a
      whole number of pixels when >= 1.

  Returns:
    float64 [T], or a float for [H, W] input.
  """
  gt, pred, single = _as_masks(gt, pred)
  _, f = _jf(gt, pred, bound_th, want_j=False)
  return float(f[0]) if single else f


def j_and_f(
  gt: np.ndarray, pred: np.ndarray, bound_th: float = DEFAULT_BOUND_TH
) -> tuple[np.ndarray, np.ndarray]:
  """J and F per frame in one pass (they share the cropping).

  Args:
    gt, pred: bool (or integer, nonzero = target) [T, H, W] or [H, W].
    bound_th: as in `f_measure`.

  Returns:
    (J, F): float64 [T] each ([1] for [H, W] input).
  """
  gt, pred, _ = _as_masks(gt, pred)
  return _jf(gt, pred, bound_th, want_j=True)


def video_scores(
  gt: np.ndarray, pred: np.ndarray, bound_th: float = DEFAULT_BOUND_TH
) -> dict[str, float]:
  """One sample's scores: mean J and mean F over its annotated frames, and J&F.

  Args:
    gt, pred: bool [T, H, W] over the annotated frames of one sample.

  Returns:
    {"J", "F", "JF", "frames"}.
  """
  j, f = j_and_f(gt, pred, bound_th)
  mean_j, mean_f = float(j.mean()), float(f.mean())
  return {"J": mean_j, "F": mean_f, "JF": (mean_j + mean_f) / 2, "frames": int(j.size)}


# ----------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------


def _score(record: Mapping, key: str) -> float:
  value = record.get(key)
  if value is None:  # No prediction for this sample: it scores 0 (docs/differences.md).
    return 0.0
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"Sample {record.get('id')!r} has a non-finite {key}: {value}.")
  return value


def _mean_scores(records: Sequence[Mapping]) -> dict[str, float]:
  j = float(np.mean([_score(r, "J") for r in records]))
  f = float(np.mean([_score(r, "F") for r in records]))
  missing = sum(r.get("J") is None or r.get("F") is None or bool(r.get("missing")) for r in records)
  return {"J": j, "F": f, "JF": (j + f) / 2, "count": len(records), "missing": missing}


def _with_expected(
  per_sample: Sequence[Mapping], expected: Iterable[Mapping] | None
) -> list[Mapping]:
  """Adds an unscored entry for every expected sample absent from `per_sample`."""
  records = list(per_sample)
  ids = [r.get("id") for r in records]
  if len(set(ids)) != len(ids):
    dup = sorted({str(i) for i in ids if ids.count(i) > 1})
    raise ValueError(f"Duplicate sample ids in the per-sample scores: {dup[:5]}.")
  if expected is not None:
    seen = set(ids)
    for e in expected:
      if e["id"] not in seen:
        records.append({"id": e["id"], "ability": e.get("ability"), "J": None, "F": None})
  return records


def jf_summary(
  per_sample: Sequence[Mapping], expected: Iterable[Mapping] | None = None
) -> dict[str, float]:
  """Mean J, mean F and J&F over samples (ReasonVOS, or any single-category video set).

  Args:
    per_sample: dicts with "id", "J", "F" (per-sample means over frames); J or F None
      means the sample has no prediction and scores 0 (optional "missing" as in
      `okvos_summary`).
    expected: optionally every sample of the split (dicts with "id"); those absent from
      `per_sample` score 0 too.

  Returns:
    {"J", "F", "JF", "count", "missing"}.
  """
  records = _with_expected(per_sample, expected)
  if not records:
    raise ValueError("jf_summary needs at least one sample.")
  return _mean_scores(records)


def okvos_summary(
  per_sample: Sequence[Mapping],
  expected: Iterable[Mapping] | None = None,
  abilities: Sequence[str] = OKVOS_ABILITIES,
) -> dict[str, dict[str, float]]:
  """OK-VOS scores per ability and overall, as the official table (docs/method.md §7, §9).

  Each category's J and F are means over its samples and J&F = (J + F) / 2; "overall"
  is the mean over all samples (not over categories), as officially. Unlike the
  official script, samples without a prediction count as 0 instead of being skipped.

  Args:
    per_sample: dicts with "id", "ability", "J", "F"; J or F None = no prediction
      (scores 0). An optional "missing": True marks a sample without a prediction
      that was scored some other way (e.g. as empty masks); it only counts in
      "missing".
    expected: optionally every sample of the split (dicts with "id", "ability");
      those absent from `per_sample` score 0.
    abilities: the categories, in table order; categories without samples are left out.

  Returns:
    {ability: {"J", "F", "JF", "count", "missing"}, ..., "overall": {...}}.
  """
  records = _with_expected(per_sample, expected)
  if not records:
    raise ValueError("okvos_summary needs at least one sample.")
  unknown = sorted({str(r.get("ability")) for r in records} - set(abilities))
  if unknown:
    raise ValueError(f"Unknown ability {unknown}; expected one of {list(abilities)}.")
  out = {}
  for ability in abilities:
    group = [r for r in records if r.get("ability") == ability]
    if group:
      out[ability] = _mean_scores(group)
  out[OVERALL] = _mean_scores(records)
  return out


def format_summary(summary: Mapping[str, Mapping[str, float]], title: str = "") -> str:
  """A fixed-width table of a summary (percent), one row per category."""
  lines = [title] if title else []
  lines.append(f"{'category':<12} {'J':>7} {'F':>7} {'J&F':>7} {'n':>6} {'missing':>8}")
  for name, s in summary.items():
    lines.append(
      f"{name:<12} {100 * s['J']:7.2f} {100 * s['F']:7.2f} {100 * s['JF']:7.2f} "
      f"{int(s['count']):6d} {int(s.get('missing', 0)):8d}"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# ReasonSeg (images).
# ----------------------------------------------------------------------------


def giou_ciou(
  gts: Sequence[np.ndarray],
  preds: Sequence[np.ndarray | None],
  ignore_label: int = IGNORE_LABEL,
) -> dict[str, float]:
  """ReasonSeg gIoU and cIoU (docs/method.md §4.3).

  gIoU is the mean over images of the per-image IoU (1 when the union is empty); cIoU
  is the total intersection over the total union. Pixels whose gt label equals
  `ignore_label` count for neither. Unlike LISA's script no epsilon is added to the
  union; an empty union is handled explicitly.

  Args:
    gts: per image, an integer label map [H, W] (nonzero = target, `ignore_label` =
      ignored) or a bool mask.
    preds: per image, a bool mask [H, W] of the same size, or None for no prediction
      (an empty mask).
    ignore_label: the gt value excluded from the counts.

  Returns:
    {"gIoU", "cIoU", "count"}.
  """
  if len(gts) != len(preds):
    raise ValueError(f"giou_ciou got {len(gts)} gt masks but {len(preds)} predictions.")
  if not gts:
    raise ValueError("giou_ciou needs at least one image.")
  inter, union = [], []
  for i, (gt, pred) in enumerate(zip(gts, preds)):
    try:
      counts = iou_counts(gt, pred, ignore_label)
    except (ValueError, TypeError) as e:
      raise type(e)(f"Image {i}: {e}") from e
    inter.append(counts[0])
    union.append(counts[1])
  return giou_ciou_from_counts(inter, union)


def iou_counts(
  gt: np.ndarray, pred: np.ndarray | None, ignore_label: int = IGNORE_LABEL
) -> tuple[int, int]:
  """(intersection, union) pixel counts of one image, pixels labelled `ignore_label` left out.

  Args:
    gt: an integer label map [H, W] (nonzero = target, `ignore_label` = ignored) or a
      bool mask.
    pred: a bool (or integer, nonzero = target) mask [H, W], or None (empty).
    ignore_label: the gt value excluded from the counts.
  """
  gt = np.asarray(gt)
  if gt.ndim != 2:
    raise ValueError(f"gt must be [H, W], got shape {gt.shape}.")
  pred = np.zeros(gt.shape, dtype=bool) if pred is None else np.asarray(pred)
  if pred.shape != gt.shape:
    raise ValueError(f"gt {gt.shape} and prediction {pred.shape} differ in shape.")
  if pred.dtype != bool and not np.issubdtype(pred.dtype, np.integer):
    raise TypeError(f"The prediction must be bool or integer, got {pred.dtype}.")
  valid = gt != ignore_label if gt.dtype != bool else np.ones(gt.shape, dtype=bool)
  target = (gt != 0) & valid
  pred = pred.astype(bool, copy=False) & valid
  return int(np.count_nonzero(target & pred)), int(np.count_nonzero(target | pred))


def giou_ciou_from_counts(inter: Sequence[int], union: Sequence[int]) -> dict[str, float]:
  """gIoU (mean per-image IoU, 1 for an empty union) and cIoU (sum inter / sum union)."""
  if len(inter) != len(union) or not len(inter):
    raise ValueError(f"Need equally many (>= 1) counts, got {len(inter)} and {len(union)}.")
  ious = [1.0 if u == 0 else i / u for i, u in zip(inter, union)]
  total_inter, total_union = int(np.sum(inter)), int(np.sum(union))
  ciou = 1.0 if total_union == 0 else total_inter / total_union
  return {"gIoU": float(np.mean(ious)), "cIoU": float(ciou), "count": len(ious)}


REASONSEG_GROUPS = ("short", "long", OVERALL)


def reasonseg_summary(per_image: Sequence[Mapping]) -> dict[str, dict[str, float]]:
  """ReasonSeg's table: gIoU / cIoU of short queries, long (sentence) queries and all.

  Args:
    per_image: dicts with "is_sentence", "inter" and "union" (`iou_counts`).

  Returns:
    {"short", "long", "overall"} -> {"gIoU", "cIoU", "count"}; a group without images
    is left out.
  """
  if not per_image:
    raise ValueError("reasonseg_summary needs at least one image.")
  groups = {
    "short": [r for r in per_image if not r["is_sentence"]],
    "long": [r for r in per_image if r["is_sentence"]],
    OVERALL: list(per_image),
  }
  return {
    name: giou_ciou_from_counts([r["inter"] for r in rs], [r["union"] for r in rs])
    for name, rs in groups.items()
    if rs
  }


def format_giou_table(summary: Mapping[str, Mapping[str, float]], title: str = "") -> str:
  """A fixed-width gIoU / cIoU table (percent), one row per query group."""
  lines = [title] if title else []
  lines.append(f"{'queries':<12} {'gIoU':>7} {'cIoU':>7} {'n':>6}")
  for name, s in summary.items():
    lines.append(f"{name:<12} {100 * s['gIoU']:7.2f} {100 * s['cIoU']:7.2f} {int(s['count']):6d}")
  return "\n".join(lines)


REVOS_CATEGORIES = ("referring", "reasoning")


def revos_summary(per_sample: Sequence[Mapping]) -> dict[str, dict[str, float]]:
  """ReVOS's table: J, F, J&F of referring and reasoning expressions and their average.

  Each category's J and F are means over its expressions (each a mean over every frame
  of its video); "overall" is the mean of the two categories' numbers, not of all
  expressions, as VISA's evaluator computes it. Expressions of other categories (type
  2) are not in the table. A sample without a prediction scores 0, as in `okvos_summary`.

  Args:
    per_sample: dicts with "id", "category" and "J", "F" (optional "missing").

  Returns:
    {"referring", "reasoning", "overall"} -> {"J", "F", "JF", "count", "missing"};
    a category without expressions is left out and "overall" averages those present.
  """
  records = _with_expected(per_sample, None)
  out = {}
  for category in REVOS_CATEGORIES:
    group = [r for r in records if r.get("category") == category]
    if group:
      out[category] = _mean_scores(group)
  if not out:
    raise ValueError(f"revos_summary needs at least one sample of {REVOS_CATEGORIES}.")
  parts = list(out.values())
  j = float(np.mean([p["J"] for p in parts]))
  f = float(np.mean([p["F"] for p in parts]))
  out[OVERALL] = {
    "J": j,
    "F": f,
    "JF": float(np.mean([p["JF"] for p in parts])),
    "count": sum(p["count"] for p in parts),
    "missing": sum(p["missing"] for p in parts),
  }
  return out
