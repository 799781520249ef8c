"""The official OK-VOS reward: every branch of SPEC 3.1, and the jnp split equal to it."""

import json
import zlib

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from segresearch_jax.rewards import okvos

GT = {
  "4": {"bbox_2d": [100, 200, 300, 400], "point_2d": [200, 300], "area": 1.0, "max_conn_area": 0.8},
  "10": {"bbox_2d": [0, 0, 50, 50], "point_2d": [25, 25], "area": 0.5, "max_conn_area": 1.0},
}
STEPS = ["Glimmer Cup 2031 winner"]


def words_embedder(texts):
  """Deterministic bag-of-words vectors: cheap and enough to decide IGR in tests."""
  out = np.zeros((len(texts), 64), np.float32)
  for i, t in enumerate(texts):
    for w in t.lower().split():
      out[i, zlib.crc32(w.encode()) % 64] += 1.0
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def answer(box, point):
  return json.dumps({"bbox_2d": box, "point_2d": point})


def response(
  keyframe="4",
  box=(110, 205, 300, 395),
  point=(205, 300),
  search=1,
  query="Glimmer Cup 2031 winner",
):
  parts = []
  for _ in range(search):
    parts.append(
      f'<thinking> look it up </thinking> <search> {{"name": "text_search", "query": "{query}"}} </search>'
      "<information>1. (Title: Glimmer Cup) The 2031 cup went to the Zar team.\n</information>\n\n"
    )
  parts.append(
    f"<thinking> frame {keyframe} is clear </thinking> <keyframe> {keyframe} </keyframe>"
  )
  parts.append("Here is the high-res version of your selected frame: ")
  parts.append(f"<thinking> there </thinking> <answer> {answer(list(box), list(point))} </answer>")
  return "".join(parts)


def score(resp, steps=STEPS, **kw):
  return okvos.score_response(resp, GT, steps, embed_fn=words_embedder, **kw)


def test_valid_response_scores_every_term():
  s = score(response())
  assert (s["iou_score"], s["box_l1_score"], s["point_l1_score"]) == (1.0, 1.0, 1.0)
  assert s["keyframe_score"] == 0.8 and s["format_score"] == 1.0 and s["igr"] == 1.0
  assert s["tpr"] == pytest.approx(1 - 0.3**2)  # one search turn + format
  assert s["process_score"] == pytest.approx(0.5 * (1 + 1 - 0.3**2))
  assert s["score"] == pytest.approx(3.8 + s["process_score"])
  assert s["num_search"] == 1.0


def test_iou_uses_the_plus_one_convention():
  # [0,0,9,9] vs [5,0,14,9]: inter 5x10=50, areas 100 each, IoU 50/150 with +1; 45/135 without.
  assert okvos.box_iou_plus_one([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)
  # Touching boxes (ix1 == ix2) do not overlap.
  assert okvos.box_iou_plus_one([0, 0, 5, 5], [5, 0, 9, 5]) == 0.0


def test_missing_thinking_tags_drop_format_but_not_accuracy():
  s = score(response().replace("<thinking> frame 4 is clear </thinking>", ""))
  assert s["format_score"] == 0.0
  assert s["iou_score"] == 1.0  # the score is not gated by format
  assert s["tpr"] == pytest.approx(1 - 0.3)


def test_keyframe_not_in_ground_truth_zeroes_accuracy():
  s = score(response(keyframe="7"))
  assert s["iou_score"] == s["box_l1_score"] == s["point_l1_score"] == s["keyframe_score"] == 0.0
  assert s["format_score"] == 1.0


def test_first_keyframe_tag_counts():
  r = response(keyframe="10").replace(
    "<keyframe> 10 </keyframe>", "<keyframe> 4 </keyframe> <keyframe> 10 </keyframe>"
  )
  assert score(r)["keyframe_score"] == 0.8


def test_malformed_json_answer():
  r = response().replace('"point_2d"', "point_2d")
  s = score(r)
  assert s["format_score"] == 0.0 and s["iou_score"] == 0.0 and s["keyframe_score"] == 0.8


def test_multi_line_answer_scores_nothing_but_keeps_format():
  r = response().replace('"point_2d"', '\n"point_2d"')
  s = score(r)
  assert s["format_score"] == 1.0  # the format regex has DOTALL
  assert s["iou_score"] == s["point_l1_score"] == 0.0  # the answer regex does not


def test_point_outside_its_own_box():
  s = score(response(box=(110, 205, 300, 395), point=(305, 300)))
  assert s["point_l1_score"] == 0.0 and s["iou_score"] == 1.0


def test_far_box_fails_l1_and_iou():
  s = score(response(box=(100, 200, 200, 300), point=(150, 250)))
  assert s["iou_score"] == 0.0 and s["box_l1_score"] == 0.0 and s["point_l1_score"] == 1.0


def test_search_turns_are_capped_by_the_budget():
  s = score(response(search=14))
  assert s["tpr"] == pytest.approx(1 - 0.3 ** (10 + 1))
  assert s["num_search"] == 14.0


def test_no_steps_means_process_is_format():
  assert score(response(), steps=None)["process_score"] == 1.0
  assert (
    score(response().replace("<thinking> there </thinking>", ""), steps=[])["process_score"] == 0.0
  )


def test_unrelated_first_query_gets_no_igr():
  assert score(response(query="weather in paris"))["igr"] == 0.0


def test_igr_with_the_packaged_minilm():
  pytest.importorskip("sentence_transformers")
  embed = okvos.minilm_embedder()
  good = okvos.score_response(
    response(query="who won the Glimmer Cup in 2031"), GT, STEPS, embed_fn=embed
  )
  bad = okvos.score_response(response(query="recipe for banana bread"), GT, STEPS, embed_fn=embed)
  assert good["igr"] == 1.0 and bad["igr"] == 0.0


# ----------------------------------------------------------------------------
# The jnp path equals the reference on generated responses.
# ----------------------------------------------------------------------------

coord = st.integers(0, 1000)


@st.composite
def responses(draw):
  pieces = []
  for _ in range(draw(st.integers(0, 3))):
    q = draw(st.sampled_from(["Glimmer Cup 2031 winner", "paris weather", "zar team emblem"]))
    think = draw(st.sampled_from(["<thinking> a </thinking> ", "", "<thinking>\nb\n</thinking>\n"]))
    pieces.append(f'{think}<search> {{"name": "text_search", "query": "{q}"}} </search>')
  kf = draw(st.sampled_from(["4", "10", "7", "x"]))
  think = draw(st.sampled_from(["<thinking> k </thinking> ", ""]))
  pieces.append(f"{think}<keyframe> {kf} </keyframe>")
  x1, y1, x2, y2, px, py = (draw(coord) for _ in range(6))
  body = draw(
    st.sampled_from(
      [
        answer([x1, y1, x2, y2], [px, py]),
        answer([x1, y1, x2, y2], [px + 0.5, py]),
        json.dumps({"bbox_2d": [x1, y1, x2], "point_2d": [px, py]}),
        json.dumps({"bbox_2d": [x1, y1, x2, y2], "point_2d": [px, py], "extra": 1}),
        "{not json",
        answer([x1, y1, x2, y2], [px, py]).replace(", ", ",\n"),
      ]
    )
  )
  near = draw(st.booleans())
  if near:  # make the accuracy terms fire often
    body = answer([100 + x1 % 20, 200, 300, 400 - y1 % 20], [200 + px % 120, 300])
  think = draw(st.sampled_from(["<thinking> z </thinking> ", ""]))
  pieces.append(f"{think}<answer> {body} </answer>")
  return " ".join(pieces)


@hypothesis.settings(
  max_examples=150, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(st.lists(st.tuples(responses(), st.booleans()), min_size=1, max_size=6))
def test_jnp_path_equals_reference(batch):
  texts = [r for r, _ in batch]
  steps = [STEPS if has else None for _, has in batch]
  got = okvos.score_batch(texts, [GT] * len(texts), steps, embed_fn=words_embedder)
  for i, (text, st_) in enumerate(zip(texts, steps)):
    ref = okvos.score_response(text, GT, st_, embed_fn=words_embedder)
    for key in (*okvos.TERMS, "format_score", "igr", "num_search", "score"):
      assert got[key][i] == pytest.approx(ref[key], abs=1e-5), (key, text)


def test_reward_terms_jit():
  parsed = okvos.parse_responses([response()] * 3, [GT] * 3, [STEPS] * 3, embed_fn=words_embedder)
  out = jax.jit(okvos.reward_terms)(parsed)
  assert out["score"].shape == (3,)
  np.testing.assert_allclose(np.asarray(out["score"]), score(response())["score"], rtol=1e-6)


def test_step_embeddings_are_cached_per_sample():
  calls = []

  def counting(texts):
    calls.append(list(texts))
    return words_embedder(texts)

  cache = {}
  okvos.parse_responses(
    [response()] * 4, [GT] * 4, [STEPS] * 4, embed_fn=counting, step_cache=cache
  )
  okvos.parse_responses(
    [response()] * 4, [GT] * 4, [STEPS] * 4, embed_fn=counting, step_cache=cache
  )
  assert calls.count(STEPS) == 1  # steps embedded once, queries once per batch
  assert len(calls) == 3
