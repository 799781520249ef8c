r"""What the Colab notebooks (`colab/*.ipynb`) call: runtime, config, paths and run views.

The notebooks hold no logic of their own (STYLE.md): every cell calls this module, and
the tests call it the same way. The views read a run directory as `train.train` writes it:

    metrics.jsonl, reward_curve.png        show_reward_curve
    trajectories/step_*.jsonl              trajectory_markdown
    eval/results.json, eval/masks/         mask_figure
    summary.json                           eval_table

Each returns a plain value (a string, a PIL image), so everything here works without
IPython; `show` displays a value when a notebook kernel is running.

    from segresearch_jax import notebook
    config = notebook.load_config("runlocal", workdir="/tmp/run")
    summary = train.train(config)
    notebook.show(notebook.trajectory_markdown("/tmp/run"), markdown=True)
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segresearch_jax import protocol
from segresearch_jax.eval import curves

# Reward terms in reading order: the total, the outcome terms, then the process terms.
_REWARD_ORDER = (
  "score",
  "iou_score",
  "box_l1_score",
  "point_l1_score",
  "keyframe_score",
  "mask_score",
  "process_score",
  "format_score",
  "tpr",
  "igr",
  "num_search",
  "truncated",
  "advantages",
)
# The text between two turns of a response: the end of the model's turn, the
# observation as a user message, the start of the next turn (`protocol.wrap_observation`).
_OBSERVATION_RE = re.compile(
  re.escape(f"{protocol.IM_END}\n{protocol.IM_START}user\n")
  + "(.*?)"
  + re.escape(f"{protocol.IM_END}\n{protocol.IM_START}assistant\n"),
  re.DOTALL,
)
_MD_SPECIAL_RE = re.compile(r"([\\`*_\[\]<>#|])")
# Panel width of `mask_figure` (px) and the height of its caption strip.
_PANEL_WIDTH, _CAPTION_HEIGHT = 256, 30


# ----------------------------------------------------------------------------
# Runtime and display.
# ----------------------------------------------------------------------------


def in_colab() -> bool:
  """Whether this process runs in a Google Colab runtime."""
  return "google.colab" in sys.modules or importlib.util.find_spec("google.colab") is not None


def runtime_summary() -> str:
  """Devices, platform and versions of this runtime, one fact per line."""
  import jax

  devices = jax.devices()
  kinds: dict[str, int] = {}
  for d in devices:
    kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
  lines = [
    f"platform: {devices[0].platform} ({jax.default_backend()} backend), "
    + ", ".join(f"{n} x {kind}" for kind, n in kinds.items()),
    f"devices: {jax.device_count()} in {jax.process_count()} process(es), "
    f"{jax.local_device_count()} local",
  ]
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and stats.get("bytes_limit"):  # CPU devices report none.
    lines.append(f"memory per device: {stats['bytes_limit'] / 2**30:.1f} GiB")
  import jaxlib

  lines.append(
    f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, python {platform.python_version()}"
    + (", Colab" if in_colab() else "")
  )
  lines.append(f"segresearch_jax: {pathlib.Path(__file__).resolve().parent}")
  return "\n".join(lines)


def show(value: Any, *, markdown: bool = False) -> None:
  """Displays `value` in a notebook (a string as Markdown with `markdown=True`).

  Outside a notebook kernel (no IPython, or a plain script) a string is printed and
  anything else is left alone. Returns nothing, so a cell ending in `show(...)` does
  not display the value a second time.
  """
  try:
    from IPython import get_ipython
    from IPython.display import Markdown, display
  except ImportError:
    get_ipython = None
  if get_ipython is not None and get_ipython() is not None:
    display(Markdown(value) if markdown and isinstance(value, str) else value)
  elif isinstance(value, str):
    print(value)


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def config_file() -> pathlib.Path:
  """`configs/okvos.py` of this checkout (an editable install), else under the cwd."""
  checkout, cwd = pathlib.Path(__file__).resolve().parents[1], pathlib.Path.cwd().resolve()
  for root in (checkout, cwd, *cwd.parents):
    path = root / "configs" / "okvos.py"
    if path.is_file():
      return path
  raise FileNotFoundError(
    "configs/okvos.py not found next to the package or above the working directory; "
    "install the repository with `pip install -e .` or run from its root."
  )


@functools.cache
def _config_module():
  path = config_file()
  spec = importlib.util.spec_from_file_location("segresearch_okvos_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"rollout": {"group_size": 2}} -> {"rollout.group_size": 2}; dotted keys stay."""
  flat = {}
  for key, value in overrides.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and not isinstance(value, ml_collections.ConfigDict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_all_keys(value, f"{prefix}{key}."))
  return keys


def load_config(arg: str | None = None, /, **overrides: Any) -> ml_collections.ConfigDict:
  """The run config of `configs/okvos.py` with overrides, locked like `--config`.

  Args:
    arg: the variants of `configs/okvos.py`: None (the embedded default), "paper",
      "runlocal" (the CPU-sized run of the tests), "paper,dapo", ...
    **overrides: fields to set, dotted for nested ones (`**{"rollout.group_size": 2}`)
      or top-level as keywords (`total_steps=2`); a nested dict sets its fields.

  Returns:
    The config, locked: setting a misspelled field later fails too.

  Raises:
    ValueError: an unknown field (with the closest known names), a value of the wrong
      type, or a whole section given a value.
  """
  config = _config_module().get_config(arg)
  known = _all_keys(config)
  for key, value in _flatten(overrides).items():
    parent, _, name = key.rpartition(".")
    node = config
    for part in parent.split(".") if parent else ():
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
      hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
      raise ValueError(f"Unknown config field {key!r} (configs/okvos.py){hint}")
    if isinstance(node[name], ml_collections.ConfigDict):
      raise ValueError(
        f"Config field {key!r} is a section; set its fields instead, e.g. "
        f"{key}.{next(iter(node[name].keys()))}."
      )
    try:
      node[name] = value
    except TypeError as e:  # ml_collections keeps each field's type.
      raise ValueError(f"Config field {key!r}: {e}") from e
  config.lock()
  return config


# ----------------------------------------------------------------------------
# Paths (the paper recipe).
# ----------------------------------------------------------------------------


def mount_drive(mount_point: str = "/content/drive") -> bool:
  """Mounts Google Drive in Colab (asks for access once); False elsewhere."""
  if not in_colab():
    print("Not in Colab: Drive is not mounted; point the paths at local folders.")
    return False
  from google.colab import drive

  drive.mount(mount_point)
  return True


def require_dir(path: str | os.PathLike, what: str, contains: Sequence[str] = ()) -> pathlib.Path:
  """`path` as a directory holding every glob of `contains`, or a clear FileNotFoundError.

  Args:
    path: the folder to check.
    what: how the notebook names it, for the message (e.g. "HF_DIR (Qwen3-VL-4B weights)").
    contains: glob patterns that must each match at least one entry in the folder.
  """
  if not str(path):
    raise FileNotFoundError(f"{what} is not set.")
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"{what}: {str(folder)!r} is not a directory.")
  missing = [pattern for pattern in contains if not any(folder.glob(pattern))]
  if missing:
    raise FileNotFoundError(f"{what}: {str(folder)!r} has no {' and no '.join(missing)}.")
  return folder


def check_paper_paths(hf_dir: str, okvos_dir: str, kb_dir: str) -> dict[str, pathlib.Path]:
  """Checks the three inputs of the paper recipe before anything is loaded.

  Args:
    hf_dir: a HF Qwen-VL checkpoint (config.json, *.safetensors, the tokenizer).
    okvos_dir: OK-VOS in its raw layout (docs/method.md §4.1: train.parquet, test.parquet, train/,
      test/).
    kb_dir: the official local knowledge base (text_corpus.jsonl, image_corpus.jsonl).

  Returns:
    The three folders, by name.

  Raises:
    FileNotFoundError: naming every path that is missing or incomplete.
  """
  checks = {
    "hf_dir": (hf_dir, "HF_DIR (Qwen3-VL weights)", ("config.json", "*.safetensors")),
    "okvos_dir": (okvos_dir, "OKVOS_DIR (OK-VOS)", ("train.parquet", "test.parquet", "test")),
    "kb_dir": (kb_dir, "KB_DIR (local knowledge base)", ("text_corpus.jsonl",)),
  }
  found, problems = {}, []
  for name, (path, what, contains) in checks.items():
    try:
      found[name] = require_dir(path, what, contains)
    except FileNotFoundError as e:
      problems.append(str(e))
  if problems:
    raise FileNotFoundError(
      "The paper recipe needs its inputs; fix the paths cell:\n  " + "\n  ".join(problems)
    )
  return found


# ----------------------------------------------------------------------------
# Views of a run directory.
# ----------------------------------------------------------------------------


def _run_dir(workdir: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(workdir).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"Run directory {str(path)!r} does not exist (run train.train first).")
  return path


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  with path.open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def show_reward_curve(workdir: str | os.PathLike, *, display: bool = True) -> Image.Image:
  """The run's reward curve: reward_curve.png, or drawn from metrics.jsonl while training.

  Args:
    workdir: the run directory.
    display: also show it in a notebook.

  Returns:
    The curve as a PIL image.

  Raises:
    FileNotFoundError: the run has neither the PNG nor any GRPO step in metrics.jsonl.
  """
  run = _run_dir(workdir)
  png = run / "reward_curve.png"
  if png.is_file():
    with Image.open(png) as im:
      image = im.convert("RGB")
  else:
    metrics = run / "metrics.jsonl"
    rows = curves.read_metrics(metrics, phase="train") if metrics.is_file() else []
    if not rows:
      raise FileNotFoundError(
        f"No reward curve in {run}: no reward_curve.png and no GRPO step in metrics.jsonl."
      )
    with tempfile.TemporaryDirectory() as tmp:  # The run directory stays the trainer's.
      path = pathlib.Path(tmp) / "reward_curve.png"
      curves.plot_rewards(rows, path)
      with Image.open(path) as im:
        image = im.convert("RGB")
  if display:
    show(image)
  return image


def _trajectory_file(run: pathlib.Path, step: int | None) -> tuple[int, pathlib.Path]:
  files = {int(p.stem.split("_")[1]): p for p in (run / "trajectories").glob("step_*.jsonl")}
  if not files:
    raise FileNotFoundError(f"No trajectory records in {run / 'trajectories'}.")
  step = max(files) if step is None else int(step)
  if step not in files:
    raise ValueError(f"No trajectories for step {step}; steps with records: {sorted(files)}.")
  return step, files[step]


def _md(text: Any) -> str:
  """Escapes Markdown (and HTML: `<search>` would vanish) in inline text."""
  return _MD_SPECIAL_RE.sub(r"\\\1", " ".join(str(text).split()))


def _fenced(text: str) -> str:
  """`text` as a fenced block, with a fence longer than any backtick run inside."""
  longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
  fence = "`" * max(3, longest + 1)
  return f"{fence}text\n{text}\n{fence}"


def _clean_turn(text: str) -> str:
  for token in protocol.SPECIAL_TOKENS:
    text = text.replace(token, "")
  return text.strip()


def _call_markdown(call: Mapping[str, Any]) -> list[str]:
  """What the bridge did with one turn's action, as Markdown lines."""
  action = call.get("action")
  error = call.get("error")
  if action == "search":
    head = f"**Search** `{call.get('tool') or '?'}`: {_md(call.get('query') or '')}"
    results = call.get("results") or []
    if error:
      return [f"{head} → error ({_md(error)}): {_md(call.get('observation', ''))}"]
    lines = [f"{head} → {len(results)} result(s)"]
    for i, r in enumerate(results, start=1):
      if "title" in r:
        text = protocol.truncate_text(str(r.get("text", "")))
        lines.append(f"{i}. **{_md(r['title'])}**: {_md(text)}")
      else:
        lines.append(f"{i}. image **{_md(r.get('name', '?'))}**")
    return lines
  if action == "keyframe":
    if error:
      return [f"**Keyframe** {call.get('keyframe')} → error: {_md(call.get('observation', ''))}"]
    if call.get("keyframe") == protocol.NO_TARGET_KEYFRAME:
      return [f"**Keyframe** {protocol.NO_TARGET_KEYFRAME}: the target is absent."]
    return [f"**Keyframe** {call.get('keyframe')} → its high-resolution version is shown."]
  if action == "answer":
    return ["**Answer** given: the episode ends."]
  observation = call.get("observation") or error or ""
  return [f"**No action** → {_md(observation)}"]


def _coords(values) -> str:
  """Coordinates as the model wrote them: `[10, 20.5]`, not `[10.0, 20.5]`."""
  return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def trajectory_markdown(
  workdir: str | os.PathLike, step: int | None = None, row: int | None = 0
) -> str:
  """One training rollout as Markdown: question, turns, searches, keyframe, answer, reward.

  Args:
    workdir: the run directory.
    step: the GRPO step (None: the latest with records).
    row: the rollout within the step (prompt-major: prompt i's group is rows
      i*G..i*G+G-1); None picks the first rollout that searched (else row 0).

  Returns:
    Markdown text for `IPython.display.Markdown` (or `show(..., markdown=True)`).
  """
  run = _run_dir(workdir)
  step, path = _trajectory_file(run, step)
  records = _read_jsonl(path)
  if row is None:
    searched = [
      i
      for i, r in enumerate(records)
      if any(c.get("action") == "search" for c in r.get("tool_calls") or [])
    ]
    row = searched[0] if searched else 0
  if not 0 <= row < len(records):
    raise ValueError(f"Step {step} has {len(records)} rollouts; row {row} is out of range.")
  rec = records[row]
  response = str(rec.get("response", ""))
  # re.split with one group: [turn 1, observation 1, turn 2, ..., last turn].
  parts = _OBSERVATION_RE.split(response)
  turns = parts[0::2]
  calls = list(rec.get("tool_calls") or [])
  lines = [
    f"### Step {step}, rollout {row} of {len(records)}: {_md(rec.get('id', '?'))} "
    f"({_md(rec.get('ability', '?'))})",
    "",
    f"**Question:** {_md(rec.get('question', ''))}",
    "",
    f"**Stopped:** {_md(rec.get('stop_reason', '?'))} after {len(turns)} turn(s), "
    f"{rec.get('response_tokens', '?')} response tokens "
    f"({rec.get('generated_tokens', '?')} generated)",
  ]
  for i, turn in enumerate(turns):
    lines += ["", f"#### Turn {i + 1}", "", _fenced(_clean_turn(turn) or "(empty)")]
    if i < len(calls):
      lines += ["", *_call_markdown(calls[i])]
  keyframe = protocol.first_keyframe(response)
  answer = protocol.parse_answer(response)
  lines += ["", "#### Result", ""]
  lines.append(f"- keyframe: {'none' if keyframe is None else keyframe}")
  if answer is None:
    lines.append("- answer: none (no parseable `<answer>`)")
  else:
    lines.append(
      f"- answer: box {_coords(answer.bbox_2d)}, point {_coords(answer.point_2d)}"
      + (" (no target)" if answer.is_no_target else "")
    )
  reward = rec.get("reward") or {}
  if reward:
    order = [k for k in _REWARD_ORDER if k in reward]
    order += sorted(k for k in reward if k not in order)
    lines += ["", "| reward term | value |", "|---|---:|"]
    lines += [f"| {_md(k)} | {float(reward[k]):.3f} |" for k in order]
  return "\n".join(lines) + "\n"


def _load_results(run: pathlib.Path, eval_dir: str) -> tuple[pathlib.Path, dict[str, Any]]:
  out = run / eval_dir
  path = out / "results.json"
  if not path.is_file():
    raise FileNotFoundError(f"No {path}: the evaluation has not run, or ran with eval.masks=False.")
  return out, json.loads(path.read_text(encoding="utf-8"))


def _panel(image: np.ndarray, caption: str) -> Image.Image:
  """The image scaled to the panel width, a caption strip below it."""
  im = Image.fromarray(image)
  height = max(1, round(im.height * _PANEL_WIDTH / im.width))
  im = im.resize((_PANEL_WIDTH, height), Image.BILINEAR)
  panel = Image.new("RGB", (_PANEL_WIDTH, height + _CAPTION_HEIGHT), "white")
  panel.paste(im, (0, 0))
  ImageDraw.Draw(panel).text((4, height + 4), caption, fill="black", font=_font())
  return panel


@functools.cache
def _font() -> ImageFont.ImageFont:
  return ImageFont.load_default()


def mask_figure(
  workdir: str | os.PathLike, sample: int | str = 0, *, eval_dir: str = "eval", frames: int = 4
) -> Image.Image:
  """One evaluated sample: predicted masks (green) and GT outlines (red) on its frames.

  The first panel is the chosen keyframe with the predicted box and point (when the
  answer prompted the segmenter), then `frames` annotated frames evenly spaced, each
  with its J and F. Colours and drawing are `eval.reports`'.

  Args:
    workdir: the run directory.
    sample: the index in results.json's per_sample, or the sample id.
    eval_dir: the evaluation folder under the run ("eval" or "eval_no_search").
    frames: annotated frames to show.

  Returns:
    A PIL image, a title line above the panels.
  """
  from segresearch_jax.data import okvos
  from segresearch_jax.eval import reports

  run = _run_dir(workdir)
  out, results = _load_results(run, eval_dir)
  records = results["per_sample"]
  if isinstance(sample, str):
    by_id = {r["id"]: r for r in records}
    if sample not in by_id:
      raise ValueError(f"No sample {sample!r} in {out / 'results.json'}; ids: {sorted(by_id)}.")
    rec = by_id[sample]
  elif 0 <= sample < len(records):
    rec = records[sample]
  else:
    raise ValueError(
      f"{out / 'results.json'} has {len(records)} samples; {sample} is out of range."
    )
  if frames < 1:
    raise ValueError(f"frames must be >= 1, got {frames}.")
  path_of = dict(zip((int(n) for n in rec["frame_numbers"]), rec["frame_paths"]))
  pred_dir, gt_dir = out / rec["mask_dir"], pathlib.Path(rec["annotation_dir"])

  panels = []
  if rec.get("keyframe_index") is not None:
    frame_path = rec["frame_paths"][int(rec["keyframe_index"])]
    stem = pathlib.Path(frame_path).stem
    pred = pred_dir / f"{stem}.png"
    gt = gt_dir / f"{stem}.png"
    image = reports.overlay(
      okvos.read_frame(frame_path),
      okvos.read_mask(pred) if pred.is_file() else None,
      okvos.read_mask(gt) if gt.is_file() else None,
    )
    image = reports.draw_prompt(image, rec.get("box_px"), rec.get("point_px"))
    panels.append(_panel(image, f"keyframe {rec['keyframe']} (box, point)"))
  names, numbers = rec["annotated_frames"], [int(n) for n in rec["annotated_numbers"]]
  count = min(frames, len(names))
  for i in sorted(set(np.linspace(0, len(names) - 1, count).astype(int).tolist())):
    if numbers[i] not in path_of:
      continue  # An annotation without its frame scores an empty prediction; no picture.
    image = reports.overlay(
      okvos.read_frame(path_of[numbers[i]]),
      okvos.read_mask(pred_dir / f"{names[i]}.png"),
      okvos.read_mask(gt_dir / f"{names[i]}.png"),
    )
    caption = f"frame {numbers[i]}  J {rec['J_per_frame'][i]:.2f}  F {rec['F_per_frame'][i]:.2f}"
    panels.append(_panel(image, caption))
  if not panels:
    raise ValueError(f"Sample {rec['id']} has no frame to draw.")

  title = (
    f"{rec['id']} ({rec['ability']}, {rec['status']}): J&F {rec['JF']:.3f}  |  "
    f"{' '.join(str(rec['question']).split())}"
  )
  title_height = 22
  width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
  height = max(p.height for p in panels) + title_height
  figure = Image.new("RGB", (width, height), "white")
  ImageDraw.Draw(figure).text((4, 5), title[: width // 6], fill="black", font=_font())
  x = 0
  for p in panels:
    figure.paste(p, (x, title_height))
    x += p.width + 4
  return figure


def eval_table(workdir: str | os.PathLike) -> str:
  """The final evaluation with and without search, side by side (`summary.json`).

  Falls back to `eval/` and `eval_no_search/`'s eval_metrics.json for a run whose
  summary is not written yet (e.g. evaluated with `evaluate.evaluate` alone).
  """
  from segresearch_jax import evaluate

  run = _run_dir(workdir)
  summary_path = run / "summary.json"
  if summary_path.is_file():
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    with_search = summary.get("eval_with_search")
    without = summary.get("eval_without_search")
  else:
    paths = [run / d / "eval_metrics.json" for d in ("eval", "eval_no_search")]
    if not all(p.is_file() for p in paths):
      raise FileNotFoundError(
        f"No summary.json in {run} and no eval/ + eval_no_search/ eval_metrics.json."
      )
    with_search, without = (json.loads(p.read_text(encoding="utf-8")) for p in paths)
  if not with_search or not without:
    raise ValueError(f"{summary_path} lacks eval_with_search / eval_without_search.")
  head = f"{int(with_search.get('samples', 0))} held-out samples, greedy decoding"
  lines = [head, evaluate.format_comparison(with_search, without)]
  failures = with_search.get("failures") or []
  if failures:  # scored 0 in the table above
    lines.append(f"{len(failures)} failed (scored 0): " + ", ".join(f["id"] for f in failures))
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Evaluating a checkpoint (the paper recipe).
# ----------------------------------------------------------------------------


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  checkpoint_dir: str | os.PathLike | None = None,
  step: int | None = None,
  out_dir: str | os.PathLike | None = None,
  *,
  search: bool = True,
  masks: bool = True,
) -> dict[str, Any]:
  """Greedy evaluation of a saved step, as `python -m segresearch_jax.evaluate` runs it.

  Args:
    config: the run config (its data, search and eval sections are used).
    checkpoint_dir: the run's checkpoints (default: `config.workdir/checkpoints`).
    step: the step (None: the latest).
    out_dir: where predictions, results and the report go (default
      `workdir/eval_<step>`, `_no_search` appended without search).
    search: False detaches the search backend.
    masks: also segment the answers and score J&F.

  Returns:
    The evaluation's mean terms, with "step" added.
  """
  from segresearch_jax import components as components_lib
  from segresearch_jax import evaluate

  checkpoint_dir = pathlib.Path(checkpoint_dir or pathlib.Path(config.workdir) / "checkpoints")
  if not checkpoint_dir.is_dir():
    raise FileNotFoundError(f"No checkpoint directory {str(checkpoint_dir)!r}.")
  step, model_cfg, tokenizer, params = evaluate.load_checkpoint(
    str(checkpoint_dir), step, config.model.tokenizer_dir
  )
  components = components_lib.build_components(config, tokenizer, model_cfg)
  suffix = "" if search else "_no_search"
  out = out_dir or pathlib.Path(config.workdir) / f"eval_{step}{suffix}"
  metrics = evaluate.evaluate(config, params, components, out, search=search, masks=masks)
  return {"step": step, **metrics}
