"""Paired comparison of two training runs that drew the same prompts.

    python -m segresearch_jax.tools.compare_runs RUN CONTROL [--window 5] \
        [--terms reward,keyframe_score,format_score]

With a few prompts a step, a step's mean training reward says more about which
prompts were drawn than about the policy. Two runs with the same `seed`, data and
batch shape draw the same prompts at every step, with the same sampling streams, so
the per-step difference of their rewards cancels the draw. To see whether GRPO
learns, train the setting to judge and a control that does not move the policy
(`--config.optim.lr=0`, the frozen warm start), both from the same step-0
checkpoint, then compare them.

The tool reads each run's `metrics.jsonl` (phase `train`) and refuses steps whose
trajectory records (`trajectories/step_*.jsonl`) show different sample ids in the
two runs (e.g. after `dapo.filter_groups` drew refills in one of them): the
difference would be meaningless there. It prints, per window of steps, each run's
mean, their difference and the standard error of the per-step differences, then the
same over all compared steps.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from segresearch_jax.eval import curves

DEFAULT_TERMS = ("reward", "keyframe_score", "format_score", "igr", "process_score")


def train_metrics(run: str | pathlib.Path) -> dict[int, dict[str, float]]:
  """The `train` rows of a run's metrics JSONL by step (a later row of a step wins)."""
  path = pathlib.Path(run) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"No metrics.jsonl in {run}: is it a training run folder?")
  rows = curves.read_metrics(path)
  return {int(r["step"]): r for r in rows if r.get("phase") == "train"}


def step_sample_ids(run: str | pathlib.Path, step: int) -> list[str] | None:
  """Sorted sample ids of a step's trajectory records (all processes), None if absent."""
  files = sorted((pathlib.Path(run) / "trajectories").glob(f"step_{step:06d}*.jsonl"))
  if not files:
    return None
  ids = []
  for f in files:
    ids += [str(json.loads(line)["id"]) for line in f.read_text().splitlines() if line.strip()]
  return sorted(ids)


def _value(row: Mapping[str, float], term: str) -> float:
  for key in (term, f"reward/{term}"):
    if key in row and row[key] is not None:
      return float(row[key])
  raise KeyError(term)


def paired_steps(run: str | pathlib.Path, control: str | pathlib.Path) -> list[int]:
  """Steps logged by both runs whose trajectory records name the same samples.

  Raises:
    ValueError: no common step, or a common step where the runs saw different
      samples (the comparison is only valid on identical prompts).
  """
  a, b = train_metrics(run), train_metrics(control)
  steps = sorted(set(a) & set(b))
  if not steps:
    raise ValueError(f"{run} and {control} have no training step in common.")
  for step in steps:
    ids_a, ids_b = step_sample_ids(run, step), step_sample_ids(control, step)
    if ids_a is not None and ids_b is not None and ids_a != ids_b:
      raise ValueError(
        f"Step {step}: the runs drew different samples ({len(ids_a)} vs {len(ids_b)} "
        "episodes, ids differ), so their rewards cannot be paired. Use the same seed, "
        "data and batch shape, and no dapo.filter_groups refills."
      )
  return steps


def compare(
  run: Mapping[int, Mapping[str, float]],
  control: Mapping[int, Mapping[str, float]],
  steps: Sequence[int],
  terms: Sequence[str] = DEFAULT_TERMS,
  window: int = 5,
) -> list[dict[str, object]]:
  """Per-window and overall paired statistics of `terms` over `steps`.

  Returns:
    One dict per (window or "all", term): `steps` (first-last), `term`, `run`,
    `control` (window means), `diff` (mean per-step difference) and `se` (its
    standard error; NaN for a single step).
  """
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}.")
  steps = list(steps)
  spans = [steps[i : i + window] for i in range(0, len(steps), window)]
  spans = [(f"{s[0]}-{s[-1]}", s) for s in spans]
  if len(spans) > 1:
    spans.append(("all", steps))
  out = []
  for label, span in spans:
    for term in terms:
      try:
        x = np.array([_value(run[s], term) for s in span])
        y = np.array([_value(control[s], term) for s in span])
      except KeyError:
        raise ValueError(f"Term {term!r} is not in the metrics of both runs.") from None
      diff, se = curves.mean_se(x - y)
      out.append(
        dict(steps=label, term=term, run=float(x.mean()), control=float(y.mean()), diff=diff, se=se)
      )
  return out


def format_table(rows: Sequence[Mapping[str, object]], run: str, control: str) -> str:
  lines = [
    f"paired by step: run = {run}, control = {control}",
    f"{'steps':>9}  {'term':18s} {'run':>8} {'control':>8} {'diff':>8} {'+- se':>7}",
  ]
  for r in rows:
    se = "" if math.isnan(r["se"]) else f"{r['se']:.3f}"
    lines.append(
      f"{r['steps']:>9}  {r['term']:18s} {r['run']:8.3f} {r['control']:8.3f} "
      f"{r['diff']:+8.3f} {se:>7}"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run", help="the run to judge (its workdir)")
  parser.add_argument("control", help="the control run, e.g. --config.optim.lr=0")
  parser.add_argument("--window", type=int, default=5, help="steps per window")
  parser.add_argument(
    "--terms", default=",".join(DEFAULT_TERMS), help="comma-separated reward terms"
  )
  args = parser.parse_args(argv)
  try:
    steps = paired_steps(args.run, args.control)
    rows = compare(
      train_metrics(args.run),
      train_metrics(args.control),
      steps,
      [t for t in args.terms.split(",") if t],
      args.window,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"compare_runs: {e}", file=sys.stderr)
    return 2
  print(format_table(rows, args.run, args.control))
  return 0


if __name__ == "__main__":
  sys.exit(main())
