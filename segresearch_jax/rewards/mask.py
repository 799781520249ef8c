"""The mask reward term (docs/method.md §3.2): a jittable gather into the precomputed IoU cache.

`mask_score` looks up, for each response, the IoU that the segmenter's mask for the
predicted prompt has with the GT mask of the chosen keyframe, from the tables that
`segmentation/mask_cache.py` built (nearest grid entry; `data/mask_tables.py` has the
layout). The trainer adds `mask_weight * mask_score` to the official score
(`add_mask_term`); with weight 0 the total is exactly docs/method.md §3.1.

Which table feeds the score (`prompt`): SAM2 is prompted with the box AND the point
at evaluation, but the cache holds point-only and box-only prompts. The default "box"
reads the box table: with a box, SAM2's mask barely depends on an extra point inside
it, while a point alone is ambiguous (part vs whole). "point" reads the point table,
"mean" averages both (rewards a good point as well as a good box).

Nearest entries: a point reads the grid cell it falls in (the nearest cell centre).
A box's coordinates each go to their nearest bin; when x1 and x2 land in the same bin
(a box narrower than a bin) the nearest valid pair (lo, lo+1) or (lo-1, lo) is used.
An inverted box (x1 > x2 or y1 > y2) is not a prompt the cache holds: its box entry is 0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from segresearch_jax import protocol
from segresearch_jax.data import mask_tables
from segresearch_jax.data import okvos as okvos_data
from segresearch_jax.rewards import okvos

PROMPTS = ("box", "point", "mean")


def nearest_bin(u: jnp.ndarray, n: int) -> jnp.ndarray:
  """Index of the nearest of n bin centres (k + 0.5) / n to u in [0, 1] (clipped)."""
  return jnp.clip(jnp.floor(u * n), 0, n - 1).astype(jnp.int32)


def nearest_pair(lo: jnp.ndarray, hi: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The nearest bin pair (i < j) to the interval [lo, hi] on one axis, and whether it is valid.

  Returns:
    pair index int32 (see `mask_tables.pair_index`) and ok bool (False when lo > hi).
  """
  centre = lambda i: (i.astype(jnp.float32) + 0.5) / k
  i, j = nearest_bin(lo, k), nearest_bin(hi, k)
  # Same bin: move one end to the neighbouring bin, whichever costs less in L1.
  down_cost = jnp.abs(lo - centre(i - 1)) + jnp.abs(hi - centre(i))
  up_cost = jnp.abs(lo - centre(i)) + jnp.abs(hi - centre(i + 1))
  go_down = ((down_cost <= up_cost) & (i > 0)) | (i == k - 1)
  same = i == j
  i = jnp.where(same & go_down, i - 1, i)
  j = jnp.where(same & ~go_down, j + 1, j)
  ok = lo <= hi
  i, j = jnp.where(ok, i, 0), jnp.where(ok, j, 1)  # Keep the index in range when invalid.
  return mask_tables.pair_index(i, j, k).astype(jnp.int32), ok


def mask_score(
  point_iou: jnp.ndarray,
  box_iou: jnp.ndarray,
  keyframe_slot: jnp.ndarray,
  pred_box: jnp.ndarray,
  pred_point: jnp.ndarray,
  valid: jnp.ndarray,
  *,
  prompt: str = "box",
) -> jnp.ndarray:
  """The mask term in [0, 1] of a batch (jittable; `prompt` is static).

  Args:
    point_iou: uint8 [B, F, G, G] (`mask_tables` layout, rows = y).
    box_iou: uint8 [B, F, P, P], P = K (K - 1) / 2 (x pair, y pair).
    keyframe_slot: int [B], index of the keyframe among the F shown frames; -1 = none.
    pred_box: float [B, 4] (x1, y1, x2, y2) normalised to [0, 1] of the frame.
    pred_point: float [B, 2] (x, y) normalised to [0, 1].
    valid: bool [B]; False scores 0 (no keyframe/answer, as in docs/method.md §3.1).
    prompt: "box" | "point" | "mean" (see the module doc).

  Returns:
    float32 [B]: IoU / 255 of the nearest cached prompt, 0 where invalid.
  """
  if prompt not in PROMPTS:
    raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}.")
  point_iou, box_iou = jnp.asarray(point_iou), jnp.asarray(box_iou)
  if point_iou.ndim != 4 or point_iou.shape[2] != point_iou.shape[3]:
    raise ValueError(f"point_iou must be [B, F, G, G], got {point_iou.shape}.")
  if box_iou.ndim != 4 or box_iou.shape[:2] != point_iou.shape[:2]:
    raise ValueError(
      f"box_iou must be [B, F, P, P] with point_iou's B, F = {point_iou.shape[:2]}, "
      f"got {box_iou.shape}."
    )
  b, f, g = point_iou.shape[0], point_iou.shape[1], point_iou.shape[-1]
  k = mask_tables.bins_from_pairs(box_iou.shape[-1])
  slot = jnp.asarray(keyframe_slot, jnp.int32)  # [B]
  ok = jnp.asarray(valid, bool) & (slot >= 0) & (slot < f)
  slot = jnp.clip(slot, 0, f - 1)
  rows = jnp.arange(b)
  pred_box = jnp.asarray(pred_box, jnp.float32)  # [B, 4]
  pred_point = jnp.asarray(pred_point, jnp.float32)  # [B, 2]
  # 1. Point: the grid cell the point falls in.
  gx, gy = nearest_bin(pred_point[:, 0], g), nearest_bin(pred_point[:, 1], g)
  point_value = point_iou[rows, slot, gy, gx].astype(jnp.float32) / 255.0  # [B]
  # 2. Box: the nearest valid bin pair on each axis.
  px, x_ok = nearest_pair(pred_box[:, 0], pred_box[:, 2], k)
  py, y_ok = nearest_pair(pred_box[:, 1], pred_box[:, 3], k)
  box_value = jnp.where(x_ok & y_ok, box_iou[rows, slot, px, py].astype(jnp.float32) / 255.0, 0.0)
  if prompt == "box":
    value = box_value
  elif prompt == "point":
    value = point_value
  else:
    value = 0.5 * (box_value + point_value)
  return jnp.where(ok, value, 0.0)


def add_mask_term(terms: Mapping[str, Any], score: jnp.ndarray, weight: float) -> dict[str, Any]:
  """The reward dict with `mask_score` added and `score` += weight * mask_score.

  With weight 0 the official score is returned untouched (bit-exact docs/method.md §3.1).
  """
  out = dict(terms)
  out["mask_score"] = jnp.asarray(score, jnp.float32)
  if weight != 0:
    out["score"] = terms["score"] + weight * out["mask_score"]
  return out


# ----------------------------------------------------------------------------
# Host side: from responses to normalised prompts.
# ----------------------------------------------------------------------------


def normalise_prompts(
  boxes: np.ndarray,
  points: np.ndarray,
  convention: str,
  resized: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Predicted boxes [B, 4] and points [B, 2] from the policy's convention to [0, 1].

  Args:
    convention: "norm1000" (Qwen3-VL: 0-1000 of the frame) or "abs_resized"
      (Qwen2.5-VL: pixels of the resized image the model saw).
    resized: (width, height) of that resized image; required for "abs_resized".
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  points = np.asarray(points, np.float32).reshape(-1, 2)
  if convention == "norm1000":
    scale = np.asarray([1000.0, 1000.0], np.float32)
  elif convention == "abs_resized":
    if resized is None:
      raise ValueError("The abs_resized convention needs resized=(width, height).")
    w, h = resized
    if w <= 0 or h <= 0:
      raise ValueError(f"resized must be positive, got {resized}.")
    scale = np.asarray([w, h], np.float32)
  else:
    raise ValueError(
      f"Unknown coordinate convention {convention!r}; expected one of {okvos_data.CONVENTIONS}."
    )
  return boxes / np.tile(scale, 2), points / scale


def parse_mask_prompts(
  responses: Sequence[str],
  ground_truths: Sequence[str | Mapping],
  frame_numbers: np.ndarray,
  convention: str,
  resized: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
  """The inputs of `mask_score` from decoded responses (host side).

  The keyframe and answer are read exactly as docs/method.md §3.1 reads them (the FIRST keyframe
  tag, the first `<answer>` without DOTALL), and a response is valid when §3.1 would
  score its answer: the keyframe is a frame where the target is present and the answer
  parses.

  Args:
    responses: decoded responses.
    ground_truths: per response, the ground-truth dict (or JSON) keyed by frame number.
    frame_numbers: int [B, F], the shown frame numbers in pipeline order (-1 = padding).
    convention, resized: the policy's coordinate convention (see `normalise_prompts`).

  Returns:
    keyframe_slot int32 [B] (-1 = none), pred_box float32 [B, 4] and pred_point
    float32 [B, 2] in [0, 1] units, valid bool [B].
  """
  frame_numbers = np.asarray(frame_numbers)
  b = len(responses)
  if frame_numbers.ndim != 2 or frame_numbers.shape[0] != b:
    raise ValueError(f"frame_numbers must be [B={b}, F], got shape {frame_numbers.shape}.")
  slot = np.full(b, -1, np.int32)
  boxes = np.zeros((b, 4), np.float32)
  points = np.zeros((b, 2), np.float32)
  valid = np.zeros(b, bool)
  for i, (response, gt) in enumerate(zip(responses, ground_truths)):
    # The reward's reading (linear, never raises); the frame slot through the one
    # keyframe-number parser, so `05` or `٥` name no slot.
    reading = okvos.read_response(response)
    frame = None if reading.keyframe is None else protocol.keyframe_number(reading.keyframe)
    if frame is None:
      continue
    hits = np.flatnonzero(frame_numbers[i] == frame)
    if not hits.size:
      continue
    slot[i] = hits[0]
    gt = json.loads(gt) if isinstance(gt, str) else gt
    if reading.box is None or reading.point is None:
      continue
    boxes[i], points[i] = reading.box, reading.point
    valid[i] = reading.target(gt) is not None
  boxes, points = normalise_prompts(boxes, points, convention, resized)
  return dict(keyframe_slot=slot, pred_box=boxes, pred_point=points, valid=valid)
