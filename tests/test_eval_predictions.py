"""Evaluation after the rollout: parsing responses, predictions JSONL, and the whole
evaluate_predictions pipeline on a tiny synthetic OK-VOS test split."""

import functools
import json
import pathlib
import types

import numpy as np
import pytest
from PIL import Image

from segresearch_jax import protocol
from segresearch_jax.agent import rollout
from segresearch_jax.data import okvos, synthetic
from segresearch_jax.eval import metrics, predictions
from segresearch_jax.rewards import okvos as okvos_reward

IM_END, IM_START = protocol.IM_END, protocol.IM_START


def obs(text: str) -> str:
  return protocol.wrap_observation(text)


def answer(box, point) -> str:
  return f'<thinking>found it</thinking>\n<answer>\n{{"bbox_2d": {box},\n "point_2d": {point}}}\n</answer>{IM_END}'


def search_turn(query: str, tool: str = "text_search") -> str:
  return (
    f'<thinking>need facts</thinking>\n<search> {{"name": "{tool}", "query": "{query}"}} </search>'
  )


# ----------------------------------------------------------------------------
# Parsing.
# ----------------------------------------------------------------------------


def test_parse_full_response():
  info = protocol.text_search_observation(
    [("Glimmer Cup", "Won by the Falcons."), ("Falcons", "Blue star.")]
  )
  response = (
    search_turn("Who won the Glimmer Cup?")
    + obs(info)
    + search_turn("Falcons emblem", "image_search")
    + obs(protocol.image_search_observation(["Falcons"]))
    + search_turn("")  # Empty query: an error observation.
    + obs(protocol.error_observation("Search query is empty."))
    + "<thinking>frame 10</thinking>\n<keyframe> 10 </keyframe>"
    + obs(protocol.KEYFRAME_OBSERVATION)
    + answer([100, 200, 300, 400], [150, 250])
  )
  p = predictions.parse_response(
    "s1", "one-hop", response, stop_reason="finished", reward={"score": 3}
  )
  assert p.keyframe == 10
  assert p.box == [100, 200, 300, 400] and p.point == [150, 250]  # Multi-line answer.
  assert not p.no_target and p.error is None
  assert p.stop_reason == "finished" and p.reward == {"score": 3.0}
  assert [c["tool"] for c in p.search_calls] == ["text_search", "image_search", "text_search"]
  assert p.search_calls[0]["query"] == "Who won the Glimmer Cup?"
  assert p.search_calls[0]["results"] == [
    {"title": "Glimmer Cup", "text": "Won by the Falcons."},
    {"title": "Falcons", "text": "Blue star."},
  ]
  assert p.search_calls[1]["results"] == [{"name": "Falcons"}]
  assert p.search_calls[2]["error"] == "Search query is empty."


def test_first_keyframe_and_first_answer_are_used():
  response = (
    "<thinking>a</thinking><keyframe> 5 </keyframe>"
    + obs(protocol.KEYFRAME_OBSERVATION)
    + answer([1, 2, 3, 4], [2, 3])
    + "<keyframe> 15 </keyframe>"
    + answer([9, 9, 9, 9], [9, 9])
  )
  p = predictions.parse_response("s", "in-video", response)
  assert p.keyframe == 5 and p.box == [1, 2, 3, 4]


def test_no_target_and_broken_answers():
  no_target = (
    "<thinking>absent</thinking><keyframe> -1 </keyframe>"
    + obs(protocol.NO_TARGET_OBSERVATION)
    + answer([0, 0, 0, 0], [0, 0])
  )
  p = predictions.parse_response("s", "in-video", no_target)
  assert p.no_target and p.keyframe == -1 and p.error is None
  # The all-zero answer alone also means "no target".
  p = predictions.parse_response(
    "s", "in-video", "<keyframe> 5 </keyframe>" + answer([0, 0, 0, 0], [0, 0])
  )
  assert p.no_target
  p = predictions.parse_response(
    "s", "in-video", '<keyframe> 5 </keyframe><answer>{"bbox_2d": [1, 2]}</answer>'
  )
  assert p.error == "no_answer" and p.box is None and not p.no_target
  p = predictions.parse_response("s", "in-video", answer([1, 2, 3, 4], [2, 3]))
  assert p.error == "no_keyframe"
  with pytest.raises(TypeError, match="string"):
    predictions.parse_response("s", "in-video", None)


def test_tool_call_records_take_precedence():
  records = [
    {
      "action": "search",
      "tool": "text_search",
      "query": "q1",
      "error": None,
      "results": [{"title": "T", "text": "body", "score": 1.0}],
    },
    {
      "action": "keyframe",
      "tool": None,
      "query": None,
      "keyframe": 5,
      "error": None,
      "results": [],
    },
  ]
  p = predictions.parse_response("s", "one-hop", search_turn("other"), tool_calls=records)
  assert p.search_calls == [
    {
      "tool": "text_search",
      "query": "q1",
      "error": None,
      "results": [{"title": "T", "text": "body", "score": 1.0}],
    }
  ]


def test_search_metrics_count_tools_and_first_query_hits():
  from segresearch_jax import evaluate

  def call(tool, title):
    key = "name" if tool == "image_search" else "title"
    return {
      "action": "search",
      "tool": tool,
      "query": "q",
      "error": None,
      "results": [{key: title}],
    }

  def pred(sid, *calls):
    return predictions.parse_response(sid, "one-hop", "", tool_calls=list(calls))

  chain = lambda tool, title: json.dumps([{"tool": tool, "title": title, "doc_id": 0}])
  preds = [
    pred("hit", call("text_search", "2039 Ember Cup"), call("text_search", "other")),
    pred("image", call("image_search", "Zarnok Falcons")),
    pred("wrong tool", call("text_search", "Zarnok Falcons")),  # the team's text document
    pred("late", call("text_search", "other"), call("text_search", "2039 Ember Cup")),
    pred("none"),
    pred("in-video", call("text_search", "x")),  # no chain: not counted
  ]
  chains = {
    "hit": chain("text_search", "2039 Ember Cup"),
    "image": chain("image_search", "Zarnok Falcons"),
    "wrong tool": chain("image_search", "Zarnok Falcons"),
    "late": chain("text_search", "2039 Ember Cup"),
    "none": chain("text_search", "2039 Ember Cup"),
    "in-video": "[]",
  }
  m = evaluate.search_metrics(preds, chains)
  assert m["search/text_per_trajectory"] == pytest.approx(6 / 6)
  assert m["search/image_per_trajectory"] == pytest.approx(1 / 6)
  assert m["search/first_query_hit"] == pytest.approx(2 / 5)
  assert "search/first_query_hit" not in evaluate.search_metrics(preds, {})


def test_predictions_jsonl_round_trip(tmp_path):
  preds = [
    predictions.parse_response(
      "a", "one-hop", search_turn("x") + "<keyframe> 0 </keyframe>" + answer([1, 2, 3, 4], [2, 3])
    ),
    predictions.parse_response("b", "in-video", "nothing"),
  ]
  path = predictions.write_predictions(tmp_path / "p.jsonl", preds)
  back = predictions.read_predictions(path)
  assert back == preds
  path.write_text(path.read_text() + '{"id": "c"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:3"):
    predictions.read_predictions(path)


# ----------------------------------------------------------------------------
# End to end on a synthetic split.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  paths = synthetic.build(root, num_train=2, num_test=4, frames=(3, 4), size=(64, 48))
  return paths.okvos_dir, predictions.load_eval_samples(paths.okvos_dir, "test")


def box_segmenter(frames, keyframe_index, box, point):
  """A weight-free segmenter: the box, filled, on the keyframe only."""
  masks = np.zeros(frames.shape[:3], bool)
  h, w = frames.shape[1:3]
  x1, y1, x2, y2 = (int(round(v)) for v in box)
  masks[keyframe_index, max(y1, 0) : min(y2, h - 1) + 1, max(x1, 0) : min(x2, w - 1) + 1] = True
  return masks


def colour_segmenter(frames, keyframe_index, box, point):
  """A weight-free segmenter: pixels of the point's colour in every frame."""
  px, py = int(round(point[0])), int(round(point[1]))
  colour = frames[keyframe_index, py, px].astype(int)
  return np.all(np.abs(frames.astype(int) - colour) < 40, axis=-1)


def perfect_response(sample, convention="norm1000", resized=None) -> tuple[str, int, dict]:
  """A response answering with the GT box and point of the frame with most target."""
  numbers, gt = okvos.read_video_masks(sample.annotation_dir)
  k = int(np.argmax(gt.sum(axis=(1, 2))))
  stats = {str(numbers[k]): okvos.mask_stats(gt[k])}
  h, w = gt.shape[1:]
  conv = okvos.convert_ground_truth(stats, convention, w, h, resized)[str(numbers[k])]
  response = (
    f"<thinking>it is in frame {numbers[k]}</thinking><keyframe> {numbers[k]} </keyframe>"
    + obs(protocol.KEYFRAME_OBSERVATION)
    + answer(conv["bbox_2d"], conv["point_2d"])
  )
  return response, numbers[k], conv


def empty_mask_scores(sample) -> tuple[np.ndarray, np.ndarray]:
  """Per annotated frame, J and F of an empty prediction: 1 where the GT is empty too."""
  _, gt = okvos.read_video_masks(sample.annotation_dir)
  absent = ~gt.any(axis=(1, 2))
  return absent.astype(float), absent.astype(float)


def test_load_eval_samples(split):
  okvos_dir, samples = split
  assert [s.ability for s in samples] == ["in-video", "one-hop", "multi-hop", "relational"]
  s = samples[0]
  assert s.frame_numbers == tuple(5 * i for i in range(len(s.frame_paths)))  # Numbers != indices.
  assert all(pathlib.Path(p).is_file() for p in s.frame_paths)
  assert pathlib.Path(s.annotation_dir).is_dir()


def test_evaluate_end_to_end(split, tmp_path, capsys):
  _, samples = split
  perfect, perfect_number, perfect_conv = perfect_response(samples[0])
  records = [
    predictions.parse_response(samples[0].id, samples[0].ability, perfect, reward={"score": 4.0}),
    predictions.parse_response(
      samples[1].id,
      samples[1].ability,
      search_turn("who won?")
      + obs(protocol.text_search_observation([("Cup", "The Otters.")]))
      + "<thinking>absent</thinking><keyframe> -1 </keyframe>",
      reward={"score": 1.0},
    ),
    # samples[2] has no prediction at all.
    predictions.parse_response(
      samples[3].id,
      samples[3].ability,
      '<keyframe> 0 </keyframe><answer>{"bbox_2d": [1, 2, 3], "point_2d": [1, 1]}</answer>',
    ),
  ]
  path = predictions.write_predictions(tmp_path / "predictions.jsonl", records)
  out = tmp_path / "eval"
  results = predictions.evaluate_predictions(
    [r.to_json() for r in predictions.read_predictions(path)],
    samples,
    box_segmenter,
    "norm1000",
    out,
  )
  by_id = {r["id"]: r for r in results["per_sample"]}
  assert [r["status"] for r in results["per_sample"]] == ["ok", "no_target", "missing", "no_answer"]
  assert results["status_counts"] == {"ok": 1, "no_target": 1, "missing": 1, "no_answer": 1}
  assert results["config"]["segmenter"] == "box_segmenter"

  # The perfect prediction: its keyframe NUMBER maps to its index in the frame list,
  # and the box in pixels fills exactly the GT box on that frame.
  numbers, gt = okvos.read_video_masks(samples[0].annotation_dir)
  rec = by_id[samples[0].id]
  k_index = samples[0].frame_numbers.index(perfect_number)
  assert rec["keyframe"] == perfect_number and rec["keyframe_index"] == k_index
  h, w = gt.shape[1:]
  x1, y1, x2, y2 = perfect_conv["bbox_2d"]
  assert rec["box_px"] == pytest.approx(
    [x1 * w / 1000, y1 * h / 1000, x2 * w / 1000, y2 * h / 1000]
  )
  expected = np.zeros_like(gt)
  expected[numbers.index(perfect_number)] = box_segmenter(
    np.zeros((len(numbers), h, w, 3), np.uint8), numbers.index(perfect_number), rec["box_px"], None
  )[numbers.index(perfect_number)]
  j, f = metrics.j_and_f(gt, expected)
  assert rec["J_per_frame"] == pytest.approx(list(j))
  assert rec["F_per_frame"] == pytest.approx(list(f))
  assert rec["J"] == pytest.approx(j.mean()) and rec["JF"] == pytest.approx(
    (j.mean() + f.mean()) / 2
  )
  # The keyframe's J is the box-vs-mask IoU, well above 0 for a GT box.
  kf = numbers.index(perfect_number)
  box_mask = expected[kf]
  assert j[kf] == pytest.approx((box_mask & gt[kf]).sum() / (box_mask | gt[kf]).sum())
  assert j[kf] > 0.4

  # Masks on disk: one 0/255 PNG per annotated frame, equal to what was scored.
  mask_dir = out / rec["mask_dir"]
  pngs = sorted(mask_dir.glob("*.png"))
  assert [p.stem for p in pngs] == rec["annotated_frames"]
  np.testing.assert_array_equal(okvos.read_mask(pngs[kf]), expected[kf])
  assert np.asarray(Image.open(pngs[kf])).max() == 255

  # Empty-mask samples are scored, not skipped: 1 on frames where the target is absent.
  for s in samples[1:]:
    r = by_id[s.id]
    ej, ef = empty_mask_scores(s)
    assert r["J_per_frame"] == pytest.approx(list(ej)) and r["F_per_frame"] == pytest.approx(
      list(ef)
    )
    assert all(not okvos.read_mask(p).any() for p in (out / r["mask_dir"]).glob("*.png"))

  # Summary: per ability one sample each; overall is the mean over the 4 samples.
  summary = results["summary"]
  assert list(summary) == ["in-video", "one-hop", "multi-hop", "relational", "overall"]
  assert summary["multi-hop"]["missing"] == 1 and summary["overall"]["missing"] == 1
  for s in samples:
    assert summary[s.ability]["JF"] == pytest.approx(by_id[s.id]["JF"])
  assert summary["overall"]["J"] == pytest.approx(np.mean([by_id[s.id]["J"] for s in samples]))
  assert results["reward"] == {"score": pytest.approx(2.5)}
  assert results["search"]["per_sample"] == pytest.approx(0.25)
  assert by_id[samples[1].id]["search_calls"][0]["results"] == [
    {"title": "Cup", "text": "The Otters."}
  ]

  # Files and the printed table.
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert (out / "report.html").is_file()
  printed = capsys.readouterr().out
  assert "overall" in printed and "J&F" in printed and "score 2.500" in printed


def test_colour_segmenter_scores_a_perfect_answer_high(split, tmp_path):
  _, samples = split
  response, _, _ = perfect_response(samples[0])
  pred = predictions.parse_response(samples[0].id, samples[0].ability, response)
  results = predictions.evaluate_predictions(
    [pred], samples[:1], colour_segmenter, "norm1000", tmp_path, report=False, print_table=False
  )
  rec = results["per_sample"][0]
  assert rec["status"] == "ok"
  assert rec["J"] > 0.8 and rec["F"] > 0.8  # Propagated to every frame, not only the keyframe.
  assert not (tmp_path / "report.html").exists()


def test_keyframe_not_in_video_scores_empty(split, tmp_path):
  _, samples = split
  pred = predictions.parse_response(
    samples[0].id, samples[0].ability, "<keyframe> 7 </keyframe>" + answer([1, 2, 30, 40], [5, 5])
  )
  results = predictions.evaluate_predictions(
    [pred], samples[:1], box_segmenter, "norm1000", tmp_path, report=False, print_table=False
  )
  rec = results["per_sample"][0]
  assert rec["status"] == "bad_keyframe" and "keyframe 7" in rec["error"]
  ej, _ = empty_mask_scores(samples[0])
  assert rec["J"] == pytest.approx(ej.mean())


def test_evaluate_rejects_bad_input(split, tmp_path):
  _, samples = split
  ok = predictions.parse_response(samples[0].id, "in-video", perfect_response(samples[0])[0])
  kw = dict(report=False, print_table=False)
  with pytest.raises(ValueError, match="Two predictions"):
    predictions.evaluate_predictions([ok, ok], samples, box_segmenter, "norm1000", tmp_path, **kw)
  stranger = predictions.parse_response("nope", "in-video", "x")
  with pytest.raises(ValueError, match="not in the split"):
    predictions.evaluate_predictions([stranger], samples, box_segmenter, "norm1000", tmp_path, **kw)
  with pytest.raises(ValueError, match="convention"):
    predictions.evaluate_predictions([ok], samples, box_segmenter, "pixels", tmp_path, **kw)
  with pytest.raises(ValueError, match="resized"):
    predictions.evaluate_predictions([ok], samples, box_segmenter, "abs_resized", tmp_path, **kw)

  def wrong_shape(frames, k, box, point):
    return np.zeros(frames.shape[1:3], bool)

  with pytest.raises(ValueError, match="segmenter returned shape"):
    predictions.evaluate_predictions([ok], samples[:1], wrong_shape, "norm1000", tmp_path, **kw)


def test_abs_resized_convention(split, tmp_path):
  _, samples = split
  response, number, _ = perfect_response(samples[0], "abs_resized", (868, 868))
  pred = predictions.parse_response(samples[0].id, samples[0].ability, response)
  results = predictions.evaluate_predictions(
    [pred],
    samples[:1],
    box_segmenter,
    "abs_resized",
    tmp_path,
    resized=(868, 868),
    report=False,
    print_table=False,
  )
  numbers, gt = okvos.read_video_masks(samples[0].annotation_dir)
  truth = okvos.mask_stats(gt[numbers.index(number)])
  rec = results["per_sample"][0]
  # Back in original pixels, up to the rounding to the 868-pixel grid.
  assert rec["box_px"] == pytest.approx(truth["bbox_2d"], abs=0.1)
  assert rec["point_px"] == pytest.approx(truth["point_2d"], abs=0.1)


def test_end_to_end_with_the_weight_free_video_segmenter(split, tmp_path):
  """The real weight-free segmenter (segmentation/video.py) on every sample."""
  from segresearch_jax.segmentation import video

  _, samples = split
  preds = []
  for s in samples:
    response, _, _ = perfect_response(s)
    preds.append(predictions.parse_response(s.id, s.ability, response))
  segment_fn = functools.partial(video.segment_video, segmenter=video.WeightFreeVideoSegmenter())
  results = predictions.evaluate_predictions(
    preds, samples, segment_fn, "norm1000", tmp_path, print_table=False
  )
  assert results["status_counts"] == {"ok": len(samples)}
  assert results["config"]["segmenter"] == "weight_free"
  # Ground-truth prompts on flat-coloured objects: the propagated masks score well.
  assert results["summary"]["overall"]["JF"] > 0.85
  for rec in results["per_sample"]:
    assert len(list((tmp_path / rec["mask_dir"]).glob("*.png"))) == len(rec["annotated_frames"])
  assert (tmp_path / "report.html").is_file() and (tmp_path / "results.json").is_file()


# ----------------------------------------------------------------------------
# Broken samples: scored 0 and listed, never dropped, never fatal.
# ----------------------------------------------------------------------------


class _Encoder:
  """What `components.make_dataset` needs of the prompt encoder, without a tokenizer."""

  model_cfg = type("ModelCfg", (), {"coord_convention": "norm1000"})()

  def __call__(self, sample):
    return {}


def _answering_runner(params, batch, rng, search=True):
  """A policy that answers each prompt with its ground-truth box on the first frame."""
  responses = []
  for gt in batch["ground_truth"]:
    frame, target = next((k, v) for k, v in json.loads(gt).items() if v["area"] > 0)
    answer_json = json.dumps({"bbox_2d": target["bbox_2d"], "point_2d": target["point_2d"]})
    responses.append(
      f"<keyframe> {frame} </keyframe>"
      + obs(protocol.KEYFRAME_OBSERVATION)
      + f"<answer>{answer_json}</answer>{IM_END}"
    )
  n = len(responses)
  out = rollout.RolloutOutput(  # only stop_reason is read; one-token rows otherwise
    response_ids=np.zeros((n, 1), np.int32),
    response_positions=np.zeros((n, 3, 1), np.int32),
    response_valid=np.ones((n, 1), bool),
    loss_mask=np.ones((n, 1), bool),
    logprobs=np.zeros((n, 1), np.float32),
    response_length=np.ones(n, np.int32),
    stop_reason=np.zeros(n, np.int32),
    num_turns=np.zeros(n, np.int32),
    obs_kind=np.zeros((n, 1), np.int32),
    obs_slot=np.zeros((n, 1), np.int32),
    search_patches=np.zeros((n, 1, 1, 1), np.float32),
  )
  return type("Episodes", (), {"responses": responses, "out": out, "tool_calls": [[]] * n})()


def _scorer(batch, episodes):
  n = len(episodes.responses)
  terms = (*okvos_reward.OUTCOME_TERMS, "process_score", "score", "num_search")
  return {k: np.ones(n, np.float32) for k in terms}


@pytest.fixture()
def broken_split(tmp_path):
  """A synthetic test split of 4: sample 1's row has images=None (it fails
  preprocessing), sample 2 lost a frame the policy is not shown."""
  import pandas as pd

  paths = synthetic.build(tmp_path / "syn", num_train=2, num_test=4, frames=(8, 8), size=(64, 48))
  table = pathlib.Path(paths.okvos_dir) / "test.parquet"
  rows = pd.read_parquet(table)
  rows.at[1, "images"] = None
  rows.to_parquet(table)
  names = sorted(rows.at[2, "images"])
  shown = set(okvos.sample_frame_indices(len(names), 3))  # the config's data.num_frames
  hidden = next(i for i in range(len(names)) if i not in shown)
  (pathlib.Path(paths.okvos_dir) / "test" / "JPEGImages" / rows.at[2, "video"]).joinpath(
    f"{names[hidden]}.jpg"
  ).unlink()
  return paths.okvos_dir, list(rows["id"])


def test_load_eval_samples_keeps_a_row_without_images(broken_split):
  okvos_dir, ids = broken_split
  samples = predictions.load_eval_samples(okvos_dir, "test")
  assert [s.id for s in samples] == ids
  assert samples[1].error and "images" in samples[1].error and samples[0].error is None


def test_evaluation_scores_broken_samples_zero_and_lists_them(broken_split, tmp_path):
  from configs import okvos as okvos_config
  from segresearch_jax import components as components_lib
  from segresearch_jax import evaluate

  okvos_dir, ids = broken_split
  config = okvos_config.get_config()
  config.batch_size, config.data.frame_size = 2, 16
  # Only what evaluation reads of `components.Components`.
  components = types.SimpleNamespace(
    eval_dataset=lambda: components_lib.make_dataset(
      config, okvos_dir, "test", _Encoder(), train=False, batch_size=2, whole=True
    ),
    eval_runner=_answering_runner,
    eval_scorer=_scorer,
    okvos_dir=okvos_dir,
    model_cfg=_Encoder.model_cfg,
  )
  out = tmp_path / "eval"
  m = evaluate.evaluate(config, None, components, out)
  assert m["samples"] == 4 and m["failed"] == 2
  assert [f["id"] for f in m["failures"]] == [ids[1], ids[2]]
  assert "images" in m["failures"][0]["error"]
  assert "Missing frame" in m["failures"][1]["error"]
  assert m["score"] == pytest.approx(0.75)  # the failed preprocessing scores 0
  assert m["val/reward"] == pytest.approx(0.75)  # 3 rollouts answer the exact box
  results = json.loads((out / predictions.RESULTS_FILE).read_text())
  assert results["status_counts"] == {"ok": 2, "failed": 2}
  assert results["summary"]["overall"]["count"] == 4
  by_id = {r["id"]: r for r in results["per_sample"]}
  assert by_id[ids[1]]["JF"] == 0 and by_id[ids[2]]["JF"] == 0 and by_id[ids[0]]["JF"] > 0.5
  assert results["summary"]["overall"]["JF"] == pytest.approx(
    (by_id[ids[0]]["JF"] + by_id[ids[3]]["JF"]) / 4
  )
  saved = json.loads((out / "eval_metrics.json").read_text())
  assert saved["failures"] == m["failures"]
  report = (out / "report.html").read_text()
  assert "2 sample(s) failed and scored 0" in report and ids[1] in report and ids[2] in report
  preds = predictions.read_predictions(out / predictions.PREDICTIONS_FILE)
  assert [p.id for p in preds] == ids and preds[1].failure and preds[1].error == "failed"

  # A limit evaluates the split's first samples, the broken one among them.
  config.eval.num_samples = 2
  m = evaluate.evaluate(config, None, components, tmp_path / "first2", masks=False)
  assert m["samples"] == 2 and [f["id"] for f in m["failures"]] == [ids[1]]
