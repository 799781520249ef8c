"""Visual reports: the HTML evaluation report, PNG overlays and training-curve plots.

`write_html_report` turns an evaluation's results (`predictions.evaluate_predictions`)
into one page with a card per sample: the frames the policy saw, the query, every
search call with what came back, the chosen keyframe with the predicted box and point,
mask overlays on a few annotated frames (prediction filled green, ground truth outlined
red) and the sample's J, F and J&F. Images are PNG files in `report_files/` next to
the page, or data URIs with `embed_images=True` for a single portable file.

`plot_training_curves` draws every numeric series of a metrics JSONL (one object per
line with "step") with matplotlib's Agg backend, so it runs headless.

    python -m segresearch_jax.eval.reports --results=OUT/results.json
    python -m segresearch_jax.eval.reports --metrics=WORKDIR/metrics.jsonl --out=curves.png
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from segresearch_jax.data import okvos
from segresearch_jax.eval import curves, metrics

REPORT_FILE = "report.html"
FILES_DIR = "report_files"
PRED_COLOUR = (40, 220, 80)
GT_COLOUR = (235, 40, 40)
BOX_COLOUR = (255, 210, 0)
POINT_COLOUR = (255, 60, 200)
# Display widths in the report (px); images are only ever scaled down to these.
SHOWN_WIDTH, KEYFRAME_WIDTH, OVERLAY_WIDTH = 128, 360, 220
# Series drawn first (in this order) when present; any other numeric series follows.
PREFERRED_CURVES = (
  "reward/score",
  "reward/iou_score",
  "loss",
  "search/per_trajectory",
  "response_length",
)


# ----------------------------------------------------------------------------
# Overlays.
# ----------------------------------------------------------------------------


def overlay(
  frame: np.ndarray,
  pred_mask: np.ndarray | None = None,
  gt_mask: np.ndarray | None = None,
  alpha: float = 0.5,
) -> np.ndarray:
  """The frame with the predicted mask filled and the ground truth's boundary drawn.

  Args:
    frame: uint8 [H, W, 3].
    pred_mask: bool [H, W], blended in green at `alpha`.
    gt_mask: bool [H, W]; its boundary (thickened to 2 px) is drawn in red.

  Returns:
    uint8 [H, W, 3].
  """
  frame = np.asarray(frame)
  if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
    raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}.")
  out = frame.astype(np.float32)
  for name, mask in (("pred_mask", pred_mask), ("gt_mask", gt_mask)):
    if mask is not None and np.shape(mask) != frame.shape[:2]:
      raise ValueError(f"{name} has shape {np.shape(mask)}, the frame {frame.shape[:2]}.")
  if pred_mask is not None:
    m = np.asarray(pred_mask, dtype=bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(PRED_COLOUR, np.float32)
  if gt_mask is not None:
    edge = metrics.seg2bmap(np.asarray(gt_mask, dtype=bool))
    edge[1:, :] |= edge[:-1, :]  # 2 px wide so it survives down-scaling.
    edge[:, 1:] |= edge[:, :-1]
    out[edge] = GT_COLOUR
  return np.clip(out, 0, 255).astype(np.uint8)


def draw_prompt(
  frame: np.ndarray, box: Sequence[float] | None, point: Sequence[float] | None
) -> np.ndarray:
  """The frame with the predicted box (yellow) and point (magenta dot), in pixels."""
  im = Image.fromarray(np.asarray(frame, dtype=np.uint8))
  draw = ImageDraw.Draw(im)
  width = max(2, round(max(im.size) / 200))
  if box is not None:
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle(
      [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=BOX_COLOUR, width=width
    )
  if point is not None:
    px, py = (float(v) for v in point)
    r = max(3, round(max(im.size) / 80))
    draw.ellipse([px - r, py - r, px + r, py + r], fill=POINT_COLOUR, outline=(255, 255, 255))
  return np.asarray(im)


def _resize(image: np.ndarray, width: int) -> np.ndarray:
  h, w = image.shape[:2]
  if w <= width:
    return image
  height = max(1, round(h * width / w))
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def save_png(path: str | os.PathLike, image: np.ndarray) -> pathlib.Path:
  """Writes uint8 [H, W, 3] as PNG, creating the folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
  return path


# ----------------------------------------------------------------------------
# The HTML report.
# ----------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 16px; background: #f4f5f7; color: #222; }
h1 { margin: 0 0 8px 0; }
table.summary { border-collapse: collapse; margin: 8px 0 12px 0; background: #fff; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
table.summary td:first-child, table.summary th:first-child { text-align: left; }
.legend span { display: inline-block; margin-right: 16px; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px 16px;
        margin: 14px 0; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
.card h2 { font-size: 17px; margin: 0 0 6px 0; }
.tag { font-size: 12px; padding: 2px 8px; border-radius: 10px; background: #e6e9f0; margin-left: 6px; }
.status-ok { background: #d7f5dd; } .status-no_target { background: #e0e7ff; }
.status-missing, .status-no_answer, .status-no_keyframe, .status-bad_keyframe { background: #fde2e2; }
.score { float: right; font-weight: 600; }
.question { font-size: 15px; margin: 4px 0 10px 0; }
.row { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: 12px; color: #555; }
figure img { display: block; border: 1px solid #ccc; }
.strip { display: flex; gap: 6px; flex-wrap: wrap; margin: 8px 0; }
.searches { flex: 1; min-width: 320px; font-size: 13px; }
.searches ol { margin: 4px 0; padding-left: 20px; }
.searches li { margin-bottom: 6px; }
.query { font-family: ui-monospace, monospace; background: #f1f3f6; padding: 1px 4px; }
.result { color: #444; }
.error { color: #b00020; }
h3 { font-size: 13px; margin: 8px 0 4px 0; color: #333; }
details pre { white-space: pre-wrap; font-size: 12px; background: #f7f7f9; padding: 8px; max-height: 400px; overflow: auto; }
"""


class _Images:
  """Writes report images as files under report_files/, or returns data URIs."""

  def __init__(self, out_dir: pathlib.Path, embed: bool):
    self.out_dir, self.embed = out_dir, embed

  def src(self, image: np.ndarray, name: str) -> str:
    if self.embed:
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format="PNG")
      return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    rel = pathlib.PurePosixPath(FILES_DIR) / name
    save_png(self.out_dir / rel, image)
    return str(rel)


def _e(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _summary_table(summary: Mapping[str, Mapping[str, float]]) -> str:
  rows = [
    "<tr><th>category</th><th>J</th><th>F</th><th>J&amp;F</th><th>samples</th><th>missing</th></tr>"
  ]
  for name, s in summary.items():
    rows.append(
      f"<tr><td>{_e(name)}</td><td>{100 * s['J']:.1f}</td><td>{100 * s['F']:.1f}</td>"
      f"<td><b>{100 * s['JF']:.1f}</b></td><td>{int(s['count'])}</td>"
      f"<td>{int(s.get('missing', 0))}</td></tr>"
    )
  return '<table class="summary">' + "".join(rows) + "</table>"


def _failures_html(failures: Sequence[Mapping[str, Any]]) -> str:
  """Every sample whose data could not be evaluated, with the reason (each scored 0)."""
  if not failures:
    return ""
  items = "".join(f"<li><b>{_e(f['id'])}</b>: {_e(f['error'])}</li>" for f in failures)
  return (
    f'<div class="failures"><h3>{len(failures)} sample(s) failed and scored 0</h3>'
    f'<ul class="error">{items}</ul></div>'
  )


def _read_frame(path: str) -> np.ndarray | None:
  """A frame for a figure, or None when it cannot be read (the card leaves it out)."""
  try:
    return okvos.read_frame(path)
  except okvos.DataError:
    return None


def _search_html(calls: Sequence[Mapping]) -> str:
  if not calls:
    return '<div class="searches"><h3>Search calls</h3><p>none</p></div>'
  items = []
  for call in calls:
    head = f"<b>{_e(call.get('tool') or 'invalid')}</b> "
    head += f'<span class="query">{_e(call.get("query") or "")}</span>'
    parts = [head]
    if call.get("error"):
      parts.append(f'<div class="error">error: {_e(call["error"])}</div>')
    results = []
    for r in call.get("results") or []:
      if "title" in r:
        text = str(r.get("text", ""))
        text = text if len(text) <= 240 else text[:239] + "…"
        results.append(f'<li class="result"><b>{_e(r["title"])}</b>: {_e(text)}</li>')
      else:
        results.append(f'<li class="result">image: <b>{_e(r.get("name", "?"))}</b></li>')
    if results:
      parts.append("<ul>" + "".join(results) + "</ul>")
    items.append("<li>" + "".join(parts) + "</li>")
  return (
    f'<div class="searches"><h3>Search calls ({len(calls)})</h3><ol>{"".join(items)}</ol></div>'
  )


def _fmt_coords(values: Sequence[float] | None) -> str:
  return "—" if values is None else "[" + ", ".join(f"{float(v):.0f}" for v in values) + "]"


def _card(
  rec: Mapping[str, Any],
  out_dir: pathlib.Path,
  images: _Images,
  response: str | None,
  shown_frames: int,
  overlay_frames: int,
) -> str:
  key = pathlib.PurePath(rec["mask_dir"]).name  # The sample's file-safe name.
  frame_paths = list(rec["frame_paths"])
  numbers = [int(n) for n in rec["frame_numbers"]]
  parts = [
    f'<div class="card" id="{_e(key)}">',
    f'<h2>{_e(rec["id"])}<span class="tag">{_e(rec["ability"])}</span>'
    f'<span class="tag status-{_e(rec["status"])}">{_e(rec["status"])}</span>'
    f'<span class="score">J&amp;F {100 * rec["JF"]:.1f} · J {100 * rec["J"]:.1f} · '
    f"F {100 * rec['F']:.1f}</span></h2>",
    f'<p class="question">{_e(rec["question"])}</p>',
  ]
  if rec.get("error"):
    parts.append(f'<p class="error">{_e(rec["error"])}</p>')
  if rec["status"] == "failed":  # Its frames or masks are what could not be read.
    if response:
      parts.append(f"<details><summary>response</summary><pre>{_e(response)}</pre></details>")
    parts.append("</div>")
    return "\n".join(parts)

  # The frames the policy saw (the test split's linspace sampling, docs/method.md §4.2).
  strip = []
  for i in okvos.sample_frame_indices(len(frame_paths), shown_frames):
    frame = _read_frame(frame_paths[i])
    if frame is None:
      continue
    thumb = _resize(frame, SHOWN_WIDTH)
    src = images.src(thumb, f"{key}/shown_{numbers[i]}.png")
    strip.append(
      f'<figure><img src="{src}" alt="frame {numbers[i]}" style="width:{SHOWN_WIDTH}px">'
      f"<figcaption>frame {numbers[i]}</figcaption></figure>"
    )
  parts.append('<h3>Frames shown to the policy</h3><div class="strip">' + "".join(strip) + "</div>")

  # Keyframe with the prompt, and the search calls beside it.
  row = []
  if rec.get("keyframe_index") is not None:
    k = int(rec["keyframe_index"])
    frame = okvos.read_frame(frame_paths[k])  # readable: the segmenter was prompted with it
    stem = pathlib.Path(frame_paths[k]).stem
    pred_path = out_dir / rec["mask_dir"] / f"{stem}.png"
    gt_path = pathlib.Path(rec["annotation_dir"]) / f"{stem}.png"
    pred_mask = okvos.read_mask(pred_path) if pred_path.is_file() else None
    gt_mask = okvos.read_mask(gt_path) if gt_path.is_file() else None
    image = overlay(frame, pred_mask, gt_mask)
    image = draw_prompt(image, rec.get("box_px"), rec.get("point_px"))
    src = images.src(_resize(image, KEYFRAME_WIDTH), f"{key}/keyframe.png")
    caption = (
      f"keyframe {rec['keyframe']} (index {k}) · box {_fmt_coords(rec.get('box'))} "
      f"point {_fmt_coords(rec.get('point'))} ({_e(rec.get('stop_reason') or 'stop n/a')})"
    )
    row.append(
      f'<figure><img src="{src}" alt="keyframe" style="width:{KEYFRAME_WIDTH}px">'
      f"<figcaption>{caption}</figcaption></figure>"
    )
  else:
    kf = rec.get("keyframe")
    if rec["status"] == "no_target":
      text = f"keyframe {_e(kf)}: the model says the target is absent (empty masks)"
    else:
      text = f"keyframe {_e('none' if kf is None else kf)}: no segmenter prompt (empty masks)"
    row.append(f"<figure><figcaption>{text}</figcaption></figure>")
  row.append(_search_html(rec.get("search_calls") or []))
  parts.append('<div class="row">' + "".join(row) + "</div>")

  # Mask overlays on a few annotated frames, evenly spaced, with per-frame scores.
  names = list(rec["annotated_frames"])
  path_of = {n: p for n, p in zip(numbers, frame_paths)}
  annotated = [int(n) for n in rec["annotated_numbers"]]
  picks = sorted(set(np.linspace(0, len(names) - 1, min(overlay_frames, len(names))).astype(int)))
  figs = []
  for i in picks:
    if annotated[i] not in path_of:
      continue
    frame = _read_frame(path_of[annotated[i]])
    if frame is None:
      continue
    gt = okvos.read_mask(pathlib.Path(rec["annotation_dir"]) / f"{names[i]}.png")
    pred = okvos.read_mask(out_dir / rec["mask_dir"] / f"{names[i]}.png")
    image = _resize(overlay(frame, pred, gt), OVERLAY_WIDTH)
    src = images.src(image, f"{key}/overlay_{names[i]}.png")
    j, f = rec["J_per_frame"][i], rec["F_per_frame"][i]
    figs.append(
      f'<figure><img src="{src}" alt="overlay {names[i]}" style="width:{OVERLAY_WIDTH}px">'
      f"<figcaption>frame {annotated[i]} · "
      f"J {100 * j:.0f} · F {100 * f:.0f}</figcaption></figure>"
    )
  parts.append(
    '<h3>Masks (green: prediction, red: ground truth)</h3><div class="strip">'
    + "".join(figs)
    + "</div>"
  )
  if response is not None:
    parts.append(f"<details><summary>response</summary><pre>{_e(response)}</pre></details>")
  parts.append("</div>")
  return "\n".join(parts)


def write_html_report(
  results: Mapping[str, Any],
  out_dir: str | os.PathLike,
  *,
  predictions: Sequence[Any] | None = None,
  max_samples: int | None = None,
  shown_frames: int = 6,
  overlay_frames: int = 4,
  embed_images: bool = False,
  title: str = "Seg-ReSearch evaluation",
) -> pathlib.Path:
  """Writes `out_dir/report.html` from an evaluation's results.

  Args:
    results: the dict `evaluate_predictions` returns (or its results.json); mask paths
      in it are relative to `out_dir`.
    out_dir: the evaluation folder.
    predictions: the `Prediction`s (or dicts); their responses go into each card.
    max_samples: at most this many cards, in results order (None: all).
    shown_frames: frames in the "shown to the policy" strip.
    overlay_frames: annotated frames with mask overlays per card.
    embed_images: data URIs instead of files in report_files/.
    title: the page title.

  Returns:
    The path of the page.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  responses = {}
  for p in predictions or []:
    d = p if isinstance(p, Mapping) else p.to_json()
    responses[str(d["id"])] = d.get("response")
  images = _Images(out, embed_images)
  records = list(results["per_sample"])
  shown = records if max_samples is None else records[:max_samples]
  cards = [
    _card(r, out, images, responses.get(r["id"]), shown_frames, overlay_frames) for r in shown
  ]
  extra = []
  counts = results.get("status_counts") or {}
  if counts:
    extra.append("status: " + ", ".join(f"{_e(k)} {v}" for k, v in sorted(counts.items())))
  if results.get("search"):
    extra.append(f"search calls per sample: {results['search']['per_sample']:.2f}")
  if results.get("reward"):
    extra.append(
      "mean reward: " + ", ".join(f"{_e(k)} {v:.3f}" for k, v in results["reward"].items())
    )
  note = (
    "" if len(shown) == len(records) else f"<p>Showing {len(shown)} of {len(records)} samples.</p>"
  )
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{_e(title)}</h1>
{_summary_table(results["summary"])}
<p>{" · ".join(extra)}</p>
{_failures_html(results.get("failures") or [])}
<p class="legend"><span><i class="swatch" style="background:rgb{PRED_COLOUR}"></i>prediction</span>
<span><i class="swatch" style="background:rgb{GT_COLOUR}"></i>ground truth boundary</span>
<span><i class="swatch" style="background:rgb{BOX_COLOUR}"></i>predicted box</span>
<span><i class="swatch" style="background:rgb{POINT_COLOUR}"></i>predicted point</span></p>
{note}
{"".join(cards)}
</body></html>
"""
  path = out / REPORT_FILE
  # A response may decode to a lone surrogate; the page shows "?" for it.
  path.write_text(page, encoding="utf-8", errors="replace")
  return path


# ----------------------------------------------------------------------------
# Training curves.
# ----------------------------------------------------------------------------


def _numeric(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_training_curves(
  metrics_jsonl_path: str | os.PathLike,
  out_png: str | os.PathLike,
  keys: Sequence[str] | None = None,
  columns: int = 3,
) -> pathlib.Path:
  """One panel per numeric series of a metrics JSONL, against "step".

  Args:
    metrics_jsonl_path: one JSON object per line with "step" and numeric fields (e.g.
      "reward/score", "reward/iou_score", "loss", "search/per_trajectory",
      "response_length"); lines may carry different fields. Lines with different
      "phase" values (e.g. train / eval) are drawn as separate lines.
    out_png: the figure's path.
    keys: the series to draw; default: every numeric field, the usual ones first.
    columns: panels per row.

  Returns:
    The PNG's path.
  """
  import matplotlib

  matplotlib.use("Agg")  # Headless; must precede pyplot.
  import matplotlib.pyplot as plt

  rows = curves.read_metrics(metrics_jsonl_path)
  available = {k for r in rows for k, v in r.items() if k != "step" and _numeric(v)}
  if keys is None:
    keys = [k for k in PREFERRED_CURVES if k in available]
    keys += sorted(available - set(keys))
  else:
    missing = [k for k in keys if k not in available]
    if missing:
      raise ValueError(f"No numeric values for {missing} in {metrics_jsonl_path}.")
  if not keys:
    raise ValueError(f"No numeric series to plot in {metrics_jsonl_path}.")
  columns = max(1, min(columns, len(keys)))
  n_rows = math.ceil(len(keys) / columns)
  fig, axes = plt.subplots(n_rows, columns, figsize=(4.2 * columns, 2.8 * n_rows), squeeze=False)
  phases = sorted({str(r.get("phase", "")) for r in rows})
  for ax, key in zip(axes.flat, keys):
    for colour, phase in enumerate(phases):
      points = sorted(
        (float(r["step"]), float(r[key]))
        for r in rows
        if str(r.get("phase", "")) == phase and _numeric(r.get(key))
      )
      if not points:
        continue
      steps, values = np.asarray(points).T
      style = {"color": f"C{colour}", "label": phase or None}
      if len(values) > 20:  # A moving average makes noisy RL curves readable.
        ax.plot(steps, values, lw=1, alpha=0.4, color=style["color"])
        k = max(2, len(values) // 20)
        ax.plot(steps[k - 1 :], np.convolve(values, np.ones(k) / k, mode="valid"), lw=2, **style)
      else:
        ax.plot(steps, values, lw=1.5, marker=".", **style)
    if len(phases) > 1:
      ax.legend(fontsize=7)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  fig.tight_layout()
  out = pathlib.Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  """Rebuilds a report from results.json, or plots a metrics JSONL."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--results", help="results.json of an evaluation (writes report.html beside it)"
  )
  parser.add_argument("--predictions", help="predictions.jsonl, for the responses")
  parser.add_argument("--max_samples", type=int, default=None)
  parser.add_argument("--embed_images", action="store_true")
  parser.add_argument("--metrics", help="a metrics JSONL to plot")
  parser.add_argument("--out", help="the plot's PNG path (with --metrics)")
  args = parser.parse_args(argv)
  if not args.results and not args.metrics:
    parser.error("give --results and/or --metrics")
  if args.results:
    results_path = pathlib.Path(args.results)
    results = json.loads(results_path.read_text(encoding="utf-8"))
    # Only each record's id and response are read (`predictions` sits above this module).
    preds = curves.read_json_lines(args.predictions, "id") if args.predictions else None
    path = write_html_report(
      results,
      results_path.parent,
      predictions=preds,
      max_samples=args.max_samples,
      embed_images=args.embed_images,
    )
    print(path)
  if args.metrics:
    if not args.out:
      parser.error("--metrics needs --out")
    print(plot_training_curves(args.metrics, args.out))


if __name__ == "__main__":
  main()
