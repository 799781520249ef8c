"""The notebook helpers (`segresearch_jax/notebook.py`) and the Colab notebooks.

Fast tests run the helpers on run directories written here by hand (exact content
checks); the slow ones run the shrunk trainer once and then execute
`colab/quickstart.ipynb` on CPU with nbclient, its parameters cell overridden.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from segresearch_jax import notebook, protocol
from segresearch_jax.eval import reports

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "colab" / "quickstart.ipynb"
PAPER = REPO / "colab" / "paper_recipe.ipynb"


# ----------------------------------------------------------------------------
# Config and runtime.
# ----------------------------------------------------------------------------


def test_load_config_sets_dotted_nested_and_top_level_fields_then_locks():
  config = notebook.load_config(
    None, **{"rollout.group_size": 3}, total_steps=7, optim={"lr": 0.5, "b1": 0.8}
  )
  assert config.rollout.group_size == 3
  assert config.total_steps == 7
  assert (config.optim.lr, config.optim.b1) == (0.5, 0.8)
  assert config.model.preset == "embedded"  # untouched fields keep the default
  with pytest.raises(AttributeError):
    config.totl_steps = 1  # locked like `--config`: a later typo fails too


def test_load_config_paper_preset():
  config = notebook.load_config("paper", **{"data.okvos_dir": "/data/OK-VOS"})
  assert (config.batch_size, config.rollout.group_size, config.optim.lr) == (16, 8, 1e-6)
  assert config.data.okvos_dir == "/data/OK-VOS"


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"rollout.group_sze": 2}, r"'rollout\.group_sze'.*did you mean 'rollout\.group_size'"),
    ({"rolout.group_size": 2}, r"Unknown config field 'rolout\.group_size'"),
    ({"total_steps.x": 2}, r"Unknown config field 'total_steps\.x'"),
    ({"rollout.group_size": "two"}, r"'rollout\.group_size'.*str"),
    ({"rollout": 2}, r"'rollout' is a section"),
  ],
)
def test_load_config_rejects_bad_overrides_with_a_clear_message(overrides, message):
  with pytest.raises(ValueError, match=message):
    notebook.load_config(None, **overrides)


def test_runtime_summary_names_platform_devices_and_versions():
  text = notebook.runtime_summary()
  assert f"platform: {jax.devices()[0].platform}" in text
  assert f"devices: {jax.device_count()} in {jax.process_count()} process(es)" in text
  assert f"jax {jax.__version__}" in text


def test_show_prints_text_without_ipython(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "IPython", None)  # import IPython now fails
  monkeypatch.setitem(sys.modules, "IPython.display", None)
  assert notebook.show("**hello**", markdown=True) is None
  notebook.show(Image.new("RGB", (2, 2)))  # nothing to print, nothing raised
  assert capsys.readouterr().out == "**hello**\n"


# ----------------------------------------------------------------------------
# Paper recipe paths.
# ----------------------------------------------------------------------------


def _paper_inputs(root):
  hf, okvos, kb = root / "hf", root / "okvos", root / "kb"
  for folder in (hf, okvos / "test", kb):
    folder.mkdir(parents=True)
  for path in (
    hf / "config.json",
    hf / "model-00001-of-00002.safetensors",
    okvos / "train.parquet",
    okvos / "test.parquet",
    kb / "text_corpus.jsonl",
  ):
    path.write_text("{}")
  return hf, okvos, kb


def test_check_paper_paths_accepts_complete_inputs(tmp_path):
  hf, okvos, kb = _paper_inputs(tmp_path)
  found = notebook.check_paper_paths(str(hf), str(okvos), str(kb))
  assert found == {"hf_dir": hf, "okvos_dir": okvos, "kb_dir": kb}


def test_check_paper_paths_names_every_missing_input(tmp_path):
  hf, okvos, kb = _paper_inputs(tmp_path)
  (okvos / "test.parquet").unlink()
  with pytest.raises(FileNotFoundError) as e:
    notebook.check_paper_paths(str(tmp_path / "nowhere"), str(okvos), str(kb))
  message = str(e.value)
  assert "HF_DIR (Qwen3-VL weights)" in message and "nowhere" in message
  assert "OKVOS_DIR (OK-VOS)" in message and "test.parquet" in message
  assert "KB_DIR" not in message


def test_require_dir(tmp_path):
  (tmp_path / "a.safetensors").write_text("")
  assert notebook.require_dir(tmp_path, "X", ["*.safetensors"]) == tmp_path
  with pytest.raises(FileNotFoundError, match="X: .* has no config.json"):
    notebook.require_dir(tmp_path, "X", ["config.json"])
  with pytest.raises(FileNotFoundError, match="X is not set"):
    notebook.require_dir("", "X")


def test_mount_drive_outside_colab_is_a_no_op(capsys):
  assert notebook.mount_drive() is False
  assert "Not in Colab" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Views of hand-made run directories.
# ----------------------------------------------------------------------------


def _train_row(step, score):
  row = {"step": step, "phase": "train", "reward/score": score, "reward/process_score": 0.1}
  row.update({f"reward/{k}": score / 4 for k in ("iou_score", "box_l1_score")})
  row.update({f"reward/{k}": 0.0 for k in ("point_l1_score", "keyframe_score")})
  return row


def test_show_reward_curve_reads_the_png(tmp_path):
  Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "reward_curve.png")
  image = notebook.show_reward_curve(tmp_path, display=False)
  assert image.size == (40, 30) and image.getpixel((5, 5)) == (10, 20, 30)


def test_show_reward_curve_plots_metrics_while_training(tmp_path):
  rows = [{"step": 1, "phase": "sft", "loss": 2.0}] + [_train_row(s, 0.3 * s) for s in (1, 2, 3)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  image = notebook.show_reward_curve(tmp_path, display=False)
  assert image.size == (700, 400)  # curves.plot_rewards' figure
  assert _count(image, (31, 119, 180)) > 100  # the reward line, in matplotlib's C0
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # nothing written to the run


def test_show_reward_curve_without_grpo_steps_fails_clearly(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "phase": "sft"}) + "\n")
  with pytest.raises(FileNotFoundError, match="No reward curve"):
    notebook.show_reward_curve(tmp_path, display=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    notebook.show_reward_curve(tmp_path / "missing", display=False)


def _record(searched: bool):
  """A trajectory record as `agent.records` writes it: search -> keyframe -> answer."""
  call = json.dumps({"name": "text_search", "query": "founder of the Eminar Academy"})
  obs = protocol.text_search_observation([("Eminar Academy", "Founded by Ada Vale in 2031.")])
  answer = '{"bbox_2d": [10, 20, 300, 400], "point_2d": [150, 210]}'
  response = (
    f"<thinking> I search. </thinking> <search> {call} </search>"
    + protocol.wrap_observation(obs)
    + "<thinking> It is the blue star. </thinking> <keyframe> 5 </keyframe>"
    + protocol.wrap_observation(protocol.KEYFRAME_OBSERVATION)
    + f"<answer>{answer}</answer>{protocol.IM_END}"
  )
  calls = [
    {
      "row_id": 0,
      "action": "search",
      "tool": "text_search",
      "query": "founder of the Eminar Academy",
      "keyframe": None,
      "results": [{"title": "Eminar Academy", "text": "Founded by Ada Vale in 2031.", "score": 3}],
      "observation": obs,
      "error": None,
      "latency_s": 0.01,
    },
    {
      "row_id": 0,
      "action": "keyframe",
      "tool": None,
      "query": None,
      "keyframe": 5,
      "results": [],
      "observation": protocol.KEYFRAME_OBSERVATION,
      "error": None,
      "latency_s": 0.0,
    },
  ]
  if not searched:
    response = "<keyframe> 5 </keyframe>" + protocol.wrap_observation(protocol.KEYFRAME_OBSERVATION)
    response += f"<answer>{answer}</answer>{protocol.IM_END}"
    calls = calls[1:]
  return {
    "id": "syn-train_0001",
    "ability": "one-hop",
    "question": "Please find 'the emblem of the team coached by the founder' in the provided video.",
    "response": response,
    "response_tokens": 120,
    "generated_tokens": 60,
    "num_turns": 3,
    "stop_reason": "finished",
    "tool_calls": calls,
    "reward": {"advantages": 0.7, "score": 2.5, "iou_score": 0.9, "process_score": 0.4},
  }


def _write_trajectories(run, step, records):
  folder = run / "trajectories"
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_trajectory_markdown_shows_turns_searches_keyframe_answer_and_reward(tmp_path):
  _write_trajectories(tmp_path, 3, [_record(searched=True)])
  text = notebook.trajectory_markdown(tmp_path)
  assert text.startswith("### Step 3, rollout 0 of 1: syn-train\\_0001 (one-hop)")
  assert "**Question:** Please find 'the emblem of the team coached by the founder'" in text
  assert "**Stopped:** finished after 3 turn(s), 120 response tokens (60 generated)" in text
  for n in (1, 2, 3):
    assert f"#### Turn {n}" in text
  # The model's text verbatim in a code block; tags outside code blocks are escaped.
  assert '<search> {"name": "text_search", "query": "founder of the Eminar Academy"} </search>' in (
    text
  )
  assert "**Search** `text_search`: founder of the Eminar Academy → 1 result(s)" in text
  assert "1. **Eminar Academy**: Founded by Ada Vale in 2031." in text
  assert "**Keyframe** 5 → its high-resolution version is shown." in text
  assert "- keyframe: 5" in text
  assert "- answer: box [10, 20, 300, 400], point [150, 210]" in text
  assert "| score | 2.500 |" in text and "| advantages | 0.700 |" in text
  # Reading order: the total first, then outcome, process, advantages.
  order = [
    text.index(f"| {k} |") for k in ("score", "iou\\_score", "process\\_score", "advantages")
  ]
  assert order == sorted(order)
  assert protocol.IM_END not in text and protocol.IM_START not in text


def test_trajectory_markdown_picks_step_and_row(tmp_path):
  _write_trajectories(tmp_path, 1, [_record(searched=False)])
  _write_trajectories(tmp_path, 2, [_record(searched=False), _record(searched=True)])
  assert notebook.trajectory_markdown(tmp_path).startswith("### Step 2, rollout 0 of 2")
  assert notebook.trajectory_markdown(tmp_path, step=1).startswith("### Step 1, rollout 0 of 1")
  searched = notebook.trajectory_markdown(tmp_path, row=None)  # the first that searched
  assert searched.startswith("### Step 2, rollout 1 of 2") and "**Search**" in searched
  assert "**Search**" not in notebook.trajectory_markdown(tmp_path, step=2, row=0)
  with pytest.raises(ValueError, match=r"steps with records: \[1, 2\]"):
    notebook.trajectory_markdown(tmp_path, step=5)
  with pytest.raises(ValueError, match="2 rollouts; row 2 is out of range"):
    notebook.trajectory_markdown(tmp_path, row=2)


def test_trajectory_markdown_shows_failed_actions(tmp_path):
  rec = _record(searched=True)
  rec["tool_calls"][0].update(error="backend_error", results=[], observation="Error: timeout")
  rec["response"] = "no tags here" + protocol.IM_END
  rec["tool_calls"] = rec["tool_calls"][:1]
  _write_trajectories(tmp_path, 1, [rec])
  text = notebook.trajectory_markdown(tmp_path)
  assert "→ error (backend\\_error): Error: timeout" in text
  assert "- keyframe: none" in text and "- answer: none" in text


def _frame(size, square):
  """A dark frame with a bright square at (x0, y0, x1, y1)."""
  frame = np.full((size[1], size[0], 3), 60, np.uint8)
  x0, y0, x1, y1 = square
  frame[y0:y1, x0:x1] = 200
  return frame


def _eval_run(tmp_path):
  """A run with eval/results.json, its masks, and the frames and annotations it names."""
  run, data = tmp_path / "run", tmp_path / "data"
  ann = data / "Annotations" / "v0" / "0"
  ann.mkdir(parents=True)
  masks = run / "eval" / "masks" / "s0"
  masks.mkdir(parents=True)
  width, height = 256, 192  # the panel width: no resampling, exact colours
  paths = []
  for n in (0, 5, 10):
    x = 40 + 4 * n
    path = data / f"{n:05d}.jpg"
    Image.fromarray(_frame((width, height), (x, 50, x + 60, 110))).save(path, quality=95)
    paths.append(str(path))
    gt = np.zeros((height, width), np.uint8)
    gt[50:110, x : x + 60] = 255
    palette = Image.fromarray(gt, mode="P")
    palette.putpalette([0, 0, 0] * 255 + [255, 255, 255])
    palette.save(ann / f"{n:05d}.png")
    pred = np.zeros((height, width), np.uint8)
    pred[60:120, x : x + 50] = 255
    Image.fromarray(pred, mode="L").save(masks / f"{n:05d}.png")
  record = {
    "id": "s0",
    "ability": "one-hop",
    "question": "Please find 'the square' in the provided video.",
    "frame_paths": paths,
    "frame_numbers": [0, 5, 10],
    "annotation_dir": str(ann),
    "annotated_frames": ["00000", "00005", "00010"],
    "annotated_numbers": [0, 5, 10],
    "keyframe": 5,
    "keyframe_index": 1,
    "box_px": [60, 50, 120, 110],
    "point_px": [90, 80],
    "status": "ok",
    "mask_dir": "masks/s0",
    "J": 0.6,
    "F": 0.5,
    "JF": 0.55,
    "J_per_frame": [0.6, 0.6, 0.6],
    "F_per_frame": [0.5, 0.5, 0.5],
  }
  results = {"summary": {}, "per_sample": [record]}
  (run / "eval" / "results.json").write_text(json.dumps(results))
  return run


def _count(image, colour):
  return int(np.all(np.asarray(image) == np.asarray(colour, np.uint8), axis=-1).sum())


def test_mask_figure_draws_keyframe_prompt_masks_and_outlines(tmp_path):
  run = _eval_run(tmp_path)
  figure = notebook.mask_figure(run, sample=0, frames=3)
  assert isinstance(figure, Image.Image)
  assert figure.width == 4 * 256 + 3 * 4  # keyframe + 3 annotated frames, 4 px gaps
  assert _count(figure, reports.GT_COLOUR) > 4 * 100  # a red outline in every panel
  assert _count(figure, reports.BOX_COLOUR) > 100  # the box on the keyframe
  assert _count(figure, reports.POINT_COLOUR) > 10  # and the point
  # Predicted pixels are blended towards green: G well above R in the mask.
  panel = np.asarray(figure)[22 + 100, 256 + 4 + 60 : 256 + 4 + 80].astype(int)  # frame 0
  assert np.all(panel[:, 1] > panel[:, 0] + 40)
  by_id = notebook.mask_figure(run, sample="s0", frames=1)
  assert by_id.width == 2 * 256 + 4
  with pytest.raises(ValueError, match="has 1 samples; 3 is out of range"):
    notebook.mask_figure(run, sample=3)
  with pytest.raises(ValueError, match="No sample 'x'"):
    notebook.mask_figure(run, sample="x")
  with pytest.raises(FileNotFoundError, match="eval_no_search/results.json"):
    notebook.mask_figure(run, eval_dir="eval_no_search")


def _terms(score, jf):
  terms = {k: 0.1 for k in ("iou_score", "box_l1_score", "point_l1_score", "keyframe_score")}
  terms.update(outcome=0.4, process_score=0.2, score=score, samples=4, J=jf, F=jf, **{"J&F": jf})
  terms["search/per_trajectory"] = 1.5
  return terms


def test_eval_table_compares_with_and_without_search(tmp_path):
  summary = {"eval_with_search": _terms(2.0, 0.5), "eval_without_search": _terms(1.25, 0.25)}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  lines = notebook.eval_table(tmp_path).splitlines()
  assert lines[0] == "4 held-out samples, greedy decoding"
  assert lines[1].split() == ["term", "with", "search", "search", "off", "diff"]
  assert ["score", "2.000", "1.250", "+0.750"] in [line.split() for line in lines]
  assert ["J&F", "0.500", "0.250", "+0.250"] in [line.split() for line in lines]


def test_eval_table_names_the_failed_samples(tmp_path):
  with_search = {**_terms(2.0, 0.5), "failures": [{"id": "s7", "error": "Missing frame x.jpg"}]}
  summary = {"eval_with_search": with_search, "eval_without_search": _terms(1.25, 0.25)}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  assert notebook.eval_table(tmp_path).splitlines()[-1] == "1 failed (scored 0): s7"


def test_eval_table_falls_back_to_eval_metrics_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="No summary.json"):
    notebook.eval_table(tmp_path)
  for name, score in (("eval", 1.0), ("eval_no_search", 0.5)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "eval_metrics.json").write_text(json.dumps(_terms(score, 0.3)))
  assert ["score", "1.000", "0.500", "+0.500"] in [
    line.split() for line in notebook.eval_table(tmp_path).splitlines()
  ]


# ----------------------------------------------------------------------------
# The notebooks as files.
# ----------------------------------------------------------------------------


def _read_notebook(path):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  return nb


def _cell(nb, cell_id):
  return next(c for c in nb.cells if c.get("id") == cell_id)


def _parameter_names(nb):
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  return {t.id for node in ast.parse(cell.source).body for t in getattr(node, "targets", [])}


@pytest.mark.parametrize("path", [QUICKSTART, PAPER], ids=lambda p: p.name)
def test_notebook_is_valid_and_every_code_cell_compiles(path):
  nb = _read_notebook(path)
  assert nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs, f"{cell.id}: outputs are committed"
      compile(cell.source, f"{path.name}:{cell.id}", "exec")
  assert {"STEPS", "WORKDIR", "OVERRIDES"} <= _parameter_names(nb)


def test_paper_recipe_cells_needing_weights_fail_clearly_without_them(tmp_path, capsys):
  nb = _read_notebook(PAPER)
  scope: dict = {}
  exec(_cell(nb, "parameters").source, scope)
  missing = tmp_path / "missing"
  scope.update(
    HF_DIR=str(missing / "hf"),
    OKVOS_DIR=str(missing / "okvos"),
    KB_DIR=str(missing / "kb"),
    WORKDIR=str(missing / "run"),
  )
  with pytest.raises(FileNotFoundError, match="fix the paths cell") as e:
    exec(_cell(nb, "check-paths").source, scope)
  assert all(name in str(e.value) for name in ("HF_DIR", "OKVOS_DIR", "KB_DIR"))
  assert "Not in Colab" in capsys.readouterr().out  # MOUNT_DRIVE is a no-op here
  with pytest.raises(FileNotFoundError, match="HF_DIR"):
    exec(_cell(nb, "parity").source, scope)
  with pytest.raises(FileNotFoundError, match="config.json"):
    exec(_cell(nb, "config").source, scope)  # the plan reads the checkpoint's config
  for cell_id in ("train", "evaluate"):
    with pytest.raises(FileNotFoundError, match="fix the paths cell"):
      exec(_cell(nb, cell_id).source, scope)
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    exec(_cell(nb, "export").source, scope)


# ----------------------------------------------------------------------------
# A real shrunk run, and the quickstart executed on it.
# ----------------------------------------------------------------------------

# What a notebook does, as a script: train, then evaluate step 1 without search.
_RUN_SCRIPT = """
import json, sys
from segresearch_jax import notebook, runtime, train

config = notebook.load_config("runlocal", **json.loads(sys.argv[1]))
runtime.quiet_logging()
runtime.enable_compilation_cache(config)
train.train(config)
result = notebook.evaluate_checkpoint(config, step=1, search=False, masks=False)
with open(sys.argv[2], "w") as f:
  json.dump(result, f)
"""


@pytest.fixture(scope="module")
def shrunk_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("notebook_run")
  shared = {
    # Shared with the notebook run: data and mask cache are built once, and the
    # notebook's kernel reads the programs this run compiled from the cache.
    "data.synthetic_dir": str(root / "synthetic"),
    "compilation_cache_dir": str(root / "xla_cache"),
  }
  overrides = {**shared, "workdir": str(root / "run")}
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", _RUN_SCRIPT, json.dumps(overrides), str(root / "eval_step1.json")],
    capture_output=True,
    text=True,
    timeout=1200,
    cwd=REPO,
    env=env,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return {"workdir": root / "run", "shared": shared, "root": root}


@pytest.mark.slow
@pytest.mark.xdist_group("notebook_run")  # shares the module's run
def test_views_of_a_real_run(shrunk_run):
  run = shrunk_run["workdir"]
  curve = notebook.show_reward_curve(run, display=False)
  with Image.open(run / "reward_curve.png") as png:
    assert curve.size == png.size
  records = [json.loads(x) for x in (run / "trajectories" / "step_000002.jsonl").open()]
  for row, rec in enumerate(records):
    text = notebook.trajectory_markdown(run, row=row)
    assert text.startswith(f"### Step 2, rollout {row} of {len(records)}")
    assert f"| score | {rec['reward']['score']:.3f} |" in text
  results = json.loads((run / "eval" / "results.json").read_text())
  for i, rec in enumerate(results["per_sample"]):
    figure = notebook.mask_figure(run, sample=i, frames=2)
    panels = 2 + (rec["keyframe_index"] is not None)
    assert figure.width == panels * 256 + (panels - 1) * 4
  table = notebook.eval_table(run)
  assert table.startswith("2 held-out samples") and "J&F" in table


@pytest.mark.slow
@pytest.mark.xdist_group("notebook_run")  # shares the module's run
def test_evaluate_checkpoint_evaluates_the_saved_step(shrunk_run):
  result = json.loads((shrunk_run["root"] / "eval_step1.json").read_text())
  assert result["step"] == 1 and result["samples"] == 2
  assert result["search/per_trajectory"] == 0  # search detached
  out = shrunk_run["workdir"] / "eval_1_no_search"
  assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
  assert not (out / "results.json").exists()  # masks=False: no segmentation


def _inject_parameters(nb, **values):
  """Papermill-style: a cell setting `values` right after the "parameters" cell."""
  import nbformat

  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  unknown = set(values) - _parameter_names(nb)
  assert not unknown, f"the parameters cell does not define {unknown}"
  source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)


def _outputs(nb, cell_id):
  return _cell(nb, cell_id).outputs


def _data(outputs, mime):
  return [o["data"][mime] for o in outputs if mime in o.get("data", {})]


@pytest.mark.slow
@pytest.mark.xdist_group("notebook_run")  # shares the module's run
def test_quickstart_executes_on_cpu(shrunk_run, tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  nb = _read_notebook(QUICKSTART)
  workdir = tmp_path / "quickstart"
  _inject_parameters(nb, STEPS=2, SHRINK=True, WORKDIR=str(workdir), OVERRIDES=shrunk_run["shared"])
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  )
  client.execute()  # raises CellExecutionError on the first failing cell

  setup = "".join(o.get("text", "") for o in _outputs(nb, "setup"))
  assert "nothing to install" in setup  # CI never pip-installs from the notebook
  assert (workdir / "reward_curve.png").stat().st_size > 1000
  assert json.loads((workdir / "summary.json").read_text())["steps"] == 2
  assert _data(_outputs(nb, "curve"), "image/png")
  markdown = _data(_outputs(nb, "trajectory"), "text/markdown")
  assert len(_outputs(nb, "trajectory")) == 1  # shown once, not echoed as a string too
  assert markdown and markdown[0].startswith("### Step 2, rollout")
  assert _data(_outputs(nb, "masks"), "image/png")
  table = "".join(o.get("text", "") for o in _outputs(nb, "eval"))
  assert "with search" in table and "J&F" in table
