"""Trajectory records: decoded episodes as JSON lines, one file per step."""

import dataclasses
import json

import numpy as np

from segresearch_jax import protocol
from segresearch_jax.agent import records, rollout


class _Words:
  def decode(self, ids, skip_special_tokens=False):
    return " ".join(f"w{i}" for i in ids)


@dataclasses.dataclass
class _Call:
  tool: str
  query: str
  latency_s: float
  error: str | None


def test_records_round_trip_through_jsonl(tmp_path):
  out = rollout.RolloutOutput(
    response_ids=np.array([[5, 6, 7, 0], [8, 0, 0, 0]]),
    response_positions=np.zeros((2, 3, 4), np.int32),
    response_valid=np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool),
    loss_mask=np.array([[1, 0, 1, 0], [1, 0, 0, 0]], bool),
    logprobs=np.zeros((2, 4), np.float32),
    response_length=np.array([3, 1]),
    stop_reason=np.array([protocol.FINISHED, protocol.MAX_LENGTH]),
    num_turns=np.array([1, 0]),
    obs_kind=np.zeros((2, 1), np.int32),
    obs_slot=np.zeros((2, 1), np.int32),
    search_patches=np.zeros((2, 1, 1, 1), np.float32),
  )
  samples = [{"id": "a", "frames": np.array([0, 4])}, {"id": "b", "frames": np.array([1, 2])}]
  calls = [[_Call("text_search", "who", 0.01, None)], []]
  rows = records.episode_records(_Words(), out, samples, calls, [{"score": 2.5}, {"score": 0.0}])
  path = records.write_step(tmp_path, 7, rows)
  assert path.name == "step_000007.jsonl"
  back = [json.loads(line) for line in path.read_text().splitlines()]
  assert back[0]["response"] == "w5 w6 w7"
  assert back[0]["generated_tokens"] == 2
  assert back[0]["stop_reason"] == "finished" and back[1]["stop_reason"] == "max_length"
  assert back[0]["tool_calls"] == [
    {"tool": "text_search", "query": "who", "latency_s": 0.01, "error": None}
  ]
  assert back[0]["frames"] == [0, 4] and back[1]["reward"] == {"score": 0.0}


def test_lone_surrogates_are_written_and_read_back(tmp_path):
  # A model can decode to a lone surrogate (or write `\ud800` in a search JSON); UTF-8
  # cannot encode one, and the step's records must not be lost for it.
  rows = [
    {"id": "a", "response": "x\ud800y é", "tool_calls": [{"query": "\udfff"}]},
    {"id": "b", "response": "plain é"},
  ]
  path = records.write_step(tmp_path, 1, rows)
  lines = path.read_text(encoding="utf-8").splitlines()
  assert [json.loads(line) for line in lines] == rows
  assert "é" in lines[1]  # records without surrogates stay readable
  assert records.json_line({"a": "\ud800"}) == '{"a": "\\ud800"}'
