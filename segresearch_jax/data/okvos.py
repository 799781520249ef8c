"""OK-VOS raw layout reading and the official per-sample preprocessing (docs/method.md §4.1, §4.2).

The raw layout, exactly as downloaded:

    {okvos_dir}/{split}.parquet                       question, images, ability, video, oid[, id, steps]
    {okvos_dir}/{split}/JPEGImages/{video}/{name}.jpg
    {okvos_dir}/{split}/Annotations/{video}/{oid}/{name}.png   palette PNG, target = index 255

Every sample becomes a dict with the sampled frames (original size), their GT masks and
the ground-truth dict in ORIGINAL pixel coordinates; `convert_ground_truth` maps it to
a policy's coordinate convention. The TFDS builder, the grain pipeline and the
evaluation all go through `load_example`, so preprocessing lives in one place.

Differences from the official code (docs/differences.md): the train-time anchor frame is drawn
from a per-sample seeded generator, and masks are read by palette INDEX, not by
grayscale brightness.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

REQUIRED_COLUMNS = ("question", "images", "ability", "video", "oid")
ABILITIES = ("in-video", "one-hop", "multi-hop", "relational")
CONVENTIONS = ("norm1000", "abs_resized")
TARGET_INDEX = 255  # Palette index of the target in OK-VOS annotation PNGs.
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
  """A broken sample or file; the message names the sample and the file or key."""


# ----------------------------------------------------------------------------
# Reading files.
# ----------------------------------------------------------------------------


def read_rows(okvos_dir: str | os.PathLike, split: str) -> list[dict]:
  """Reads `{split}.parquet` into a list of row dicts, checking the required columns."""
  import pyarrow.parquet as pq  # Heavy import; only needed here.

  path = pathlib.Path(okvos_dir) / f"{split}.parquet"
  if not path.is_file():
    raise FileNotFoundError(f"OK-VOS split file not found: {path}")
  table = pq.read_table(path)
  missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
  if missing:
    raise DataError(
      f"{path} lacks required column(s) {missing}; it has {table.column_names} "
      f"(docs/method.md §4.1 needs {list(REQUIRED_COLUMNS)})."
    )
  return table.to_pylist()


def read_mask(path: str | os.PathLike) -> np.ndarray:
  """Reads an annotation PNG as a bool mask: palette INDEX == 255 (not brightness).

  A palette PNG keeps its indices; an "L" (grayscale) PNG is read by value, which is
  the same thing for the 0/255 masks some re-encoders write. Anything else is an error,
  because reading an RGB colour's brightness is the official bug we do not repeat.
  """
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode not in ("P", "L"):
        raise DataError(f"Annotation {path} has mode {im.mode}; expected a palette (P) PNG.")
      return np.asarray(im) == TARGET_INDEX
  except DataError:
    raise
  except Exception as e:  # PIL raises many types for broken files.
    raise DataError(f"Cannot read annotation {path}: {e}") from e


def read_frame(path: str | os.PathLike) -> np.ndarray:
  """Reads a JPEG frame as uint8 [H, W, 3]."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except FileNotFoundError as e:
    raise DataError(f"Missing frame {path}") from e
  except Exception as e:
    raise DataError(f"Cannot read frame {path}: {e}") from e


def frame_number(name: str) -> int:
  """A frame's number in its video: the file stem as an int (docs/method.md §1.1)."""
  stem = pathlib.PurePath(str(name)).stem
  try:
    return int(stem)
  except ValueError as e:
    raise DataError(f"Frame name {name!r} is not a number.") from e


# ----------------------------------------------------------------------------
# Preprocessing (docs/method.md §4.2).
# ----------------------------------------------------------------------------


def sample_frame_indices(
  total: int,
  num_frames: int,
  present: Sequence[bool] | None = None,
  rng: np.random.Generator | None = None,
) -> np.ndarray:
  """Indices (into the sorted frame list) of the frames shown to the policy.

  All frames if there are at most `num_frames`, else `linspace(0, total-1, num_frames)`
  truncated to int. When `present` and `rng` are given (train split), one random
  frame where the target is present (the anchor) replaces the closest sampled index,
  so at least one shown frame contains the target.

  Returns:
    int32 [min(total, num_frames)], sorted ascending, no duplicates.
  """
  if total <= 0:
    raise ValueError("A video needs at least one frame.")
  if num_frames >= total:
    return np.arange(total, dtype=np.int32)
  indices = np.linspace(0, total - 1, num_frames, dtype=int)
  if present is not None and rng is not None:
    candidates = np.flatnonzero(np.asarray(present, dtype=bool))
    if candidates.size:
      anchor = int(rng.choice(candidates))
      if anchor not in indices:
        indices[int(np.argmin(np.abs(indices - anchor)))] = anchor
  return np.sort(indices).astype(np.int32)


def mask_stats(mask: np.ndarray) -> dict:
  """Box, point, area and largest-component area of a non-empty mask, in pixels.

  bbox_2d is [xmin, ymin, xmax, ymax] inclusive. point_2d is [x, y] at the argmax of
  the Euclidean distance transform (the pixel deepest inside the mask; ties go to the
  first in row-major order; as officially, pixels beyond the image edge do not count
  as background). max_conn_area is the size of the largest 8-connected component.
  Areas are raw pixel counts here; `ground_truth` normalises them.
  """
  mask = np.asarray(mask, dtype=bool)
  if not mask.any():
    raise ValueError("mask_stats needs a non-empty mask.")
  ys, xs = np.nonzero(mask)
  x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
  # The transform on the box grown by one pixel equals the full-image one there: the
  # nearest background pixel of any mask pixel lies inside that ring. Much cheaper.
  top, left = max(y1 - 1, 0), max(x1 - 1, 0)
  crop = mask[top : y2 + 2, left : x2 + 2]
  distance = ndimage.distance_transform_edt(crop)
  py, px = np.unravel_index(int(np.argmax(distance)), crop.shape)
  py, px = py + top, px + left
  if not mask[py, px]:  # Only for a mask covering the whole image (no background).
    nearest = int(np.argmin((ys - py) ** 2 + (xs - px) ** 2))
    py, px = ys[nearest], xs[nearest]
  labels, n = ndimage.label(crop, structure=np.ones((3, 3), dtype=int))
  max_conn = int(np.bincount(labels.ravel())[1:].max()) if n else 0
  return {
    "bbox_2d": [x1, y1, x2, y2],
    "point_2d": [int(px), int(py)],
    "area": float(mask.sum()),
    "max_conn_area": float(max_conn),
  }


def ground_truth(frame_numbers: Sequence[int], masks: np.ndarray) -> dict:
  """The per-sample ground-truth dict over the sampled frames where the target is present.

  Returns:
    {str(frame_number): {bbox_2d, point_2d, area, max_conn_area}} in original pixels,
    with area and max_conn_area divided by their maxima over the sampled frames.
  """
  gt = {}
  for fid, mask in zip(frame_numbers, masks):
    if mask.any():
      gt[str(int(fid))] = mask_stats(mask)
  if gt:
    max_area = max(v["area"] for v in gt.values())
    max_conn = max(v["max_conn_area"] for v in gt.values())
    for v in gt.values():
      v["area"] /= max_area
      v["max_conn_area"] /= max_conn
  return gt


def convert_coordinate(value: float, size: int, convention: str, resized: int | None) -> int:
  """One coordinate from original pixels into a policy's convention (docs/method.md §4.2)."""
  if convention == "norm1000":
    return round(value / size * 1000)
  if convention == "abs_resized":
    if resized is None:
      raise ValueError("The abs_resized convention needs the resized image size.")
    return round(value / size * resized)
  raise ValueError(f"Unknown coordinate convention {convention!r}; expected one of {CONVENTIONS}.")


def convert_ground_truth(
  gt: dict,
  convention: str,
  width: int,
  height: int,
  resized: tuple[int, int] | None = None,
) -> dict:
  """Maps a ground-truth dict from original pixels to `convention`.

  Args:
    gt: {frame: {bbox_2d, point_2d, area, max_conn_area}} in original pixels.
    convention: "norm1000" (Qwen3-VL, round(x/w*1000)) or "abs_resized" (Qwen2.5-VL,
      absolute pixels in the resized image, round(x/w*new_w)).
    width, height: the original frame size.
    resized: (new_w, new_h), required for "abs_resized".
  """
  if convention not in CONVENTIONS:
    raise ValueError(
      f"Unknown coordinate convention {convention!r}; expected one of {CONVENTIONS}."
    )
  new_w, new_h = resized if resized is not None else (None, None)
  if convention == "abs_resized" and resized is None:
    raise ValueError("convert_ground_truth: the abs_resized convention needs resized=(w, h).")

  def cx(x):
    return convert_coordinate(x, width, convention, new_w)

  def cy(y):
    return convert_coordinate(y, height, convention, new_h)

  out = {}
  for fid, v in gt.items():
    x1, y1, x2, y2 = v["bbox_2d"]
    px, py = v["point_2d"]
    out[str(fid)] = {
      "bbox_2d": [cx(x1), cy(y1), cx(x2), cy(y2)],
      "point_2d": [cx(px), cy(py)],
      "area": v["area"],
      "max_conn_area": v["max_conn_area"],
    }
  return out


# ----------------------------------------------------------------------------
# Samples.
# ----------------------------------------------------------------------------


def sample_id(row: dict, split: str, index: int) -> str:
  """The sample's id: the `id` column when present, else the row index (as officially)."""
  del split  # Ids are unique within a split, as in the official data.
  value = row.get("id")
  return str(value) if value is not None and str(value) != "" else str(index)


def _string_list(value, what: str, sid: str) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):  # Some exports store lists as JSON strings.
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise DataError(f"Sample {sid}: column {what!r} is not a list: {value!r}") from e
  try:
    return [str(v) for v in value]
  except TypeError as e:
    raise DataError(f"Sample {sid}: column {what!r} is not a list: {value!r}") from e


def load_example(
  okvos_dir: str | os.PathLike,
  split: str,
  row: dict,
  index: int,
  *,
  num_frames: int = 6,
  seed: int = 0,
  anchor: bool | None = None,
) -> dict:
  """Loads and preprocesses one parquet row (docs/method.md §4.2).

  Args:
    okvos_dir: the raw OK-VOS folder.
    split: the split name (selects files and, by default, the anchor rule).
    row: the parquet row.
    index: the row's index in the split; seeds the anchor draw, so a sample's frames
      do not depend on the order samples are read in.
    num_frames: frames shown to the policy.
    seed: the run seed for the anchor draw.
    anchor: replace a sampled frame by a random frame containing the target; None
      means "only for the train split" (the official rule).

  Raises:
    DataError: naming the sample, for a missing/unreadable frame or mask, an
      unknown ability, frames of different sizes, or a target absent in every frame.
  """
  sid = sample_id(row, split, index)
  for col in REQUIRED_COLUMNS:
    if row.get(col) is None:
      raise DataError(f"Sample {sid}: column {col!r} is empty.")
  video, oid, ability = str(row["video"]), str(row["oid"]), str(row["ability"])
  if ability not in ABILITIES:
    raise DataError(f"Sample {sid}: unknown ability {ability!r}; expected one of {ABILITIES}.")
  names = sorted(_string_list(row["images"], "images", sid))
  if not names:
    raise DataError(f"Sample {sid}: the images list is empty.")
  split_dir = pathlib.Path(okvos_dir) / split
  frame_dir = split_dir / "JPEGImages" / video
  mask_dir = split_dir / "Annotations" / video / oid
  try:
    numbers = [frame_number(n) for n in names]
    if not mask_dir.is_dir():
      raise DataError(f"Missing annotation folder {mask_dir}")
    # Every frame's mask decides where the target is present (anchor) and whether the
    # sample is usable at all. A frame without a PNG is unannotated: the target counts
    # as absent there (as officially); its mask is read as empty.
    all_masks = []
    for name in names:
      path = mask_dir / f"{name}.png"
      all_masks.append(read_mask(path) if path.is_file() else None)
  except DataError as e:
    raise DataError(f"Sample {sid}: {e}") from e
  present = [m is not None and bool(m.any()) for m in all_masks]
  if not any(present):
    raise DataError(f"Sample {sid}: the target mask is empty in every frame ({mask_dir}).")

  use_anchor = (split == "train") if anchor is None else anchor
  rng = np.random.default_rng([seed, index]) if use_anchor else None
  picked = sample_frame_indices(len(names), num_frames, present, rng)

  frame_paths = [str(frame_dir / f"{names[i]}.jpg") for i in picked]
  try:
    frames = [read_frame(p) for p in frame_paths]
  except DataError as e:
    raise DataError(f"Sample {sid}: {e}") from e
  shapes = {f.shape for f in frames}
  shapes |= {all_masks[i].shape + (3,) for i in picked if all_masks[i] is not None}
  if len(shapes) != 1:
    raise DataError(f"Sample {sid}: frames and masks differ in size: {sorted(shapes)}.")
  empty = np.zeros(frames[0].shape[:2], dtype=bool)
  masks = np.stack([empty if all_masks[i] is None else all_masks[i] for i in picked])
  frame_numbers = np.asarray([numbers[i] for i in picked], dtype=np.int32)
  example = {
    "id": sid,
    "video": video,
    "oid": oid,
    "ability": ability,
    "question": str(row["question"]),
    "steps": _string_list(row.get("steps"), "steps", sid),
    "frame_numbers": frame_numbers,
    "frame_paths": frame_paths,
    "frames": np.stack(frames),
    "masks": masks,
    "ground_truth": ground_truth(frame_numbers, masks),
    # Full-video masks are read lazily from here by the evaluation (not duplicated).
    "annotation_dir": str(mask_dir),
    "reference_chain": str(row.get("reference_chain") or ""),
    "reference_frames": str(row.get("reference_frames") or ""),
  }
  return example


def iter_raw_examples(
  okvos_dir: str | os.PathLike,
  split: str,
  *,
  num_frames: int = 6,
  seed: int = 0,
  anchor: bool | None = None,
  on_error: str = "raise",
  errors: list[str] | None = None,
) -> Iterator[dict]:
  """Yields preprocessed samples of a split in parquet order (see `load_example`).

  Args:
    okvos_dir, split, num_frames, seed, anchor: as in `load_example`.
    on_error: "raise" stops at the first broken sample; "skip" logs it, appends the
      message to `errors` and goes on.
    errors: receives one message per skipped sample (the count the caller reports).
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
  for index, row in enumerate(read_rows(okvos_dir, split)):
    try:
      yield load_example(
        okvos_dir, split, row, index, num_frames=num_frames, seed=seed, anchor=anchor
      )
    except DataError as e:
      if on_error == "raise":
        raise
      logging.warning("Skipping broken OK-VOS sample: %s", e)
      if errors is not None:
        errors.append(str(e))


class OkvosDataSource:
  """A random-access source over one split, loading (decoding) a sample on access.

  grain calls `__getitem__` in its worker threads, so JPEG/PNG decoding runs there.
  With on_error="skip" a broken sample returns None (the pipeline drops Nones) and
  its message is kept in `errors`.
  """

  def __init__(
    self,
    okvos_dir: str | os.PathLike,
    split: str,
    *,
    num_frames: int = 6,
    seed: int = 0,
    anchor: bool | None = None,
    on_error: str = "raise",
  ):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
    self.okvos_dir = str(okvos_dir)
    self.split = split
    self.num_frames = num_frames
    self.seed = seed
    self.anchor = anchor
    self.on_error = on_error
    self.rows = read_rows(okvos_dir, split)
    self.errors: list[str] = []

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict | None:
    index = int(index)
    try:
      return load_example(
        self.okvos_dir,
        self.split,
        self.rows[index],
        index,
        num_frames=self.num_frames,
        seed=self.seed,
        anchor=self.anchor,
      )
    except DataError as e:
      if self.on_error == "raise":
        raise
      logging.warning("Skipping broken OK-VOS sample: %s", e)
      self.errors.append(str(e))
      return None

  def __repr__(self) -> str:
    return f"OkvosDataSource({self.okvos_dir!r}, {self.split!r}, n={len(self)})"


def read_video_masks(annotation_dir: str | os.PathLike) -> tuple[list[int], np.ndarray]:
  """All annotated frames of one object, for evaluation: (frame numbers, bool [T, H, W])."""
  paths = sorted(pathlib.Path(annotation_dir).glob("*.png"))
  if not paths:
    raise DataError(f"No annotation PNGs in {annotation_dir}")
  return [frame_number(p.name) for p in paths], np.stack([read_mask(p) for p in paths])
