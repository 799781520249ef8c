r"""Evaluation on ReasonSeg, ReasonVOS and ReVOS with their official tables (docs/method.md §4.3).

    python -m segresearch_jax.evaluate --config=configs/okvos.py:paper,reasonvos \
        --config.data.reasonvos_dir=/data/ReasonVOS --config.search.kb_dir=/data/local_KB \
        --checkpoint=runs/okvos/checkpoints

The policy side is OK-VOS's: greedy episodes over prompts made by the same pipeline,
prediction records, the configured video segmenter prompted on the keyframe, masks
scored by `eval.predictions.evaluate_predictions`. What differs per benchmark:

1. `prepare_samples` reads the raw layout (`data.reasoning`) and writes what the shared
   pieces read under `out/benchmark/`: the ground truth of every scored frame as a 0/255
   PNG, and for ReasonSeg the upright photo as a one-frame "video" (frame 0) and its
   label map (1 target, 255 ignore). ReasonSeg uses the first text of each image, as
   LISA's validation does; a phrase query (not is_sentence) is put in VideoLISA's
   phrase template ("Please segment the {phrase} in this scene / image.").
2. `score_predictions` runs the shared evaluation, then the benchmark's table:
   - ReasonSeg: gIoU / cIoU (ignore regions left out) of short queries, long
     (is_sentence) queries and all; LISA's +1e-5 / +1e-10 in the denominators is left
     out (an empty union is handled explicitly);
   - ReasonVOS: mean J, F and J&F over expressions, each a mean over its annotated frames;
   - ReVOS: J, F, J&F of referring (type 0) and reasoning (type 1) expressions, each a
     mean over every frame of the video, and their average; type 2 is not in the table.
     VISA rounds each expression's percentages to 2 decimals before averaging; we do not.
   A sample without a usable answer scores empty masks, never skipped (the official
   scripts skip or zero them).
3. The table is printed, stored in results.json ("benchmark") and put at the top of the
   HTML report (`eval.reports`).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from segresearch_jax.data import okvos, reasoning
from segresearch_jax.eval import metrics, reports
from segresearch_jax.eval import predictions as predictions_lib

# The reasoning benchmarks have no OK-VOS ability; they get the search prompt and the
# policy decides whether to search.
PROMPT_ABILITY = "one-hop"
BENCHMARK_DIR = "benchmark"


@dataclasses.dataclass(frozen=True)
class BenchmarkSample:
  """One query of a benchmark, ready for the shared evaluation.

  Attributes:
    sample: every frame of the video (ReasonSeg: the one upright image) and the folder
      of its written ground-truth PNGs (the scored frames).
    category: the table row: short | long (ReasonSeg), reasonvos, referring |
      reasoning | type2 (ReVOS).
    video: the video (ReasonSeg: the image) id.
    oid: the object id(s).
    mask_names: per frame of `sample.frame_paths`, the name its ground-truth PNG has
      (or would have) in `sample.annotation_dir`.
    is_sentence: whether the query is a sentence (ReasonSeg's long queries).
    label_path: ReasonSeg only: the label map PNG (0, 1 target, 255 ignore).
  """

  sample: predictions_lib.EvalSample
  category: str
  video: str
  oid: str
  mask_names: tuple[str, ...]
  is_sentence: bool = False
  label_path: str | None = None


# ----------------------------------------------------------------------------
# Samples.
# ----------------------------------------------------------------------------


def _save_mask(path: pathlib.Path, mask: np.ndarray) -> None:
  # 0/255 grayscale: what okvos.read_mask (and so the shared evaluation) reads as target.
  Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def _names_and_numbers(names: Sequence[str]) -> tuple[list[str], list[int]]:
  """Ground-truth PNG names and frame numbers of a video's sorted frames.

  Numbered frames keep their names; otherwise frames are numbered by position and the
  PNGs named after that number (the shared evaluation reads numbers from PNG names).
  """
  numbers = reasoning.frame_numbers(names)
  positional = numbers == list(range(len(names))) and any(
    not pathlib.PurePath(n).stem.isdigit() for n in names
  )
  return ([f"{n:06d}" for n in numbers] if positional else list(names)), numbers


def _video_sample(
  root: pathlib.Path,
  out: pathlib.Path,
  record: Mapping[str, Any],
  scored_names: Sequence[str],
  masks: np.ndarray,
  category: str,
  oid: str,
) -> BenchmarkSample:
  names = sorted(record["frame_names"])
  mask_names, numbers = _names_and_numbers(names)
  paths = reasoning.frame_paths(root, record)
  index = {n: i for i, n in enumerate(names)}
  unknown = [n for n in scored_names if n not in index]
  if unknown:
    raise okvos.DataError(f"{record['id']}: annotated frames {unknown[:3]} are not video frames.")
  gt_dir = out / "gt" / predictions_lib.safe_name(record["id"])
  gt_dir.mkdir(parents=True, exist_ok=True)
  for name, mask in zip(scored_names, masks):
    _save_mask(gt_dir / f"{mask_names[index[name]]}.png", mask)
  sample = predictions_lib.EvalSample(
    id=record["id"],
    ability=PROMPT_ABILITY,
    question=record["question"],
    frame_paths=tuple(str(p) for p in paths),
    frame_numbers=tuple(numbers),
    annotation_dir=str(gt_dir),
  )
  return BenchmarkSample(
    sample=sample,
    category=category,
    video=record["video"],
    oid=oid,
    mask_names=tuple(mask_names),
    is_sentence=bool(record.get("is_sentence", True)),
  )


def _reasonseg_samples(root: pathlib.Path, split: str, out: pathlib.Path) -> list[BenchmarkSample]:
  samples = []
  for record in reasoning.read_reasonseg(root, split):
    image, label = reasoning.load_reasonseg(record)
    name = predictions_lib.safe_name(record["id"])
    frame_dir, gt_dir = out / "frames" / name, out / "gt" / name
    frame_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    # The upright photo, lossless: every later reader sees the pixels the label matches.
    Image.fromarray(image).save(frame_dir / "0.png")
    _save_mask(gt_dir / "0.png", label == reasoning.TARGET_LABEL)
    label_path = out / "labels" / f"{name}.png"
    Image.fromarray(label, mode="L").save(label_path)
    is_sentence = record["is_sentence"]
    sample = predictions_lib.EvalSample(
      id=record["id"],
      ability=PROMPT_ABILITY,
      question=reasoning.phrase_question(record["texts"][0], is_sentence, "image"),
      frame_paths=(str(frame_dir / "0.png"),),
      frame_numbers=(0,),
      annotation_dir=str(gt_dir),
    )
    samples.append(
      BenchmarkSample(
        sample=sample,
        category="long" if is_sentence else "short",
        video=record["id"],
        oid="0",
        mask_names=("0",),
        is_sentence=is_sentence,
        label_path=str(label_path),
      )
    )
  return samples


def prepare_samples(
  benchmark: str, root: str | os.PathLike, split: str, out_dir: str | os.PathLike
) -> list[BenchmarkSample]:
  """Reads a benchmark split and writes its ground truth under `out_dir` (see step 1).

  Args:
    benchmark: reasonseg | reasonvos | revos.
    root: the raw folder as released.
    split: ReasonSeg: train | val | test; ReVOS: train | valid; ReasonVOS has one
      (ignored).
    out_dir: where frames/, gt/ and labels/ are written.
  """
  root, out = pathlib.Path(root), pathlib.Path(out_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"The {benchmark} folder {root} does not exist.")
  if benchmark == "reasonseg":
    return _reasonseg_samples(root, split, out)
  if benchmark == "reasonvos":
    samples = []
    for record in reasoning.read_reasonvos(root):
      names, masks = reasoning.reasonvos_masks(root, record)
      samples.append(_video_sample(root, out, record, names, masks, "reasonvos", record["obj_id"]))
    return samples
  if benchmark == "revos":
    mask_dict = reasoning.read_revos_mask_dict(root)
    samples = []
    for record in reasoning.read_revos(root, split):
      names, masks = reasoning.revos_masks(root, record, mask_dict)
      oid = ",".join(record["obj_ids"])
      samples.append(_video_sample(root, out, record, names, masks, record["category"], oid))
    return samples
  raise ValueError(f"Unknown benchmark {benchmark!r}; expected one of {reasoning.BENCHMARKS}.")


class PromptSource:
  """A random-access source of the pipeline's raw samples (as `okvos.load_example` makes).

  The shown frames are the test split's `linspace` sampling (docs/method.md §4.2) and
  the ground truth (for the reward terms) comes from the written masks of those frames;
  an unannotated frame counts as empty.
  """

  def __init__(self, samples: Sequence[BenchmarkSample], num_frames: int):
    self.samples = list(samples)
    self.num_frames = num_frames

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> dict:
    b = self.samples[int(index)]
    s = b.sample
    picked = okvos.sample_frame_indices(len(s.frame_paths), self.num_frames)
    frames = np.stack([okvos.read_frame(s.frame_paths[i]) for i in picked])
    masks = []
    for i in picked:
      path = pathlib.Path(s.annotation_dir) / f"{b.mask_names[i]}.png"
      masks.append(okvos.read_mask(path) if path.is_file() else np.zeros(frames.shape[1:3], bool))
    masks = np.stack(masks)
    if masks.shape != frames.shape[:3]:
      raise okvos.DataError(f"{s.id}: frames {frames.shape[1:3]} but masks {masks.shape[1:]}.")
    numbers = np.asarray([s.frame_numbers[i] for i in picked], np.int32)
    return {
      "id": s.id,
      "video": b.video,
      "oid": b.oid,
      "ability": s.ability,
      "question": s.question,
      "steps": [],
      "frame_numbers": numbers,
      "frame_paths": [s.frame_paths[i] for i in picked],
      "frames": frames,
      "masks": masks,
      "ground_truth": okvos.ground_truth(numbers, masks),
      "annotation_dir": s.annotation_dir,
      "reference_chain": "",
    }


# ----------------------------------------------------------------------------
# Scoring and tables.
# ----------------------------------------------------------------------------


def benchmark_table(
  benchmark: str, samples: Sequence[BenchmarkSample], per_sample: Sequence[Mapping], out_dir
) -> dict[str, dict[str, float]]:
  """The official table's numbers from the shared evaluation's per-sample records.

  ReasonSeg reads each image's predicted mask back from `out_dir` (the PNG the shared
  evaluation wrote) and scores it against the label map with its ignore regions.
  """
  if benchmark == "reasonseg":
    by_id = {b.sample.id: b for b in samples}
    rows = []
    for rec in per_sample:
      b = by_id[rec["id"]]
      label = np.asarray(Image.open(b.label_path))
      pred = okvos.read_mask(pathlib.Path(out_dir) / rec["mask_dir"] / "0.png")
      inter, union = metrics.iou_counts(label, pred, reasoning.IGNORE_LABEL)
      rec.update(inter=inter, union=union, IoU=1.0 if union == 0 else inter / union)
      rows.append({"is_sentence": b.is_sentence, "inter": inter, "union": union})
    return metrics.reasonseg_summary(rows)
  if benchmark == "reasonvos":
    return {metrics.OVERALL: metrics.jf_summary(per_sample)}
  if benchmark == "revos":
    return metrics.revos_summary(per_sample)
  raise ValueError(f"Unknown benchmark {benchmark!r}; expected one of {reasoning.BENCHMARKS}.")


def format_table(benchmark: str, table: Mapping[str, Mapping[str, float]], split: str) -> str:
  """The official table layout (percent)."""
  title = f"{reasoning.TITLES[benchmark]} {split} (percent)"
  if benchmark == "reasonseg":
    return metrics.format_giou_table(table, title)
  return metrics.format_summary(table, title)


def _jf_rows(per_sample: Sequence[Mapping], order: Sequence[str]) -> dict[str, dict[str, float]]:
  """J / F / J&F per category and over all samples, for the report's summary table."""
  out = {}
  for category in order:
    group = [r for r in per_sample if r["category"] == category]
    if group:
      out[category] = metrics.jf_summary(group)
  out["all samples"] = metrics.jf_summary(per_sample)
  return out


def score_predictions(
  benchmark: str,
  preds: Sequence[predictions_lib.Prediction],
  samples: Sequence[BenchmarkSample],
  video_segment_fn: predictions_lib.VideoSegmentFn,
  convention: str,
  out_dir: str | os.PathLike,
  *,
  split: str = "",
  resized: tuple[int, int] | None = None,
  report_samples: int | None = 16,
  print_table: bool = True,
) -> dict[str, Any]:
  """Segments and scores the predictions, then writes the benchmark's table and report.

  Only the predicted samples are scored (a `num_samples` limit evaluates a prefix).

  Returns:
    results.json's dict: the shared evaluation's fields (per-sample records now with
    "category", and for ReasonSeg "IoU", "inter", "union"), "summary" (J / F / J&F
    per category, the report's table) and "benchmark": {"name", "split", "table"}.
  """
  out = pathlib.Path(out_dir)
  ids = {p.id for p in preds}
  samples = [b for b in samples if b.sample.id in ids]
  results = predictions_lib.evaluate_predictions(
    preds,
    [b.sample for b in samples],
    video_segment_fn,
    convention,
    out,
    resized=resized,
    report=False,
    print_table=False,
  )
  by_id = {b.sample.id: b for b in samples}
  per_sample = results["per_sample"]
  for rec in per_sample:
    rec["category"] = rec["ability"] = by_id[rec["id"]].category
  table = benchmark_table(benchmark, samples, per_sample, out)
  order = {"reasonseg": ("short", "long"), "revos": ("referring", "reasoning", "type2")}
  results["summary"] = _jf_rows(per_sample, order.get(benchmark, ()))
  results["benchmark"] = {"name": benchmark, "split": split, "table": table}
  text = format_table(benchmark, table, split)
  tmp = out / (predictions_lib.RESULTS_FILE + ".tmp")
  tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
  tmp.replace(out / predictions_lib.RESULTS_FILE)
  if print_table:
    print(text)
    print(f"samples by status: {results['status_counts']}")
  page = reports.write_html_report(
    results,
    out,
    predictions=preds,
    max_samples=report_samples,
    title=f"Seg-ReSearch on {reasoning.TITLES[benchmark]} {split}",
  )
  # The official table above the report's own J / F table.
  page_text = page.read_text(encoding="utf-8")
  block = f'<h3>Official table</h3><pre class="official">{html.escape(text)}</pre>'
  page.write_text(page_text.replace("</h1>", "</h1>\n" + block, 1), encoding="utf-8")
  return results
