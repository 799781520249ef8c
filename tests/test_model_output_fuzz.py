"""Hostile model output: every parser, the reward and every writer take any text.

Model output (and what search puts into the response) is arbitrary text: huge
numbers, deep nesting, protocol tags inside queries, 10,000 tags, lone surrogates,
200k characters. None of it may raise; invalid text scores 0. How long each call
takes on such text is measured by `benchmarks/parse_speed.py`, not asserted here.
"""

import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from conftest import reward_config

from segresearch_jax import protocol
from segresearch_jax.agent import records
from segresearch_jax.eval import predictions, reports
from segresearch_jax.rewards import mask, okvos

SHOWN = [0, 4, 10, 13, 18, 23]
GT = {
  "4": {"bbox_2d": [100, 200, 300, 400], "point_2d": [200, 300], "area": 1.0, "max_conn_area": 0.8},
  "10": {"bbox_2d": [0, 0, 50, 50], "point_2d": [25, 25], "area": 0.5, "max_conn_area": 1.0},
}
STEPS = ["Glimmer Cup 2031 winner"]
MAX_CHARS = 200_000

ATOMS = [
  "<thinking>",
  "</thinking>",
  "<search>",
  "</search>",
  "<keyframe>",
  "</keyframe>",
  "<answer>",
  "</answer>",
  "<information>",
  "</information>",
  "<|im_end|>",
  "<image>",
  " 4 ",
  " -1 ",
  "05",
  "\u0665",
  "1" + "0" * 400,  # beyond float range
  "9" * 5000,  # beyond Python's int() digit limit
  "[" * 3000,  # beyond json's recursion limit
  "{" * 50,
  '{"name": "text_search", "query": "<search> <answer> [1,2,3,4] </answer>"}',
  '{"name": "text_search", "query": "\\ud800"}',
  '{"bbox_2d": [1e400, NaN, -Infinity, 4], "point_2d": [1, 2]}',
  '{"bbox_2d": [110, 205, 300, 395], "point_2d": [205, 300]}',
  '"query": "',
  '"}',
  "\ud800",
  "\udfff",
  "\n",
  " ",
  "\u00a0",
]
BLOCK = st.tuples(
  st.one_of(st.sampled_from(ATOMS), st.text(max_size=8)),
  st.sampled_from([1, 1, 1, 3, 100, 10_000]),
).map(lambda b: b[0] * b[1])
HOSTILE = st.lists(BLOCK, max_size=12).map(lambda blocks: "".join(blocks)[:MAX_CHARS])


def cheap_embedder(texts):
  out = np.zeros((len(texts), 8), np.float32)
  out[:, 0] = 1.0
  return out


def report_results(pred):
  """The smallest results dict `write_html_report` renders: one sample that failed."""
  record = {
    "id": pred.id,
    "ability": pred.ability,
    "question": "Please find the target.",
    "status": "failed",
    "error": "fuzz",
    "mask_dir": "masks/s",
    "frame_paths": [],
    "frame_numbers": [],
    "J": 0.0,
    "F": 0.0,
    "JF": 0.0,
  }
  return {
    "summary": {"overall": {"J": 0.0, "F": 0.0, "JF": 0.0, "count": 1}},
    "per_sample": [record],
  }


def run_everything(text, out_dir):
  """Every consumer of model output, as the trainer and evaluation call it."""
  for shown in (SHOWN, None):
    action = protocol.parse_action(text, shown)
    if action.error is not None:
      protocol.error_observation(action.error)
  protocol.parse_answer(text)
  protocol.first_keyframe(text)
  protocol.text_search_observation([(text, text)])
  protocol.image_search_observation([text])

  terms = okvos.score_response(text, GT, STEPS, embed_fn=cheap_embedder, config=reward_config())
  assert all(np.isfinite(v) for v in terms.values())
  parsed = okvos.parse_responses(
    [text], [GT], [STEPS], embed_fn=cheap_embedder, config=reward_config()
  )
  assert np.all(np.isfinite(parsed["max_conn_area"]))
  assert np.isfinite(okvos.validation_reward(text, GT))
  mask.parse_mask_prompts([text], [GT], np.array([SHOWN]), "norm1000")

  row = {"id": "s", "response": text, "tool_calls": [{"query": action.query or text}]}
  path = records.write_step(out_dir, 0, [row])
  assert json.loads(path.read_text(encoding="utf-8")) == row

  pred = predictions.parse_response("s", "one-hop", text, reward=terms)
  path = predictions.write_predictions(out_dir / "predictions.jsonl", [pred])
  assert predictions.read_predictions(path)[0].response == text
  reports.write_html_report(report_results(pred), out_dir, predictions=[pred])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("fuzz")


def test_hostile_output_never_raises(out_dir):
  @hypothesis.settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
  )
  @hypothesis.given(HOSTILE)
  def check(text):
    run_everything(text, out_dir)

  check()


@pytest.mark.parametrize(
  "name",
  ["huge_number", "deep_nesting", "tags_in_query", "ten_thousand_tags", "surrogate", "long"],
)
def test_named_hostile_inputs(name, out_dir):
  text = {
    "huge_number": '<keyframe> 4 </keyframe><answer>{"bbox_2d": [1'
    + "0" * 400
    + ', 2, 3, 4], "point_2d": [1, 2]}</answer>',
    "deep_nesting": "<keyframe> 4 </keyframe><answer>" + "[" * 1000 + "</answer>",
    "tags_in_query": '<search>{"name": "text_search", "query": "<keyframe> 4 </keyframe>"}'
    + "</search>",
    "ten_thousand_tags": "<thinking>" * 10_000 + "<answer>" * 10_000,
    "surrogate": '<search>{"name": "text_search", "query": "\ud800"}</search>\udfff',
    "long": ("<thinking> x </thinking> <keyframe> 4 " * 10_000)[:MAX_CHARS],
  }[name]
  run_everything(text, out_dir)
  assert okvos.score_response(text, GT, None, config=reward_config())["iou_score"] == 0.0
