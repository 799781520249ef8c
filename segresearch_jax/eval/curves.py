"""A run's metrics.jsonl: the one reader, the paired gain over the frozen control, the
reward curve.

    rows = curves.read_metrics(workdir / "metrics.jsonl", phase="train")
    curves.paired_gain([r for r in rows if "control/score" in r])
    curves.plot_rewards(rows, workdir / "reward_curve.png")

The trainer writes the file (`metrics.MetricsWriter`) and reads it back for its
summary; the notebook, `tools/compare_runs` and `eval/reports` read it here too.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from segresearch_jax.rewards import okvos as okvos_reward


def read_json_lines(path: str | os.PathLike, key: str) -> list[dict[str, Any]]:
  """The objects of a JSONL file in order, each required to hold `key`.

  Raises:
    ValueError: a line that is not JSON or lacks `key`, naming the file and line.
  """
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e}).") from e
      if not isinstance(row, dict) or key not in row:
        raise ValueError(f'{path}:{n}: each line must be an object with a "{key}".')
      rows.append(row)
  return rows


def read_metrics(path: str | os.PathLike, phase: str | None = None) -> list[dict[str, Any]]:
  """The rows of a metrics JSONL (one object with an integer-like "step" per line), in
  order; with `phase`, only that phase's rows ("train", "sft", "eval", ...).

  Raises:
    ValueError: a line that is not JSON or has no "step", naming the file and line.
  """
  rows = read_json_lines(path, "step")
  return [r for r in rows if phase is None or r.get("phase") == phase]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean); the error is NaN for a single value."""
  v = np.asarray(values, float)
  se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
  return float(np.mean(v)), se


def paired_gain(rows: list[dict]) -> dict[str, tuple[float, float]]:
  """(mean, standard error) of `reward/score - control/score` over all logged steps
  (at least 2) and, from 4 steps on, over their second half ("steps A-B" keys)."""
  steps = np.array([r["step"] for r in rows])
  diff = np.array([r["reward/score"] - r["control/score"] for r in rows], float)
  starts = (0, len(diff) // 2) if len(diff) >= 4 else (0,)
  return {f"steps {steps[lo]}-{steps[-1]}": mean_se(diff[lo:]) for lo in starts}


def plot_rewards(
  rows: list[dict], path: pathlib.Path, eval_rows: list[dict] | None = None, window: int = 5
) -> None:
  """Mean reward over GRPO steps: per step, its running mean, the outcome / process
  parts, and the held-out greedy score of each evaluation (`eval_rows`) if any.

  With a few prompts per step, which prompts were drawn moves the per-step mean more
  than the policy does; the running mean over `window` steps shows the trend.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = np.array([r["step"] for r in rows])
  score = np.array([r["reward/score"] for r in rows], float)
  control = np.array([r.get("control/score", np.nan) for r in rows], float)
  paired = bool(np.isfinite(control).all())
  if paired:
    fig, (ax, dax) = plt.subplots(
      2, 1, figsize=(7, 4), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
  else:
    fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, score, label="reward (score)", lw=1.2, color="C0")
  if paired:
    ax.plot(steps, control, label="frozen warm start, same prompts", lw=1.2, color="0.55")
  if len(score) >= window:
    running = np.convolve(score, np.ones(window) / window, mode="valid")
    ax.plot(
      steps[window - 1 :], running, label=f"reward, mean of {window} steps", lw=2.5, color="#0b2f6b"
    )
  ax.plot(
    steps,
    [sum(r[f"reward/{k}"] for k in okvos_reward.OUTCOME_TERMS) for r in rows],
    label="outcome terms",
    color="C1",
  )
  ax.plot(steps, [r["reward/process_score"] for r in rows], label="process term", color="C2")
  held_out = [r for r in eval_rows or () if "score" in r]
  if held_out:
    ax.plot(
      [r["step"] for r in held_out],
      [r["score"] for r in held_out],
      "s--",
      color="C3",
      label="held-out score (greedy)",
    )
  ax.set_ylabel("mean over rollouts")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7 if paired else 8)
  if paired:  # The prompt draw cancels in the per-step difference.
    diff = score - control
    dax.axhline(0.0, color="0.4", lw=0.8)
    dax.bar(steps, diff, color="C0", alpha=0.35, label="reward - frozen, per step")
    mean_so_far = np.cumsum(diff) / np.arange(1, len(diff) + 1)
    dax.plot(steps, mean_so_far, color="#0b2f6b", lw=2, label="mean so far")
    dax.set_ylabel("policy - frozen")
    dax.grid(alpha=0.3)
    dax.legend(fontsize=7)
    ax = dax
  ax.set_xlabel("GRPO step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
