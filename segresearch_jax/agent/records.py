"""Trajectory records: one JSON line per episode, one file per training step.

Like the official step records, each line holds what a person needs to read an
episode back: the sample, the decoded response (observations included, special
tokens kept so turn boundaries are visible), every tool call with its latency and
error, the stop reason and, once known, the reward terms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segresearch_jax import protocol


def _jsonable(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return _jsonable(dataclasses.asdict(value))
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return value


def episode_records(
  tokenizer: Any,
  out: Any,
  samples: Sequence[Mapping[str, Any]],
  tool_calls: Sequence[Sequence[Any]] | None = None,
  rewards: Sequence[Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
  """One dict per rollout row.

  Args:
    tokenizer: the run's tokenizer (for decoding).
    out: the rollout's output on the host (an `agent.rollout.RolloutOutput` of numpy
      arrays; response_ids, response_length, loss_mask, stop_reason, num_turns are read).
    samples: per row, the sample fields to keep (id, ability, question, ...).
    tool_calls: per row, the bridge's call records.
    rewards: per row, the reward terms.
  """
  rows = []
  for r, sample in enumerate(samples):
    n = int(out.response_length[r])
    rows.append(
      {
        **{k: _jsonable(v) for k, v in sample.items()},
        "response": tokenizer.decode([int(t) for t in out.response_ids[r, :n]]),
        "response_tokens": n,
        "generated_tokens": int(np.sum(out.loss_mask[r])),
        "num_turns": int(out.num_turns[r]),
        "stop_reason": protocol.STOP_REASONS[int(out.stop_reason[r])],
        "tool_calls": _jsonable(list(tool_calls[r])) if tool_calls is not None else [],
        "reward": _jsonable(rewards[r]) if rewards is not None else None,
      }
    )
  return rows


def write_step(
  directory: str | os.PathLike,
  step: int,
  records: Sequence[Mapping[str, Any]],
  process: int | None = None,
) -> pathlib.Path:
  """Writes `step_{step:06d}.jsonl` under `directory` and returns its path.

  With `process` (multi-process runs) each process writes its own episodes to
  `step_{step:06d}.process_{process}.jsonl`.
  """
  name = f"step_{step:06d}" + ("" if process is None else f".process_{process}")
  path = pathlib.Path(directory) / f"{name}.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".jsonl.tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for rec in records:
      f.write(json_line(rec) + "\n")
  tmp.replace(path)
  return path


def json_line(record: Any, **kwargs: Any) -> str:
  """`json.dumps(record)` as text that always encodes as UTF-8.

  Non-ASCII text is kept readable (`ensure_ascii=False`) unless the record holds a lone
  surrogate (a model can decode to one, e.g. "\\ud800"), which UTF-8 cannot encode;
  then the whole record is written with `\\uXXXX` escapes, which `json.loads` reads
  back to the same string, so no record is lost or altered.

  Args:
    record: a JSON-serialisable value.
    **kwargs: passed to `json.dumps` (e.g. `indent`).
  """
  text = json.dumps(record, ensure_ascii=False, **kwargs)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    text = json.dumps(record, ensure_ascii=True, **kwargs)
  return text
