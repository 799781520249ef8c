"""ReasonSeg, ReasonVOS and ReVOS read from their released layouts (docs/method.md §4.3).

    ReasonSeg (LISA)   {root}/{split}/{name}.jpg + {name}.json   {"text", "is_sentence", "shapes"}
    ReasonVOS          {root}/meta_expressions.json, JPEGImages/{video}/{frame}.jpg,
      (VideoLISA)      Annotations/{source}_{video}_{obj_id}/{frame}.png
    ReVOS (VISA)       {root}/meta_expressions_{split}_.json, mask_dict.json (COCO RLE),
                       JPEGImages/{video}/{frame}.jpg

The readers give plain dicts (the TFDS builders store them as they are) and the ground
truth of one record at the original resolution. What they follow from the official
loaders and evaluators:

- ReasonSeg: JSON that is not UTF-8 is read as cp1252; shapes labelled exactly "flag"
  (any case) are dropped, labels containing "ignore" are ignore regions (255), every
  other shape is target (1); shapes are drawn largest first, each as cv2 draws
  `polylines` (1 px, 8-connected) and `fillPoly` over its points truncated to int, so a
  shape of one or two points is a dot or a line. Photos are turned upright by their
  EXIF orientation (as `cv2.imread` does).
- ReasonVOS: `expressions` is a list of {obj_id, exp_id, exp_text, is_sent} (current
  release) or a dict keyed by expression id with "exp" text (before Dec 2024; there
  `is_sent` sits on the video). A record's id is `{source}_{video}_{obj_id}_{exp_id}`;
  the scored frames are the PNGs in its annotation folder; any nonzero pixel is target.
- ReVOS: an expression's mask in a frame is the union of the RLE masks of its
  `anno_id`s (a null entry is empty); every frame of the video is scored; `type_id`
  0 = referring, 1 = reasoning, 2 = left out of the table.

A malformed file or record raises `okvos.DataError` naming the file and the record.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from segresearch_jax.data import okvos

DataError = okvos.DataError

# The benchmarks `configs/okvos.py:reasonseg|reasonvos|revos` evaluate on, and their titles.
BENCHMARKS = ("reasonseg", "reasonvos", "revos")
TITLES = {"reasonseg": "ReasonSeg", "reasonvos": "ReasonVOS", "revos": "ReVOS"}

IGNORE_LABEL = 255  # ReasonSeg ignore regions (excluded from gIoU / cIoU).
TARGET_LABEL = 1
DROPPED_LABEL = "flag"  # LISA drops these shapes (deprecated annotations).
REVOS_CATEGORIES = {0: "referring", 1: "reasoning", 2: "type2"}
REVOS_SCORED_TYPES = (0, 1)


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file as UTF-8, falling back to cp1252 (as LISA does for ReasonSeg)."""
  raw = pathlib.Path(path).read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    try:
      text = raw.decode("cp1252")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: neither UTF-8 nor cp1252 ({e}).") from e
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not JSON ({e}).") from e


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads a photo as uint8 [H, W, 3], turned upright by its EXIF orientation."""
  try:
    with Image.open(path) as im:
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
  except FileNotFoundError as e:
    raise DataError(f"Missing image {path}") from e
  except Exception as e:  # PIL raises many types for broken files.
    raise DataError(f"Cannot read image {path}: {e}") from e


def read_nonzero_mask(path: str | os.PathLike) -> np.ndarray:
  """Reads an annotation PNG as bool [H, W]: any nonzero pixel (index or value) is target."""
  try:
    with Image.open(path) as im:
      im.load()
      values = np.asarray(im)
  except Exception as e:  # PIL raises many types for broken files.
    raise DataError(f"Cannot read annotation {path}: {e}") from e
  return values.any(axis=-1) if values.ndim == 3 else values != 0


def frame_numbers(names: Sequence[str]) -> list[int]:
  """The frames' numbers: their stems as ints, or their positions when a stem is not a number.

  The policy names frames by number; videos of sources whose frames are not numbered
  get their position in the sorted list instead (used the same way everywhere).
  """
  try:
    return [okvos.frame_number(n) for n in names]
  except DataError:
    return list(range(len(names)))


# ----------------------------------------------------------------------------
# ReasonSeg polygons, rasterised as cv2 draws them.
# ----------------------------------------------------------------------------


def _draw_line(mask: np.ndarray, x0: int, y0: int, x1: int, y1: int, value: int) -> None:
  """An 8-connected 1-px segment: cv2 walks left to right and rounds halves towards the start."""
  if x1 < x0:
    x0, y0, x1, y1 = x1, y1, x0, y0
  dx, dy = x1 - x0, abs(y1 - y0)
  sy = 1 if y1 >= y0 else -1
  if dx >= dy:
    steps = np.arange(dx + 1)
    xs = x0 + steps
    ys = y0 + sy * ((2 * steps * dy + dx - 1) // (2 * dx)) if dx else np.full(1, y0)
  else:
    steps = np.arange(dy + 1)
    xs = x0 + (2 * steps * dx + dy - 1) // (2 * dy)
    ys = y0 + sy * steps
  height, width = mask.shape
  keep = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
  mask[ys[keep], xs[keep]] = value


def _fill_polygon(mask: np.ndarray, pts: np.ndarray, value: int) -> None:
  """Even-odd scanline fill of an integer polygon over pixel centres, exact in integers.

  Pixels exactly on an edge are decided by the outline drawn afterwards, so only the
  spans strictly between crossings matter: [ceil(left), floor(right)] per pair.
  """
  height, width = mask.shape
  x0, y0 = pts[:, 0], pts[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  for y in range(max(int(y0.min()), 0), min(int(y0.max()), height - 1) + 1):
    crossing = ((y0 <= y) & (y < y1)) | ((y1 <= y) & (y < y0))  # Half-open in y.
    if not crossing.any():
      continue
    a0, b0, a1, b1 = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
    den = b1 - b0
    num = a0 * den + (y - b0) * (a1 - a0)  # crossing x = num / den
    num, den = np.where(den < 0, -num, num), np.abs(den)
    order = np.argsort(num / den, kind="stable")
    num, den = num[order], den[order]
    for left in range(0, len(num) - 1, 2):
      lo = max(-(-num[left] // den[left]), 0)
      hi = min(num[left + 1] // den[left + 1], width - 1)
      if lo <= hi:
        mask[y, lo : hi + 1] = value


def draw_shape(mask: np.ndarray, points: np.ndarray, value: int) -> None:
  """Draws one shape as LISA does: `cv2.polylines` (closed, 1 px) then `cv2.fillPoly`.

  Equal to cv2 pixel for pixel when the vertices lie inside the image; cv2 clips a
  segment that leaves the image before walking it, which can move a few border pixels.

  Args:
    mask: uint8 [H, W], drawn in place.
    points: int [N, 2] (x, y), N >= 1: one point is a dot, two a line.
    value: the label to draw.
  """
  if len(points) >= 3:
    _fill_polygon(mask, points, value)
  for i in range(len(points)):
    j = (i + 1) % len(points)
    _draw_line(mask, *(int(v) for v in points[i]), *(int(v) for v in points[j]), value)


def _shape_points(shape: Any, where: str) -> np.ndarray:
  if not isinstance(shape, Mapping) or "points" not in shape or "label" not in shape:
    raise DataError(f"{where}: a shape needs 'label' and 'points', got {str(shape)[:120]}.")
  try:
    points = np.asarray(shape["points"], dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise DataError(f"{where}: points are not [x, y] pairs ({e}).") from e
  if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0 or not np.isfinite(points).all():
    raise DataError(f"{where}: points must be a non-empty list of [x, y], got {shape['points']}.")
  # np.int32 conversion truncates towards zero, as LISA's np.array(..., dtype=np.int32).
  return np.trunc(points).astype(np.int64)


def reasonseg_label(shapes: Sequence[Any], height: int, width: int, name: str) -> np.ndarray:
  """The ReasonSeg label map of one image: 1 target, 255 ignore, 0 background.

  Shapes labelled exactly "flag" are dropped; the others are drawn largest first (area
  counted as drawn; equal areas: the later shape first), so a small shape inside a
  large one stays on top.

  Args:
    shapes: the JSON's "shapes" (each with "label" and "points").
    height, width: the upright image's size.
    name: the file, for errors.

  Returns:
    uint8 [H, W].
  """
  if not isinstance(shapes, list):
    raise DataError(f"ReasonSeg {name}: 'shapes' must be a list.")
  drawn = []
  for index, shape in enumerate(shapes):
    points = _shape_points(shape, f"ReasonSeg {name} shape {index}")
    label = str(shape["label"]).lower()
    if label == DROPPED_LABEL:
      continue
    scratch = np.zeros((height, width), np.uint8)
    draw_shape(scratch, points, 1)
    value = IGNORE_LABEL if "ignore" in label else TARGET_LABEL
    drawn.append((int(scratch.sum()), index, points, value))
  label_map = np.zeros((height, width), np.uint8)
  for _, _, points, value in sorted(drawn, key=lambda d: (d[0], d[1]), reverse=True):
    draw_shape(label_map, points, value)
  return label_map


# ----------------------------------------------------------------------------
# ReasonSeg.
# ----------------------------------------------------------------------------


def read_reasonseg(root: str | os.PathLike, split: str) -> list[dict]:
  """The images of a ReasonSeg split: id, image and JSON paths, texts, is_sentence.

  Every `.jpg` must have its `.json` with a non-empty "text" (a string or a list),
  "is_sentence" and "shapes".
  """
  folder = pathlib.Path(root) / split
  if not folder.is_dir():
    raise FileNotFoundError(f"ReasonSeg split folder not found: {folder}")
  records = []
  for image_path in sorted(folder.glob("*.jpg")):
    json_path = image_path.with_suffix(".json")
    if not json_path.is_file():
      raise DataError(f"ReasonSeg {image_path}: missing {json_path.name}.")
    anno = read_json(json_path)
    missing = [
      k for k in ("text", "is_sentence", "shapes") if not isinstance(anno, dict) or k not in anno
    ]
    if missing:
      raise DataError(f"ReasonSeg {json_path}: lacks {missing}.")
    texts = anno["text"]
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
      raise DataError(f"ReasonSeg {json_path}: 'text' must be a string or a list of strings.")
    records.append(
      {
        "id": image_path.stem,
        "image_path": str(image_path),
        "json_path": str(json_path),
        "texts": list(texts),
        "is_sentence": bool(anno["is_sentence"]),
      }
    )
  if not records:
    raise DataError(f"ReasonSeg split folder {folder} has no .jpg images.")
  return records


def load_reasonseg(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(upright image uint8 [H, W, 3], label map uint8 [H, W]) of one ReasonSeg record."""
  image = read_image(record["image_path"])
  anno = read_json(record["json_path"])
  height, width = image.shape[:2]
  return image, reasonseg_label(anno["shapes"], height, width, record["json_path"])


# ----------------------------------------------------------------------------
# ReasonVOS.
# ----------------------------------------------------------------------------


def _video_entry(videos: Mapping, vid: str, where: str) -> tuple[Mapping, list[str]]:
  entry = videos[vid]
  if not isinstance(entry, Mapping) or "expressions" not in entry:
    raise DataError(f"{where} video {vid!r}: no 'expressions'.")
  frames = entry.get("frames")
  if not isinstance(frames, list) or not frames:
    raise DataError(f"{where} video {vid!r}: 'frames' must be a non-empty list.")
  return entry, [str(f) for f in frames]


def _reasonvos_expressions(entry: Mapping, vid: str, where: str) -> list[dict]:
  """The video's expressions as {obj_id, exp_id, text, is_sent}, from either release."""
  expressions = entry["expressions"]
  out = []
  if isinstance(expressions, list):  # Current release.
    for i, exp in enumerate(expressions):
      missing = [
        k
        for k in ("obj_id", "exp_id", "exp_text", "is_sent")
        if not isinstance(exp, Mapping) or k not in exp
      ]
      if missing:
        raise DataError(f"{where} video {vid!r} expression {i}: lacks {missing}.")
      out.append(
        {
          "obj_id": str(exp["obj_id"]),
          "exp_id": str(exp["exp_id"]),
          "text": str(exp["exp_text"]),
          "is_sent": bool(exp["is_sent"]),
        }
      )
  elif isinstance(expressions, Mapping):  # Before Dec 2024: keyed by expression id.
    for eid, exp in expressions.items():
      if not isinstance(exp, Mapping) or "exp" not in exp or "obj_id" not in exp:
        raise DataError(f"{where} video {vid!r} expression {eid!r}: lacks 'exp' or 'obj_id'.")
      is_sent = exp.get("is_sent", entry.get("is_sent"))
      if is_sent is None:
        raise DataError(f"{where} video {vid!r} expression {eid!r}: no 'is_sent'.")
      out.append(
        {
          "obj_id": str(exp["obj_id"]),
          "exp_id": str(eid),
          "text": str(exp["exp"]),
          "is_sent": bool(is_sent),
        }
      )
  else:
    raise DataError(f"{where} video {vid!r}: 'expressions' must be a list or a dict.")
  return out


def frame_paths(root: str | os.PathLike, record: Mapping) -> list[pathlib.Path]:
  """The JPEGs of a video record's frames, sorted by name; a missing one is an error."""
  folder = pathlib.Path(root) / record["frame_dir"]
  paths = [folder / f"{name}.jpg" for name in sorted(record["frame_names"])]
  absent = [p.name for p in paths if not p.is_file()]
  if absent:
    raise DataError(
      f"{record['id']}: {len(absent)} frame(s) missing in {folder}, e.g. {absent[0]}."
    )
  return paths


def phrase_question(text: str, is_sentence: bool, medium: str) -> str:
  """The question of a query: a sentence as it is, a phrase in VideoLISA's phrase template."""
  return text if is_sentence else f"Please segment the {text.lower()} in this {medium}."


def read_reasonvos(root: str | os.PathLike) -> list[dict]:
  """One record per ReasonVOS expression, in video then file order.

  Record fields: id (`{source}_{video}_{obj_id}_{exp_id}`), video, source, obj_id,
  exp_id, expression, is_sentence, question, frame_names (sorted), frame_dir and
  annotation_dir (relative to `root`).
  """
  root = pathlib.Path(root)
  meta_path = root / "meta_expressions.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"ReasonVOS meta file not found: {meta_path}")
  meta = read_json(meta_path)
  videos = meta.get("videos") if isinstance(meta, Mapping) else None
  if not isinstance(videos, Mapping):
    raise DataError(f"{meta_path}: no 'videos' dict.")
  records, seen = [], set()
  for vid in videos:
    entry, frames = _video_entry(videos, vid, str(meta_path))
    source = entry.get("source")
    if not source:
      raise DataError(f"{meta_path} video {vid!r}: no 'source'.")
    for exp in _reasonvos_expressions(entry, vid, str(meta_path)):
      key = f"{source}_{vid}_{exp['obj_id']}"
      sid = f"{key}_{exp['exp_id']}"
      if sid in seen:
        raise DataError(f"{meta_path} video {vid!r}: expression id {sid!r} appears twice.")
      seen.add(sid)
      records.append(
        {
          "id": sid,
          "video": str(vid),
          "source": str(source),
          "obj_id": exp["obj_id"],
          "exp_id": exp["exp_id"],
          "expression": exp["text"],
          "is_sentence": exp["is_sent"],
          "question": phrase_question(exp["text"], exp["is_sent"], "scene"),
          "frame_names": sorted(frames),
          "frame_dir": f"JPEGImages/{vid}",
          "annotation_dir": f"Annotations/{key}",
        }
      )
  return records


def reasonvos_masks(root: str | os.PathLike, record: Mapping) -> tuple[list[str], np.ndarray]:
  """The scored frames of a ReasonVOS record (its annotation PNGs) and bool masks [T, H, W]."""
  folder = pathlib.Path(root) / record["annotation_dir"]
  paths = sorted(folder.glob("*.png"))
  if not paths:
    raise DataError(f"ReasonVOS {record['id']}: no annotation PNGs in {folder}.")
  masks = [read_nonzero_mask(p) for p in paths]
  if len({m.shape for m in masks}) != 1:
    raise DataError(f"ReasonVOS {record['id']}: annotation PNGs in {folder} differ in size.")
  return [p.stem for p in paths], np.stack(masks)


# ----------------------------------------------------------------------------
# ReVOS.
# ----------------------------------------------------------------------------


def _rle_counts(counts: str | Sequence[int], where: str) -> list[int]:
  """Run lengths from COCO RLE counts: a list as is, or the compressed string.

  The string packs each count in 5-bit groups (ASCII 48 + bits, bit 5 = more
  follows, bit 4 of the last group = sign) and, from the third count on, stores the
  difference from the count two before.
  """
  if not isinstance(counts, str):
    return [int(c) for c in counts]
  out: list[int] = []
  pos = 0
  while pos < len(counts):
    value, shift, more = 0, 0, True
    while more:
      if pos >= len(counts):
        raise DataError(f"{where}: truncated RLE counts string.")
      group = ord(counts[pos]) - 48
      if not 0 <= group < 64:
        raise DataError(f"{where}: bad character {counts[pos]!r} in RLE counts.")
      value |= (group & 0x1F) << shift
      more = bool(group & 0x20)
      pos += 1
      shift += 5
      if not more and group & 0x10:
        value |= -1 << shift
    if len(out) > 2:
      value += out[-2]
    out.append(value)
  return out


def decode_rle(rle: Mapping[str, Any], where: str = "RLE") -> np.ndarray:
  """Decodes a COCO run-length mask {"size": [h, w], "counts": str | list} to bool [h, w].

  Runs alternate background / foreground starting with background, over the pixels in
  column-major order.
  """
  try:
    height, width = (int(v) for v in rle["size"])
    counts = _rle_counts(rle["counts"], where)
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{where}: not a COCO RLE ({e}).") from e
  if any(c < 0 for c in counts) or sum(counts) != height * width:
    raise DataError(
      f"{where}: RLE runs sum to {sum(counts)} (negatives: {any(c < 0 for c in counts)}), "
      f"expected {height} x {width} = {height * width}."
    )
  values = np.zeros(len(counts), dtype=bool)
  values[1::2] = True
  flat = np.repeat(values, counts)
  return flat.reshape(width, height).T


def read_revos(root: str | os.PathLike, split: str) -> list[dict]:
  """One record per ReVOS expression of `meta_expressions_{split}_.json`, in file order.

  Record fields: id (`{video}_{exp_id}`, the official key), video, exp_id, expression,
  type_id, category (referring | reasoning | type2), question, anno_ids, obj_ids,
  frame_names (in the file's order, which indexes mask_dict), frame_dir.
  """
  root = pathlib.Path(root)
  meta_path = root / f"meta_expressions_{split}_.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"ReVOS meta file not found: {meta_path}")
  meta = read_json(meta_path)
  videos = meta.get("videos") if isinstance(meta, Mapping) else None
  if not isinstance(videos, Mapping):
    raise DataError(f"{meta_path}: no 'videos' dict.")
  records = []
  for vid in videos:
    entry, frames = _video_entry(videos, vid, str(meta_path))
    if not isinstance(entry["expressions"], Mapping):
      raise DataError(f"{meta_path} video {vid!r}: 'expressions' must be a dict.")
    for eid, exp in entry["expressions"].items():
      where = f"{meta_path} video {vid!r} expression {eid!r}"
      missing = [
        k for k in ("exp", "anno_id", "type_id") if not isinstance(exp, Mapping) or k not in exp
      ]
      if missing:
        raise DataError(f"{where}: lacks {missing}.")
      anno_ids = exp["anno_id"] if isinstance(exp["anno_id"], list) else [exp["anno_id"]]
      type_id = int(exp["type_id"])
      if type_id not in REVOS_CATEGORIES:
        raise DataError(f"{where}: type_id {type_id} is not one of {sorted(REVOS_CATEGORIES)}.")
      obj_ids = exp.get("obj_id", [])
      records.append(
        {
          "id": f"{vid}_{eid}",
          "video": str(vid),
          "exp_id": str(eid),
          "expression": str(exp["exp"]),
          "type_id": type_id,
          "category": REVOS_CATEGORIES[type_id],
          "question": str(exp["exp"]),
          "anno_ids": [str(a) for a in anno_ids],
          "obj_ids": [str(o) for o in (obj_ids if isinstance(obj_ids, list) else [obj_ids])],
          "frame_names": frames,
          "frame_dir": f"JPEGImages/{vid}",
        }
      )
  return records


def read_revos_mask_dict(root: str | os.PathLike) -> dict:
  """`mask_dict.json`: {anno_id: [RLE or null per frame of its video]}."""
  path = pathlib.Path(root) / "mask_dict.json"
  if not path.is_file():
    raise FileNotFoundError(f"ReVOS mask file not found: {path}")
  masks = read_json(path)
  if not isinstance(masks, dict):
    raise DataError(f"{path}: expected a dict of anno_id -> per-frame RLE list.")
  return masks


def revos_masks(
  root: str | os.PathLike, record: Mapping, mask_dict: Mapping
) -> tuple[list[str], np.ndarray]:
  """Every frame of a ReVOS record and its masks bool [T, H, W]: the union over anno_ids.

  Frames come back sorted by name; the i-th RLE of an anno_id belongs to the i-th
  frame of the file's list.
  """
  names = list(record["frame_names"])
  per_frame: list[np.ndarray | None] = [None] * len(names)
  for aid in record["anno_ids"]:
    where = f"ReVOS {record['id']} anno_id {aid}"
    rles = mask_dict.get(aid)
    if not isinstance(rles, list) or len(rles) != len(names):
      got = "missing" if rles is None else f"{len(rles) if isinstance(rles, list) else type(rles)}"
      raise DataError(f"{where}: mask_dict needs one entry per frame ({len(names)}), got {got}.")
    for i, rle in enumerate(rles):
      if rle:
        mask = decode_rle(rle, f"{where} frame {names[i]}")
        if per_frame[i] is not None and per_frame[i].shape != mask.shape:
          raise DataError(f"{where} frame {names[i]}: masks differ in size.")
        per_frame[i] = mask if per_frame[i] is None else per_frame[i] | mask
  shapes = {m.shape for m in per_frame if m is not None}
  if len(shapes) > 1:
    raise DataError(f"ReVOS {record['id']}: masks differ in size across frames: {sorted(shapes)}.")
  if shapes:
    (shape,) = shapes
  else:  # No annotation anywhere (e.g. a no-target expression): size from the first frame.
    shape = read_image(pathlib.Path(root) / record["frame_dir"] / f"{names[0]}.jpg").shape[:2]
  masks = np.stack([np.zeros(shape, bool) if m is None else m for m in per_frame])
  order = np.argsort(names, kind="stable")
  return [names[i] for i in order], masks[order]
