"""Run logging: console progress with ETA, a metrics JSONL and TensorBoard events.

Only process 0 writes (on a pod every host computes the same global metrics).
The JSONL has one object per logged step, `{"step": N, "phase": ..., name: value}`;
`segresearch_jax.eval.reports` plots training curves from it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from segresearch_jax.eval import curves


def _scalar(value: Any) -> float | None:
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def format_duration(seconds: float) -> str:
  """`1h02m`, `3m05s` or `12s`."""
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m"
  return f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsWriter:
  """Writes scalar metrics to the console, `metrics.jsonl` and TensorBoard.

  Args:
    workdir: the run folder; files go to `workdir/metrics.jsonl` and `workdir/tb/`.
    total_steps: for the ETA.
    tensorboard: write TensorBoard event files (tensorboardX).
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._t0: float | None = None
    self._s0 = 0
    if self.active:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  def start(self, step: int) -> None:
    """Marks the start of timing (the ETA ignores steps before it, e.g. compilation)."""
    self._t0, self._s0 = time.time(), step

  def eta(self, step: int) -> str:
    if self._t0 is None or step <= self._s0:
      return "?"
    per_step = (time.time() - self._t0) / (step - self._s0)
    return format_duration(per_step * max(0, self.total_steps - step))

  def write(
    self, step: int, metrics: Mapping[str, Any], phase: str = "train", console: str | None = None
  ) -> None:
    """Logs `metrics` (non-scalars and non-finite values dropped) at `step`."""
    if not self.active:
      return
    clean = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
    with self.path.open("a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), "phase": phase, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{phase}/{k}", v, step)
      self._tb.flush()
    if console is not None:
      print(console, flush=True)

  def read(self, phase: str | None = None) -> list[dict[str, Any]]:
    """The logged rows (optionally of one phase), in order."""
    if not self.path.is_file():
      return []
    return curves.read_metrics(self.path, phase)

  def truncate_after(self, step: int, keep_phases: tuple[str, ...] = ("sft",)) -> None:
    """Drops rows logged after `step` (a resumed run recomputes them), but for `keep_phases`."""
    if not self.active or not self.path.is_file():
      return
    rows = self.read()
    kept = [r for r in rows if r.get("phase") in keep_phases or r["step"] <= step]
    if len(kept) != len(rows):
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      tmp.replace(self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
