"""The mask reward term: nearest-entry gathers into the cache tables, and weight 0 = docs/method.md §3.1."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CountingEmbedder, reward_config, words_embedder

from segresearch_jax.data import mask_tables
from segresearch_jax.rewards import mask, okvos

G, K = 5, 4
P = K * (K - 1) // 2
F = 3
GT = {
  "4": {"bbox_2d": [100, 200, 300, 400], "point_2d": [200, 300], "area": 1.0, "max_conn_area": 0.8},
  "10": {"bbox_2d": [0, 0, 50, 50], "point_2d": [25, 25], "area": 0.5, "max_conn_area": 1.0},
}
FRAME_NUMBERS = [4, 7, 10]  # Frame 7 is shown but the target is absent there.


def tables(b, seed=0):
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (b, F, G, G), dtype=np.uint8),
    rng.integers(0, 256, (b, F, P, P), dtype=np.uint8),
  )


# One compilation per shape (eager mode would compile every primitive separately).
mask_score = jax.jit(mask.mask_score, static_argnames="prompt")


def score(point_iou, box_iou, slot, box, point, valid, prompt="box"):
  return np.asarray(
    mask_score(
      point_iou,
      box_iou,
      np.asarray(slot),
      np.asarray(box, np.float32),
      np.asarray(point, np.float32),
      np.asarray(valid),
      prompt=prompt,
    )
  )


def brute_point(x, y):
  c = mask_tables.bin_centres(G)
  return int(np.argmin(np.abs(c - y))), int(np.argmin(np.abs(c - x)))


def brute_pair(lo, hi):
  """The valid pair (i < j) nearest to (lo, hi) in summed L1, by enumeration."""
  c = mask_tables.bin_centres(K).astype(np.float64)
  pairs = mask_tables.bin_pairs(K)
  cost = np.abs(c[pairs[:, 0]] - lo) + np.abs(c[pairs[:, 1]] - hi)
  return int(np.argmin(cost))


def test_grid_centre_prompts_read_their_entry():
  point_iou, box_iou = tables(1)
  centres, kc, pairs = (
    mask_tables.bin_centres(G),
    mask_tables.bin_centres(K),
    mask_tables.bin_pairs(K),
  )
  # Every (slot, grid prompt) in one batch: the tables repeated per row.
  slot, i, j = (a.ravel() for a in np.meshgrid(range(F), range(G), range(G), indexing="ij"))
  n = len(slot)
  got = score(
    np.repeat(point_iou, n, 0),
    np.repeat(box_iou, n, 0),
    slot,
    np.tile([0, 0, 1, 1], (n, 1)),
    np.stack([centres[j], centres[i]], 1),
    np.ones(n, bool),
    "point",
  )
  np.testing.assert_allclose(got, point_iou[0, slot, i, j] / 255.0, rtol=1e-6)
  slot, px, py = (a.ravel() for a in np.meshgrid(range(F), range(P), range(P), indexing="ij"))
  n = len(slot)
  boxes = np.stack([kc[pairs[px, 0]], kc[pairs[py, 0]], kc[pairs[px, 1]], kc[pairs[py, 1]]], 1)
  got = score(
    np.repeat(point_iou, n, 0),
    np.repeat(box_iou, n, 0),
    slot,
    boxes,
    np.full((n, 2), 0.5),
    np.ones(n, bool),
    "box",
  )
  np.testing.assert_allclose(got, box_iou[0, slot, px, py] / 255.0, rtol=1e-6)


def test_nearest_entries_match_brute_force():
  rng = np.random.default_rng(1)
  n = 400
  point_iou, box_iou = tables(n, seed=2)
  slot = rng.integers(0, F, n)
  points = rng.uniform(-0.05, 1.05, (n, 2)).astype(np.float32)
  lo = rng.uniform(0, 1, (n, 2))
  # Half the boxes narrower than a bin, so both ends often land in one bin.
  width = np.where(rng.random((n, 1)) < 0.5, rng.uniform(0, 0.2, (n, 2)), rng.uniform(0, 1, (n, 2)))
  hi = np.minimum(lo + width, 1.0)
  boxes = np.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], axis=1).astype(np.float32)
  valid = np.ones(n, bool)
  got_point = score(point_iou, box_iou, slot, boxes, points, valid, "point")
  got_box = score(point_iou, box_iou, slot, boxes, points, valid, "box")
  got_mean = score(point_iou, box_iou, slot, boxes, points, valid, "mean")
  for b in range(n):
    i, j = brute_point(points[b, 0], points[b, 1])
    assert got_point[b] == pytest.approx(point_iou[b, slot[b], i, j] / 255.0)
    px = brute_pair(boxes[b, 0], boxes[b, 2])
    py = brute_pair(boxes[b, 1], boxes[b, 3])
    assert got_box[b] == pytest.approx(box_iou[b, slot[b], px, py] / 255.0), (boxes[b],)
  np.testing.assert_allclose(got_mean, 0.5 * (got_point + got_box), rtol=1e-6)


def test_invalid_inputs_score_zero():
  point_iou, box_iou = tables(5)
  point_iou[:] = box_iou[:] = 255
  box = [[0.1, 0.1, 0.6, 0.6]] * 5
  point = [[0.3, 0.3]] * 5
  slot = [0, -1, F, 1, 2]
  valid = [True, True, True, False, True]
  for prompt in mask.PROMPTS:
    got = score(point_iou, box_iou, slot, box, point, valid, prompt)
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 0.0, 1.0])


def test_inverted_box_has_no_box_entry():
  point_iou, box_iou = tables(1)
  point_iou[:] = box_iou[:] = 255
  inverted = [[0.6, 0.1, 0.2, 0.6]]  # x1 > x2
  assert score(point_iou, box_iou, [0], inverted, [[0.3, 0.3]], [True], "box")[0] == 0.0
  assert score(point_iou, box_iou, [0], inverted, [[0.3, 0.3]], [True], "mean")[0] == 0.5
  assert score(point_iou, box_iou, [0], inverted, [[0.3, 0.3]], [True], "point")[0] == 1.0


def test_table_shapes_are_checked():
  point_iou, box_iou = tables(2)
  args = (np.zeros(2, int), np.zeros((2, 4)), np.zeros((2, 2)), np.ones(2, bool))
  with pytest.raises(ValueError, match=r"point_iou must be \[B, F, G, G\]"):
    mask.mask_score(point_iou[0], box_iou, *args)
  with pytest.raises(ValueError, match="box_iou must be"):
    mask.mask_score(point_iou, box_iou[:1], *args)
  with pytest.raises(mask_tables.MaskCacheError, match="not K"):
    mask.mask_score(point_iou, box_iou[..., :4, :4], *args)


def test_unknown_prompt_mode():
  point_iou, box_iou = tables(1)
  with pytest.raises(ValueError, match="prompt must be one of"):
    score(point_iou, box_iou, [0], [[0, 0, 1, 1]], [[0, 0]], [True], "both")


def test_jit():
  point_iou, box_iou = tables(4)
  args = (
    jnp.asarray(point_iou),
    jnp.asarray(box_iou),
    jnp.asarray([0, 1, 2, -1]),
    jnp.tile(jnp.asarray([0.4, 0.3, 0.8, 0.6]), (4, 1)),
    jnp.full((4, 2), 0.5),
    jnp.asarray([True, True, True, True]),
  )
  # Bins: x 0.4 -> 1, 0.8 -> 3; y 0.3 -> 1, 0.6 -> 2; the point 0.5 -> cell 2 of 5.
  px, py = mask_tables.pair_index(1, 3, K), mask_tables.pair_index(1, 2, K)
  box = box_iou[np.arange(3), np.arange(3), px, py] / 255.0
  point = point_iou[np.arange(3), np.arange(3), 2, 2] / 255.0
  expected = {"box": box, "point": point, "mean": 0.5 * (box + point)}
  for prompt in mask.PROMPTS:
    got = mask_score(*args, prompt=prompt)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), [*expected[prompt], 0.0], rtol=1e-6)


# ----------------------------------------------------------------------------
# Host parsing and the total score.
# ----------------------------------------------------------------------------


def response(keyframe="4", box=(110, 205, 300, 395), point=(205, 300), multi_line=False):
  answer = json.dumps({"bbox_2d": list(box), "point_2d": list(point)})
  if multi_line:
    answer = answer.replace(", ", ",\n")
  return (
    '<thinking> a </thinking> <search> {"name": "text_search", "query": "Glimmer Cup 2031"} </search>'
    "<information>1. (Title: T) x\n</information>\n\n"
    f"<thinking> k </thinking> <keyframe> {keyframe} </keyframe>"
    f"<thinking> z </thinking> <answer> {answer} </answer>"
  )


RESPONSES = [
  response(),
  response(keyframe="10", box=(0, 0, 50, 50), point=(25, 25)),
  response(keyframe="7"),  # shown, but no target there: §3.1 does not score it
  response(keyframe="13"),  # not shown
  response(multi_line=True),  # §3.1's answer regex has no DOTALL
  "<thinking> nothing </thinking>",
]


def test_parse_mask_prompts_reads_like_spec_3_1():
  frame_numbers = np.tile(FRAME_NUMBERS, (len(RESPONSES), 1))
  out = mask.parse_mask_prompts(RESPONSES, [GT] * len(RESPONSES), frame_numbers, "norm1000")
  np.testing.assert_array_equal(out["keyframe_slot"], [0, 2, 1, -1, 0, -1])
  np.testing.assert_array_equal(out["valid"], [True, True, False, False, False, False])
  np.testing.assert_allclose(out["pred_box"][0], [0.110, 0.205, 0.300, 0.395], rtol=1e-6)
  np.testing.assert_allclose(out["pred_point"][1], [0.025, 0.025], rtol=1e-6)
  # Validity equals "§3.1 scores the answer": keyframe in the GT and the answer parses.
  parsed = okvos.parse_responses(
    RESPONSES, [GT] * 6, [None] * 6, embed_fn=words_embedder, config=reward_config()
  )
  np.testing.assert_array_equal(out["valid"], parsed["keyframe_ok"] & parsed["answer_ok"])


def test_parse_mask_prompts_abs_resized_and_errors():
  out = mask.parse_mask_prompts(
    [response(box=(10, 20, 30, 40), point=(20, 30))],
    [json.dumps(GT)],
    np.asarray([FRAME_NUMBERS]),
    "abs_resized",
    resized=(100, 200),
  )
  np.testing.assert_allclose(out["pred_box"][0], [0.1, 0.1, 0.3, 0.2], rtol=1e-6)
  np.testing.assert_allclose(out["pred_point"][0], [0.2, 0.15], rtol=1e-6)
  with pytest.raises(ValueError, match="resized"):
    mask.normalise_prompts(np.zeros((1, 4)), np.zeros((1, 2)), "abs_resized")
  with pytest.raises(ValueError, match="Unknown coordinate convention"):
    mask.normalise_prompts(np.zeros((1, 4)), np.zeros((1, 2)), "pixels")
  with pytest.raises(ValueError, match="frame_numbers must be"):
    mask.parse_mask_prompts(RESPONSES, [GT] * 6, np.asarray(FRAME_NUMBERS), "norm1000")


def test_weight_zero_is_exactly_spec_3_1_and_weight_adds():
  n = len(RESPONSES)
  steps = [["Glimmer Cup 2031 winner"]] * n
  official = okvos.score_batch(
    RESPONSES, [GT] * n, steps, embed_fn=words_embedder, config=reward_config()
  )
  point_iou, box_iou = tables(n)
  prompts = mask.parse_mask_prompts(RESPONSES, [GT] * n, np.tile(FRAME_NUMBERS, (n, 1)), "norm1000")
  term = np.asarray(mask_score(point_iou, box_iou, **prompts))
  assert term[0] > 0  # A real lookup, not a zero that hides the arithmetic.
  assert term[2:].tolist() == [0.0] * (n - 2)  # invalid responses
  same = mask.add_mask_term(official, term, 0.0)
  np.testing.assert_array_equal(np.asarray(same["score"]), official["score"])  # bit-exact
  np.testing.assert_array_equal(np.asarray(same["mask_score"]), term)
  for key in okvos.TERMS:
    np.testing.assert_array_equal(np.asarray(same[key]), official[key])
  weighted = mask.add_mask_term(official, term, 2.0)
  np.testing.assert_allclose(
    np.asarray(weighted["score"]), official["score"] + 2.0 * term, rtol=1e-6
  )


# ----------------------------------------------------------------------------
# The embedder memo that makes the batched reward fast (rewards/okvos.py).
# ----------------------------------------------------------------------------


def test_cached_embedder_embeds_each_distinct_text_once():
  counting = CountingEmbedder()
  calls = counting.calls
  embed = okvos.CachedEmbedder(counting, max_size=3)
  texts = ["a b", "c", "a b", "d", "c"]
  np.testing.assert_array_equal(embed(texts), words_embedder(texts))
  assert calls == [["a b", "c", "d"]]  # duplicates within a call embedded once
  np.testing.assert_array_equal(embed(["d", "e"]), words_embedder(["d", "e"]))
  assert calls[-1] == ["e"]  # "d" came from the memo
  # max_size 3: "a b" was least recently used and is gone; "d" and "e" are kept.
  embed(["a b", "e"])
  assert calls[-1] == ["a b"]
  embed.clear()
  embed(["e"])
  assert calls[-1] == ["e"]
  assert embed([]).shape[0] == 0
