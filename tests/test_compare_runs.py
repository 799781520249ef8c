"""tools/compare_runs: paired per-step comparison of two runs on the same prompts."""

import json
import math

import numpy as np
import pytest

from segresearch_jax.tools import compare_runs


def _write_run(path, rewards, ids_per_step, extra_rows=()):
  path.mkdir(parents=True)
  rows = [{"step": 0, "phase": "sft", "loss": 1.0}, *extra_rows]
  for step, r in enumerate(rewards, 1):
    rows.append({"step": step, "phase": "train", "reward/reward": r, "reward/format_score": r / 2})
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  traj = path / "trajectories"
  traj.mkdir()
  for step, ids in enumerate(ids_per_step, 1):
    lines = [json.dumps({"id": i, "response": "x"}) for i in ids]
    (traj / f"step_{step:06d}.jsonl").write_text("\n".join(lines) + "\n")


def test_paired_statistics_per_window_and_overall(tmp_path):
  run = [1.0, 1.5, 1.2, 2.0, 1.1, 0.9, 1.4]
  control = [1.0, 1.2, 1.3, 1.5, 1.0, 0.8, 1.0]
  ids = [[f"s{step}", f"s{step}", f"t{step}"] for step in range(len(run))]
  _write_run(tmp_path / "a", run, ids)
  _write_run(tmp_path / "b", control, [list(reversed(i)) for i in ids])  # order is free

  steps = compare_runs.paired_steps(tmp_path / "a", tmp_path / "b")
  assert steps == list(range(1, 8))
  rows = compare_runs.compare(
    compare_runs.train_metrics(tmp_path / "a"),
    compare_runs.train_metrics(tmp_path / "b"),
    steps,
    terms=("reward", "format_score"),
    window=3,
  )
  labels = [(r["steps"], r["term"]) for r in rows]
  assert labels == [
    (s, t) for s in ("1-3", "4-6", "7-7", "all") for t in ("reward", "format_score")
  ]
  d = np.array(run) - np.array(control)
  first = rows[0]
  assert first["run"] == pytest.approx(np.mean(run[:3]))
  assert first["control"] == pytest.approx(np.mean(control[:3]))
  assert first["diff"] == pytest.approx(d[:3].mean())
  assert first["se"] == pytest.approx(d[:3].std(ddof=1) / math.sqrt(3))
  assert math.isnan(rows[4]["se"])  # one step in the last window
  overall = rows[6]
  assert overall["diff"] == pytest.approx(d.mean())
  assert overall["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(7))
  assert rows[7]["diff"] == pytest.approx(d.mean() / 2)  # format_score = reward / 2


def test_only_common_steps_are_compared(tmp_path):
  _write_run(tmp_path / "a", [1.0, 2.0, 3.0], [["x"]] * 3)
  _write_run(tmp_path / "b", [1.0, 1.0], [["x"]] * 2)
  assert compare_runs.paired_steps(tmp_path / "a", tmp_path / "b") == [1, 2]


def test_different_prompts_are_refused(tmp_path, capsys):
  _write_run(tmp_path / "a", [1.0, 2.0], [["x", "y"], ["z", "z"]])
  _write_run(tmp_path / "b", [1.0, 1.0], [["x", "y"], ["z", "w"]])
  with pytest.raises(ValueError, match="Step 2: the runs drew different samples"):
    compare_runs.paired_steps(tmp_path / "a", tmp_path / "b")
  assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
  assert "cannot be paired" in capsys.readouterr().err


def test_cli_prints_the_table(tmp_path, capsys):
  _write_run(tmp_path / "a", [1.0, 2.0], [["x"], ["y"]])
  _write_run(tmp_path / "b", [0.5, 1.0], [["x"], ["y"]])
  assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--terms", "reward"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[-1].split() == ["1-2", "reward", "1.500", "0.750", "+0.750", "0.250"]


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
  _write_run(tmp_path / "a", [1.0], [["x"]])
  assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
  assert "No metrics.jsonl" in capsys.readouterr().err
  _write_run(tmp_path / "b", [1.0], [["x"]])
  assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--terms", "nope"]) == 2
  assert "Term 'nope'" in capsys.readouterr().err
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 1, "phase": "train"}\n{broken\n')
  assert compare_runs.main([str(tmp_path / "c"), str(tmp_path / "b")]) == 2
  assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err
  with pytest.raises(ValueError, match="window"):
    compare_runs.compare({}, {}, [1], window=0)
