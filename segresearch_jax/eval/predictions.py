"""Evaluation after the rollout: responses → prediction records → masks → J&F (docs/method.md §7, §9).

This is the host side of evaluation and knows nothing about the policy:

1. `parse_response` turns one decoded response into a `Prediction` (the fields of one
   line of `predictions.jsonl`); `write_predictions` / `read_predictions` store them.
2. `load_eval_samples` lists the samples of an OK-VOS split with every frame and the
   annotation folder (the raw layout of docs/method.md §4.1).
3. `evaluate_predictions` prompts a video segmenter with each prediction, writes the
   masks as PNGs, scores J and F on every annotated frame and writes `results.json`,
   a printed table and (optionally) the HTML report.

Which answer is used: the FIRST `<keyframe>` tag and the FIRST `<answer>` tag, the pair
the training reward scores (docs/differences.md; the official validation reward reads the last
keyframe tag). Answers may span several lines. The "no target" answer (keyframe -1, or
an all-zero box and point) predicts an empty mask. A sample with no prediction, an
unparseable answer or a keyframe that is not a frame of the video also gets empty
masks and is scored, never skipped (the official script skips missing samples).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from segresearch_jax import protocol
from segresearch_jax.agent import records
from segresearch_jax.data import okvos
from segresearch_jax.eval import metrics, reports
from segresearch_jax.segmentation import video

# A video segmenter: (frames uint8 [T, H, W, 3], keyframe index, box [x1, y1, x2, y2]
# in pixels, point [x, y] in pixels) -> bool [T, H, W].
VideoSegmentFn = Callable[[np.ndarray, int, Sequence[float], Sequence[float]], np.ndarray]

# Why a sample was scored with empty masks; "ok" means the segmenter was prompted.
STATUS_OK = "ok"
STATUS_NO_TARGET = "no_target"
STATUS_MISSING = "missing"
STATUS_NO_KEYFRAME = "no_keyframe"
STATUS_NO_ANSWER = "no_answer"
STATUS_BAD_KEYFRAME = "bad_keyframe"
# The sample's data is broken (it could not be prepared, or a frame or mask of its
# video cannot be read): scored 0 and listed with the reason, never skipped.
STATUS_FAILED = "failed"

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
MASKS_DIR = "masks"

_NEXT_ACTION_RE = re.compile(r"<(?:search|keyframe|answer|thinking)>")
_RESULT_RE = re.compile(r"(?:^|\n)(\d+)\. \(Title: ([^\n]*?)\) ?")
_ERROR_RE = re.compile(r"Error: ([^\n<]*)")


# ----------------------------------------------------------------------------
# Prediction records.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Prediction:
  """One sample's parsed response: a line of predictions.jsonl.

  Attributes:
    id: the sample id.
    ability: in-video | one-hop | multi-hop | relational.
    response: the decoded response, observations included.
    keyframe: the number of the FIRST `<keyframe>` (a frame NUMBER, not an index;
      -1 = "no target"), or None when there is none.
    box: [x1, y1, x2, y2] of the first `<answer>`, in the policy's coordinate
      convention (Qwen3-VL: 0-1000), or None when absent or unparseable.
    point: [x, y] of that answer, or None.
    no_target: the model said the target is absent (keyframe -1 or the all-zero answer).
    search_calls: per `<search>`, in order: {"tool", "query", "error", "results"};
      results are dicts ({"title", "text"} for text search, {"name", ...} for images).
    stop_reason: the rollout's stop reason (finished | max_turns | max_length | empty).
    error: why the answer cannot prompt a segmenter ("no_keyframe" | "no_answer"), or
      None when it can (or when it is a "no target" answer).
    reward: optional reward terms of this response, e.g. {"score": 3.0, ...}.
    failure: why the sample was never rolled out (its data could not be prepared);
      such a record has an empty response and is scored 0 (`failed_prediction`).
  """

  id: str
  ability: str
  response: str
  keyframe: int | None = None
  box: list[float] | None = None
  point: list[float] | None = None
  no_target: bool = False
  search_calls: list[dict] = dataclasses.field(default_factory=list)
  stop_reason: str | None = None
  error: str | None = None
  reward: dict[str, float] | None = None
  failure: str | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Prediction:
    missing = [k for k in ("id", "ability", "response") if k not in d]
    if missing:
      raise ValueError(f"Prediction record lacks {missing}: {str(dict(d))[:200]}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _clean(text: str) -> str:
  for token in protocol.SPECIAL_TOKENS:
    text = text.replace(token, "")
  return text.strip()


def _parse_results(information: str) -> list[dict]:
  """`1. (Title: T) text` entries of an observation; an `<image>` body is an image hit."""
  starts = list(_RESULT_RE.finditer(information))
  results = []
  for i, m in enumerate(starts):
    end = starts[i + 1].start() if i + 1 < len(starts) else len(information)
    body = information[m.end() : end].strip()
    if body == protocol.IMAGE_PLACEHOLDER:
      results.append({"name": m.group(2)})
    else:
      results.append({"title": m.group(2), "text": body})
  return results


def search_calls_from_response(response: str) -> list[dict]:
  """The search calls of a response and what came back, read from its text.

  The observation of a search is the text between its `</search>` and the next action
  or thinking tag: an `<information>` block (results) or an `Error: …` line. A search
  on the last allowed generation is never executed and has neither.
  """
  calls = []
  # Tags found in linear time: a response full of unclosed tags is model output too.
  for end, content in protocol.iter_tags(response, "search"):
    action = protocol.parse_search(content)
    nxt = _NEXT_ACTION_RE.search(response, end)
    after = response[end : nxt.start() if nxt else len(response)]
    info = protocol.first_tag(after, ("information",))
    error = action.error
    results: list[dict] = []
    if info is not None:
      results = _parse_results(_clean(info[1]))
    elif error is None:
      err = _ERROR_RE.search(after)
      error = err.group(1).strip() if err else None
    calls.append({"tool": action.tool, "query": action.query, "error": error, "results": results})
  return calls


def _calls_from_records(tool_calls: Iterable[Mapping | Any]) -> list[dict]:
  """Search calls from the bridge's call records (dicts or `bridge.CallRecord`s)."""
  calls = []
  for rec in tool_calls:
    rec = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else dict(rec)
    if rec.get("action") != "search":
      continue
    calls.append(
      {
        "tool": rec.get("tool"),
        "query": rec.get("query"),
        "error": rec.get("error"),
        "results": list(rec.get("results") or []),
      }
    )
  return calls


def parse_response(
  sample_id: str,
  ability: str,
  response: str,
  *,
  stop_reason: str | None = None,
  tool_calls: Iterable[Mapping | Any] | None = None,
  reward: Mapping[str, float] | None = None,
) -> Prediction:
  """Parses one decoded response into a prediction record (see the module docstring).

  Args:
    sample_id, ability: the sample's id and ability.
    response: the decoded response (observations included; special tokens may be kept).
    stop_reason: the rollout's stop reason, if known.
    tool_calls: the bridge's call records for this row; when given they are the search
      calls (with the exact results), otherwise the calls are read from the text.
    reward: the reward terms, if computed.
  """
  if not isinstance(response, str):
    raise TypeError(f"Sample {sample_id}: response must be a string, got {type(response)}.")
  keyframe = protocol.first_keyframe(response)
  answer = protocol.parse_answer(response)
  box = [float(v) for v in answer.bbox_2d] if answer is not None else None
  point = [float(v) for v in answer.point_2d] if answer is not None else None
  no_target = keyframe == protocol.NO_TARGET_KEYFRAME or (
    answer is not None and answer.is_no_target
  )
  error = None
  if not no_target:
    if keyframe is None:
      error = STATUS_NO_KEYFRAME
    elif answer is None:
      error = STATUS_NO_ANSWER
  calls = (
    _calls_from_records(tool_calls)
    if tool_calls is not None
    else search_calls_from_response(response)
  )
  return Prediction(
    id=str(sample_id),
    ability=str(ability),
    response=response,
    keyframe=keyframe,
    box=box,
    point=point,
    no_target=no_target,
    search_calls=calls,
    stop_reason=stop_reason,
    error=error,
    reward={k: float(v) for k, v in reward.items()} if reward is not None else None,
  )


def failed_prediction(
  sample_id: str, ability: str, failure: str, reward_terms: Iterable[str] = ()
) -> Prediction:
  """The record of a sample that could not be rolled out: no answer, every reward
  term in `reward_terms` 0, and the reason, so evaluation scores it 0 and lists it."""
  return Prediction(
    id=str(sample_id),
    ability=str(ability),
    response="",
    error=STATUS_FAILED,
    reward={k: 0.0 for k in reward_terms},
    failure=str(failure),
  )


def write_predictions(path: str | os.PathLike, predictions: Iterable[Prediction]) -> pathlib.Path:
  """Writes one JSON line per prediction (atomically: a temp file then a rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for p in predictions:
      f.write(records.json_line(_as_prediction(p).to_json()) + "\n")
  tmp.replace(path)
  return path


def read_predictions(path: str | os.PathLike) -> list[Prediction]:
  """Reads predictions.jsonl; a broken line raises with its line number."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        out.append(Prediction.from_json(json.loads(line)))
      except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"{path}:{n}: not a prediction record ({e}).") from e
  return out


def _as_prediction(p: Prediction | Mapping) -> Prediction:
  return p if isinstance(p, Prediction) else Prediction.from_json(p)


# ----------------------------------------------------------------------------
# Samples.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSample:
  """What evaluation needs of one sample: every frame of its video and its masks.

  Attributes:
    id, ability, question: as in the split file.
    frame_paths: every frame of the video, in frame-number order (the segmenter's input).
    frame_numbers: their numbers (file stems as ints), in the same order.
    annotation_dir: the folder of the object's palette PNGs; every PNG there is an
      annotated (scored) frame.
  """

  id: str
  ability: str
  question: str
  frame_paths: tuple[str, ...]
  frame_numbers: tuple[int, ...]
  annotation_dir: str
  error: str | None = None  # Why the row cannot be evaluated (scored 0), if it cannot.


def load_eval_samples(okvos_dir: str | os.PathLike, split: str = "test") -> list[EvalSample]:
  """The samples of an OK-VOS split in the raw layout (docs/method.md §4.1), in parquet
  order; a row whose frame list cannot be read is kept with its `error`."""
  samples = []
  for index, row in enumerate(okvos.read_rows(okvos_dir, split)):
    sid = okvos.sample_id(row, split, index)
    try:
      samples.append(_eval_sample(okvos_dir, split, row, sid))
    except (okvos.DataError, TypeError, ValueError) as e:
      message = str(e) if str(e).startswith(f"Sample {sid}:") else f"Sample {sid}: {e}"
      samples.append(
        EvalSample(
          id=sid,
          ability=str(row.get("ability")),
          question=str(row.get("question")),
          frame_paths=(),
          frame_numbers=(),
          annotation_dir="",
          error=message,
        )
      )
  return samples


def _eval_sample(okvos_dir: str | os.PathLike, split: str, row: Mapping, sid: str) -> EvalSample:
  for col in okvos.REQUIRED_COLUMNS:
    if row.get(col) is None:
      raise okvos.DataError(f"Sample {sid}: column {col!r} is empty.")
  names = row["images"]
  if isinstance(names, str):  # Some exports store the list as a JSON string.
    names = json.loads(names)
  # Video order is by frame number (as SAM2 orders a frame folder); for the
  # zero-padded names of OK-VOS this is also the name order.
  names = sorted((str(n) for n in names), key=okvos.frame_number)
  if not names:
    raise okvos.DataError(f"Sample {sid}: the images list is empty.")
  base = pathlib.Path(okvos_dir) / split
  frame_dir = base / "JPEGImages" / str(row["video"])
  return EvalSample(
    id=sid,
    ability=str(row["ability"]),
    question=str(row["question"]),
    frame_paths=tuple(str(frame_dir / f"{n}.jpg") for n in names),
    frame_numbers=tuple(okvos.frame_number(n) for n in names),
    annotation_dir=str(base / "Annotations" / str(row["video"]) / str(row["oid"])),
  )


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def safe_name(sample_id: str) -> str:
  """A file-system-safe folder name for a sample id."""
  name = re.sub(r"[^A-Za-z0-9._-]", "_", str(sample_id))
  return name if name not in ("", ".", "..") else f"_{name}"


def _write_mask_png(path: pathlib.Path, mask: np.ndarray) -> None:
  # 0/255 grayscale reads the same as a palette index 255 (okvos.read_mask accepts
  # both) and as the official evaluator's grayscale read.
  Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def _read_frames(paths: Sequence[str]) -> np.ndarray:
  frames = [okvos.read_frame(p) for p in paths]
  shapes = {f.shape for f in frames}
  if len(shapes) != 1:
    raise okvos.DataError(f"Frames of one video differ in size: {sorted(shapes)}.")
  return np.stack(frames)


def _mean_terms(records: Iterable[Mapping[str, float] | None]) -> dict[str, float]:
  sums: dict[str, list[float]] = {}
  for rec in records:
    for k, v in (rec or {}).items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        sums.setdefault(k, []).append(float(v))
  return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def _segmenter_name(fn: Callable) -> str:
  """A readable name for the segmenter (e.g. SAM2's config and checkpoint), for results."""
  segmenter = (getattr(fn, "keywords", None) or {}).get("segmenter", fn)
  return str(getattr(segmenter, "name", getattr(segmenter, "__name__", type(segmenter).__name__)))


def _segment(
  sample: EvalSample,
  pred: Prediction,
  video_segment_fn: VideoSegmentFn,
  convention: str,
  resized: tuple[int, int] | None,
) -> tuple[np.ndarray, dict]:
  """Prompts the segmenter with one prediction: bool masks [T_video, H, W] and details."""
  frames = _read_frames(sample.frame_paths)
  num_frames, height, width = frames.shape[:3]
  keyframe_index = video.keyframe_index(sample.frame_numbers, pred.keyframe)
  resized_w, resized_h = resized if resized is not None else (None, None)
  box_px, point_px = video.to_pixels(
    pred.box, pred.point, convention, width, height, resized_w, resized_h
  )
  box_px, point_px = box_px.tolist(), point_px.tolist()
  masks = np.asarray(video_segment_fn(frames, keyframe_index, box_px, point_px))
  if masks.shape != (num_frames, height, width):
    raise ValueError(
      f"Sample {sample.id}: the segmenter returned shape {masks.shape}, expected "
      f"{(num_frames, height, width)} (one mask per frame at the original size)."
    )
  info = {"keyframe_index": keyframe_index, "box_px": box_px, "point_px": point_px}
  return masks.astype(bool, copy=False), info


def evaluate_predictions(
  predictions: Sequence[Prediction | Mapping],
  samples: Sequence[EvalSample],
  video_segment_fn: VideoSegmentFn,
  convention: str,
  out_dir: str | os.PathLike,
  *,
  resized: tuple[int, int] | None = None,
  bound_th: float = metrics.DEFAULT_BOUND_TH,
  report: bool = True,
  report_samples: int | None = 200,
  print_table: bool = True,
) -> dict[str, Any]:
  """Segments, scores and records every sample of a split.

  For each sample: read the annotated frames' GT masks at the original resolution;
  unless the prediction is missing, unusable or "no target", read every frame, map the
  keyframe NUMBER to its index in the sorted frame list, convert the box and point to
  pixels and call the segmenter once; write the masks of the annotated frames as PNGs
  (`out_dir/masks/<id>/<frame>.png`, 0/255); score J and F per annotated frame.

  Args:
    predictions: `Prediction`s or their JSON dicts (see `Prediction`), at most one per
      sample id; predictions for ids not in `samples` are an error.
    samples: the split's samples (`load_eval_samples`).
    video_segment_fn: (frames uint8 [T, H, W, 3], keyframe index, box [x1, y1, x2, y2]
      pixels, point [x, y] pixels) -> bool [T, H, W], e.g.
      `functools.partial(video.segment_video, segmenter=video.from_config(config.eval))`
      (SAM2's video predictor prompted with box and point, or the weight-free one).
    convention: the policy's coordinates: "norm1000" (Qwen3-VL) or "abs_resized"
      (Qwen2.5-VL, with `resized`).
    out_dir: where masks/, results.json and report.html go.
    resized: (new_w, new_h) of the keyframe image the policy saw, for "abs_resized".
    bound_th: the F-measure's boundary threshold.
    report: also write the HTML report (`reports.write_html_report`).
    report_samples: at most this many cards in the report (None: all).
    print_table: print the results table.

  Returns:
    The results dict also written to `out_dir/results.json`: "summary" (per ability
    and overall J, F, J&F, as `metrics.okvos_summary`), "per_sample" (one record per
    sample: id, ability, question, status, error, keyframe, keyframe_index, box /
    point in the policy convention and in pixels, J, F, JF, per-frame J and F, frame
    names, search calls, stop reason, reward), "status_counts", "reward" (mean reward
    terms over predictions that have them), "search" (mean calls per sample), "config".
  """
  if convention not in okvos.CONVENTIONS:
    raise ValueError(
      f"Unknown coordinate convention {convention!r}; expected one of {okvos.CONVENTIONS}."
    )
  if convention == "abs_resized" and resized is None:
    raise ValueError("The abs_resized convention needs resized=(new_w, new_h).")
  out = pathlib.Path(out_dir)
  (out / MASKS_DIR).mkdir(parents=True, exist_ok=True)
  preds = [_as_prediction(p) for p in predictions]
  by_id: dict[str, Prediction] = {}
  for p in preds:
    if p.id in by_id:
      raise ValueError(f"Two predictions for sample {p.id!r}.")
    by_id[p.id] = p
  sample_ids = {s.id for s in samples}
  if len(sample_ids) != len(samples):
    raise ValueError("Sample ids are not unique.")
  unknown = sorted(set(by_id) - sample_ids)
  if unknown:
    raise ValueError(f"Predictions for ids not in the split: {unknown[:5]}.")
  if len({safe_name(s.id) for s in samples}) != len(samples):
    raise ValueError("Two sample ids map to the same mask folder name; rename them.")

  per_sample = []
  for sample in samples:
    pred = by_id.get(sample.id)
    try:
      per_sample.append(
        _evaluate_sample(sample, pred, video_segment_fn, convention, resized, bound_th, out)
      )
    except okvos.DataError as e:  # Broken data scores 0, listed with the reason.
      per_sample.append(_failed_record(sample, pred, str(e), out))
    logging.info("Evaluated %s: %s J&F %.3f", sample.id, *map(per_sample[-1].get, ("status", "JF")))

  status_counts: dict[str, int] = {}
  for r in per_sample:
    status_counts[r["status"]] = status_counts.get(r["status"], 0) + 1
  failures = [
    {"id": r["id"], "error": r["error"]} for r in per_sample if r["status"] == STATUS_FAILED
  ]
  abilities = metrics.OKVOS_ABILITIES
  if any(r["ability"] not in abilities for r in per_sample):
    abilities = (*abilities, UNKNOWN_ABILITY)
  results = {
    "summary": metrics.okvos_summary(per_sample, abilities=abilities),
    "status_counts": status_counts,
    "failures": failures,
    "reward": _mean_terms(p.reward for p in preds),
    "search": {"per_sample": float(np.mean([r["num_search"] for r in per_sample]))},
    "config": {
      "convention": convention,
      "resized": resized,
      "bound_th": bound_th,
      "segmenter": _segmenter_name(video_segment_fn),
    },
    "per_sample": per_sample,
  }
  tmp = out / (RESULTS_FILE + ".tmp")
  tmp.write_text(records.json_line(results, indent=1), encoding="utf-8")
  tmp.replace(out / RESULTS_FILE)
  if print_table:
    print(format_results(results))
  if report:
    reports.write_html_report(results, out, predictions=preds, max_samples=report_samples)
  return results


# A failed sample whose ability column is unusable is summarised under this name.
UNKNOWN_ABILITY = "unknown"


def _base_record(sample: EvalSample, pred: Prediction | None) -> dict[str, Any]:
  return {
    "id": sample.id,
    "ability": sample.ability if sample.ability in metrics.OKVOS_ABILITIES else UNKNOWN_ABILITY,
    "question": sample.question,
    "frame_paths": list(sample.frame_paths),
    "frame_numbers": list(sample.frame_numbers),
    "annotation_dir": sample.annotation_dir,
    "annotated_frames": [],
    "annotated_numbers": [],
    "keyframe": pred.keyframe if pred else None,
    "keyframe_index": None,
    "box": pred.box if pred else None,
    "point": pred.point if pred else None,
    "box_px": None,
    "point_px": None,
    "search_calls": pred.search_calls if pred else [],
    "stop_reason": pred.stop_reason if pred else None,
    "reward": pred.reward if pred else None,
  }


def _failed_record(
  sample: EvalSample, pred: Prediction | None, error: str, out: pathlib.Path
) -> dict[str, Any]:
  """A sample that cannot be scored from its data: J = F = 0, no masks, the reason."""
  record = _base_record(sample, pred)
  record.update(
    status=STATUS_FAILED,
    error=error,
    missing=False,
    mask_dir=str((out / MASKS_DIR / safe_name(sample.id)).relative_to(out)),
    J=0.0,
    F=0.0,
    JF=0.0,
    J_per_frame=[],
    F_per_frame=[],
    num_search=len(record["search_calls"]),
  )
  return record


def _evaluate_sample(
  sample: EvalSample,
  pred: Prediction | None,
  video_segment_fn: VideoSegmentFn,
  convention: str,
  resized: tuple[int, int] | None,
  bound_th: float,
  out: pathlib.Path,
) -> dict[str, Any]:
  """One sample's record (see `evaluate_predictions`); raises `okvos.DataError` when
  its data is broken (the caller scores it 0)."""
  if sample.error is not None:
    raise okvos.DataError(sample.error)
  if pred is not None and pred.failure is not None:
    raise okvos.DataError(pred.failure)
  try:
    numbers, gt = okvos.read_video_masks(sample.annotation_dir)
  except okvos.DataError as e:
    raise okvos.DataError(f"Sample {sample.id}: {e}") from e
  names = [p.stem for p in sorted(pathlib.Path(sample.annotation_dir).glob("*.png"))]
  record = _base_record(sample, pred)
  record.update(annotated_frames=names, annotated_numbers=[int(n) for n in numbers])
  video_masks = None
  if pred is None:
    status, error = STATUS_MISSING, "no prediction for this sample"
  elif pred.no_target:
    status, error = STATUS_NO_TARGET, None
  elif pred.error is not None:
    status, error = pred.error, pred.error.replace("_", " ")
  elif video.keyframe_index(sample.frame_numbers, pred.keyframe) < 0:
    status = STATUS_BAD_KEYFRAME
    error = f"keyframe {pred.keyframe} is not a frame of the video"
  else:
    status, error = STATUS_OK, None
    video_masks, info = _segment(sample, pred, video_segment_fn, convention, resized)
    record.update(info)
  if video_masks is not None and video_masks.shape[1:] != gt.shape[1:]:
    raise okvos.DataError(
      f"Sample {sample.id}: frames are {video_masks.shape[1:]} but annotations "
      f"{gt.shape[1:]} in {sample.annotation_dir}."
    )
  # Annotated frames outside the video's frame list get an empty prediction.
  index = {n: i for i, n in enumerate(sample.frame_numbers)}
  pred_masks = np.zeros_like(gt)
  if video_masks is not None:
    for k, n in enumerate(numbers):
      if n in index:
        pred_masks[k] = video_masks[index[n]]
  mask_dir = out / MASKS_DIR / safe_name(sample.id)
  mask_dir.mkdir(parents=True, exist_ok=True)
  for name, mask in zip(names, pred_masks):
    _write_mask_png(mask_dir / f"{name}.png", mask)
  j, f = metrics.j_and_f(gt, pred_masks, bound_th)
  record.update(
    status=status,
    error=error,
    missing=status == STATUS_MISSING,
    mask_dir=str(mask_dir.relative_to(out)),
    J=float(j.mean()),
    F=float(f.mean()),
    JF=float((j.mean() + f.mean()) / 2),
    J_per_frame=[float(v) for v in j],
    F_per_frame=[float(v) for v in f],
    num_search=len(record["search_calls"]),
  )
  return record


def format_results(results: Mapping[str, Any]) -> str:
  """The printed table: J, F, J&F per ability and overall, then counts and rewards."""
  lines = [metrics.format_summary(results["summary"], "OK-VOS (percent)")]
  counts = ", ".join(f"{k} {v}" for k, v in sorted(results["status_counts"].items()))
  lines.append(f"samples by status: {counts}")
  lines.append(f"search calls per sample: {results['search']['per_sample']:.2f}")
  for failure in results.get("failures") or []:
    lines.append(f"failed (scored 0): {failure['id']}: {failure['error']}")
  if results.get("reward"):
    lines.append(
      "mean reward terms: " + ", ".join(f"{k} {v:.3f}" for k, v in results["reward"].items())
    )
  return "\n".join(lines)
