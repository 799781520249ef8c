"""The embedded synthetic OK-VOS: layout, determinism, caching and its guarantees."""

import json
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segresearch_jax.data import okvos, synthetic

KW = dict(num_train=8, num_test=8, teams_per_split=8, frames=(8, 10), size=(128, 96), shown=6)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return synthetic.build(tmp_path_factory.mktemp("syn"), seed=0, **KW)


def rows(paths, split):
  return pq.read_table(pathlib.Path(paths.okvos_dir) / f"{split}.parquet").to_pylist()


def corpus(paths):
  return [json.loads(line) for line in open(paths.text_corpus, encoding="utf-8")]


def images(paths):
  return [json.loads(line) for line in open(paths.image_corpus, encoding="utf-8")]


def test_raw_layout_is_read_by_the_real_reader(built):
  for split in ("train", "test"):
    examples = list(okvos.iter_raw_examples(built.okvos_dir, split))
    assert len(examples) == 8
    assert {e["ability"] for e in examples} == set(okvos.ABILITIES)
    for e in examples:
      assert e["frames"].shape[1:] == (96, 128, 3)
      assert e["ground_truth"], f"{e['id']}: target absent in all shown frames"
      # Frame numbers step by 5, so they differ from indices.
      assert all(int(n) % 5 == 0 for n in e["frame_numbers"])
      if e["ability"] == "in-video":
        assert e["steps"] == [] and json.loads(e["reference_chain"]) == []
      else:
        assert e["steps"] and json.loads(e["reference_chain"])


def test_masks_match_the_rendered_object_colour(built):
  """At the GT point (deep inside the visible mask) the frame shows the target's emblem colour."""
  colour_of = {}
  for record in corpus(built):
    title, _, body = record["contents"].partition("\n")
    if "head coach of the " in body:
      team, _, emblem = body.split("head coach of the ")[1].partition(", whose emblem is a ")
      colour_of[team] = emblem.split()[0]
  for e, row in zip(okvos.iter_raw_examples(built.okvos_dir, "test"), rows(built, "test")):
    team = json.loads(row["entities"])[int(row["oid"])]
    want = np.asarray(synthetic.COLOURS[colour_of[team]], float)
    for fid, v in e["ground_truth"].items():
      k = list(e["frame_numbers"]).index(int(fid))
      x, y = v["point_2d"]
      got = e["frames"][k, y, x].astype(float)
      assert np.abs(got - want).max() < 40, (e["id"], fid, got, want)


@pytest.mark.parametrize("shown", [3, 4])
def test_target_is_in_the_frames_the_reader_shows(tmp_path, shown):
  """Videos longer than the shown frames: the target is placed in the very frames the
  reader picks with `num_frames=shown`, for the test split (no anchor) too."""
  paths = synthetic.build(tmp_path, seed=1, **{**KW, "frames": (8, 8), "shown": shown})
  for split in ("train", "test"):
    for e in okvos.iter_raw_examples(paths.okvos_dir, split, num_frames=shown, anchor=False):
      assert len(e["frame_numbers"]) == shown
      assert e["ground_truth"], f"{e['id']}: target absent in all {shown} shown frames"


def test_kb_is_in_the_official_format(built):
  docs = corpus(built)
  assert [d["id"] for d in docs] == list(range(len(docs)))
  assert all("\n" in d["contents"] for d in docs)
  images = [json.loads(line) for line in open(built.image_corpus, encoding="utf-8")]
  assert len(images) == 16
  for record in images:
    assert set(record) == {"id", "name", "filename", "image_path"}
    assert (pathlib.Path(built.kb_dir) / "images" / record["filename"]).is_file()


def test_test_entities_and_facts_disjoint_from_train(built):
  manifest = json.loads((pathlib.Path(built.okvos_dir).parent / "manifest.json").read_text())
  train, test = set(manifest["entities"]["train"]), set(manifest["entities"]["test"])
  assert train and test and not train & test
  used = {
    s: {n for r in rows(built, s) for n in json.loads(r["entities"])} for s in ("train", "test")
  }
  assert used["train"] <= train and used["test"] <= test
  # No test fact (document) is ever a reference answer in train, and vice versa.
  docs_used = {
    s: {c["doc_id"] for r in rows(built, s) for c in json.loads(r["reference_chain"])}
    for s in ("train", "test")
  }
  assert not docs_used["train"] & docs_used["test"]
  train_text = " ".join(r["question"] for r in rows(built, "train"))
  for name in test:
    assert name not in train_text


def test_every_search_query_is_answerable_from_the_kb(built):
  docs = corpus(built)
  for split in ("train", "test"):
    for row in rows(built, split):
      chain = json.loads(row["reference_chain"])
      if row["ability"] == "in-video":
        continue
      assert [c["query"] for c in chain] == row["steps"]
      entities = json.loads(row["entities"])
      oid = int(row["oid"])
      ref = entities[synthetic.beside(oid) if row["ability"] == "relational" else oid]
      if chain[0]["tool"] == "image_search":
        # Named team: its picture answers in one search; its own document does not
        # describe the emblem (the text route needs a second hop, via the coach).
        assert chain[0]["query"] == ref and len(chain) == 1
        assert images(built)[chain[0]["doc_id"]]["name"] == ref
        team_doc = next(d for d in docs if d["contents"].startswith(ref + "\n"))
        assert "emblem" not in team_doc["contents"]
        continue
      # Each step's document contains its answer; the last answer is the emblem of
      # the target (one-/multi-hop) or of the reference object (relational).
      for c in chain:
        assert c["answer"] in docs[c["doc_id"]]["contents"], (row["id"], c)
      assert ref in docs[chain[-1]["doc_id"]]["contents"], row["id"]
      # The question's key fact (cup or institute) is what the first document is about.
      expression = row["question"].split("'")[1]
      key = expression.split(" won the ")[-1].split(" founder of the ")[-1]
      assert key != expression and key in docs[chain[0]["doc_id"]]["contents"], row["id"]


def test_bm25_retrieves_every_reference_document(built):
  bm25s = pytest.importorskip("bm25s")
  del bm25s
  from segresearch_jax.search import local_kb

  kb = local_kb.LocalKnowledgeBase.from_files(built.text_corpus, built.image_corpus, method="bm25")
  docs = corpus(built)
  for split in ("train", "test"):
    for row in rows(built, split):
      for c in json.loads(row["reference_chain"]):
        if c["tool"] == "image_search":
          got = [r.name for r in kb.image_search(c["query"], 1)]
          assert got == [images(built)[c["doc_id"]]["name"]], (row["id"], c["query"], got)
          continue
        title, text = docs[c["doc_id"]]["contents"].split("\n", 1)
        got = [(r.title, r.text) for r in kb.text_search(c["query"], 2)]
        assert (title, text) in got, (row["id"], c["query"], got)


def test_deterministic_and_cached(built, tmp_path):
  other = synthetic.build(tmp_path / "a", seed=0, **KW)
  assert rows(other, "train") == rows(built, "train")
  assert corpus(other) == corpus(built)
  frame = sorted((pathlib.Path(other.okvos_dir) / "train" / "JPEGImages").rglob("*.jpg"))[0]
  mtime = frame.stat().st_mtime_ns
  synthetic.build(tmp_path / "a", seed=0, **KW)  # Cached: nothing rewritten.
  assert frame.stat().st_mtime_ns == mtime
  changed = synthetic.build(tmp_path / "a", seed=1, **KW)  # Different seed: rebuilt.
  assert rows(changed, "train") != rows(built, "train")


def test_identity_decides_frames_and_cells(built):
  """Every frame shows all four emblems (distinct colours), each in its own cell for the
  whole video, exactly one of them big. The target is big in exactly one frame, a
  shown one, and look-alikes in the others, so only its identity tells the right keyframe (score 1
  against ~0.25) and the cell its box must cover; boxes depend only on cell and size."""
  boxes = set()
  for split in ("train", "test"):
    # The frames the reader shows without a training anchor (the evaluation's view).
    examples = okvos.iter_raw_examples(built.okvos_dir, split, num_frames=6, anchor=False)
    for e, row in zip(examples, rows(built, split)):
      entities = json.loads(row["entities"])
      assert len(entities) == 4 and len(set(entities)) == 4
      masks = pathlib.Path(built.okvos_dir) / split / "Annotations" / row["video"]
      per_object = np.stack(
        [okvos.read_video_masks(masks / str(oid))[1] for oid in range(len(entities))]
      )  # [objects, frames, H, W]
      assert per_object.any(axis=(2, 3)).all()  # everyone on screen in every frame
      areas = per_object.sum(axis=(2, 3))  # [objects, frames]
      is_big = areas > 2 * areas.min(axis=1, keepdims=True)  # vs its own small size
      assert (is_big.sum(axis=0) == 1).all(), row["id"]  # one big object a frame
      big = is_big.argmax(axis=0)
      for oid in range(len(entities)):  # Each object stays in its cell.
        ys, xs = np.nonzero(per_object[oid].any(axis=0))
        assert np.ptp(xs) < 64 and np.ptp(ys) < 48, (row["id"], oid)
      oid = int(row["oid"])
      assert len(e["ground_truth"]) == len(e["frame_numbers"])  # target in every shown frame
      indices = [int(f) // 5 for f in e["ground_truth"]]  # Frame numbers step by 5.
      shown_big = big[indices]
      assert (shown_big == oid).sum() == 1 and (big == oid).sum() == 1  # one big frame
      scores = {f: v["max_conn_area"] for f, v in e["ground_truth"].items()}
      for f, k in zip(e["ground_truth"], indices):
        if big[k] == oid:
          assert scores[f] == 1.0
        else:
          assert 0.15 < scores[f] < 0.35, (row["id"], f, scores[f])
        boxes.add(tuple(e["ground_truth"][f]["bbox_2d"]))
  assert len(boxes) <= 8  # 4 cells x 2 sizes of the default 2 x 2 board


def test_more_entities_than_the_names_allow_is_an_error(tmp_path):
  """Names are two syllables: past their count the build refuses (it used to draw forever)."""
  with pytest.raises(ValueError, match="at most 324"):
    synthetic.build(tmp_path, seed=0, num_train=8, num_test=8, teams_per_split=(301, 24))
  assert not (tmp_path / "manifest.json").exists()


def test_relational_target_is_beside_the_reference():
  assert [synthetic.beside(i) for i in range(4)] == [1, 0, 3, 2]
  assert [synthetic.beside(i, grid=3) for i in range(3)] == [1, 0, 1]


def test_searches_name_the_tool_that_answers_fastest(built):
  """Named-team questions go through image_search (one search), the rest through text."""
  kinds = {"text_search": 0, "image_search": 0}
  for split in ("train", "test"):
    for row in rows(built, split):
      for c in json.loads(row["reference_chain"]):
        kinds[c["tool"]] += 1
  assert kinds["text_search"] > 0 and kinds["image_search"] > 0


def test_reference_frames_record_what_the_frames_show(built):
  """`reference_frames` (the warm start's reasoning reads it) names, for every frame,
  the object the masks draw big, for every object its colour and the cell its mask
  sits in, and the object the question names."""
  for split in ("train", "test"):
    for row in rows(built, split):
      record = json.loads(row["reference_frames"])
      oid = int(row["oid"])
      assert record["reference"] == (
        synthetic.beside(oid) if row["ability"] == "relational" else oid
      )
      masks = pathlib.Path(built.okvos_dir) / split / "Annotations" / row["video"]
      numbers, per_object = zip(
        *(okvos.read_video_masks(masks / str(oid)) for oid in range(len(record["objects"])))
      )
      areas = np.stack(per_object).sum(axis=(2, 3))  # [objects, frames]
      assert record["big"] == {str(n): int(b) for n, b in zip(numbers[0], areas.argmax(0))}
      frames = pathlib.Path(built.okvos_dir) / split / "JPEGImages" / row["video"]
      first = np.asarray(Image.open(sorted(frames.glob("*.jpg"))[0]), float)
      for oid, obj in enumerate(record["objects"]):
        ys, xs = np.nonzero(per_object[oid][0])
        cell = (ys.mean() >= 48) * 2 + (xs.mean() >= 64)  # 128 x 96 frames, 2 x 2 board
        assert obj["cell"] == synthetic.cell_name(int(cell), 2)
        colour = first[ys, xs].mean(axis=0)
        assert np.abs(colour - synthetic.COLOURS[obj["colour"]]).max() < 40, (row["id"], oid)


def test_cell_names():
  assert [synthetic.cell_name(c, 2) for c in range(4)] == [
    "top left",
    "top right",
    "bottom left",
    "bottom right",
  ]
  assert synthetic.cell_name(4, 3) == "centre" and synthetic.cell_name(5, 3) == "middle right"
  assert synthetic.cell_name(5, 4) == "row 2 column 2"
