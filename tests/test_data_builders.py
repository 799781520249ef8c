"""TFDS builders (array_record): same content as the raw readers; ReasonSeg/ReasonVOS parsing."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
from PIL import Image

if importlib.util.find_spec("tensorflow_datasets") is None:
  pytest.skip("tensorflow_datasets is not installed", allow_module_level=True)

# builders loads torch (when installed) before TensorFlow: the other order segfaults.
from segresearch_jax.data import builders, okvos, pipeline, synthetic  # noqa: E402


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  paths = synthetic.build(
    root / "syn", seed=0, num_train=4, num_test=2, teams_per_split=5, frames=(8, 9), size=(64, 48)
  )
  return paths.okvos_dir


def test_okvos_builder_matches_raw_reader(raw, tmp_path):
  builder = builders.build("okvos", raw, tmp_path / "tfds")
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["test"].num_examples == 2
  source = builders.okvos_source(tmp_path / "tfds", "train", raw)
  got = {source[i]["id"]: source[i] for i in range(len(source))}
  for want in okvos.iter_raw_examples(raw, "train"):
    ex = got[want["id"]]
    for key in ("video", "oid", "ability", "question", "steps", "reference_chain"):
      assert ex[key] == want[key], key
    assert ex["ground_truth"] == want["ground_truth"]
    assert ex["frame_paths"] == want["frame_paths"]
    assert ex["annotation_dir"] == want["annotation_dir"]
    np.testing.assert_array_equal(ex["frame_numbers"], want["frame_numbers"])
    np.testing.assert_array_equal(ex["frames"], want["frames"])  # PNG-encoded: lossless.
    np.testing.assert_array_equal(ex["masks"], want["masks"])
  # The pipeline reads the array_record source like any other.
  batch = next(
    iter(pipeline.make_dataset(source, batch_size=2, frame_size=32, shard_index=0, shard_count=1))
  )
  assert batch["frames"].shape == (2, 6, 32, 32, 3)


def test_okvos_builder_skips_and_counts_or_raises(raw, tmp_path):
  broken = tmp_path / "okvos"
  shutil.copytree(raw, broken)
  for f in (broken / "train" / "JPEGImages" / "train_0002").iterdir():
    f.unlink()
  with pytest.raises(okvos.DataError, match="syn-train_0002"):
    builders.build("okvos", broken, tmp_path / "tfds_raise")
  builder = builders.build("okvos", broken, tmp_path / "tfds_skip", on_error="skip")
  assert builder.info.splits["train"].num_examples == 3
  assert len(builder.skipped) == 1 and "syn-train_0002" in builder.skipped[0]


def write_reasonseg(root, split):
  folder = root / split
  folder.mkdir(parents=True)
  Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(folder / "img1.jpg")
  anno = {
    "text": ["the thing that holds the water"],
    "is_sentence": True,
    "shapes": [
      {"label": "target", "points": [[2, 2], [10, 2], [10, 8], [2, 8]], "shape_type": "polygon"},
      {"label": "ignore", "points": [[4, 4], [6, 4], [6, 5], [4, 5]], "shape_type": "polygon"},
    ],
  }
  (folder / "img1.json").write_text(json.dumps(anno))


def test_reasonseg_polygons_rasterised_with_ignore(tmp_path):
  write_reasonseg(tmp_path / "rs", "val")
  builder = builders.build("reason_seg", tmp_path / "rs", tmp_path / "tfds")
  (record,) = list(builder.as_data_source(split="val"))
  label = np.asarray(record["label"])
  want = np.zeros((12, 16), np.uint8)
  want[2:9, 2:11] = 1  # Polygon edges are inclusive.
  want[4:6, 4:7] = builders.IGNORE_LABEL  # The smaller (ignore) shape is drawn on top.
  np.testing.assert_array_equal(label, want)
  assert [t.decode() if isinstance(t, bytes) else t for t in record["texts"]] == [
    "the thing that holds the water"
  ]


def test_reasonseg_builder_drops_only_exact_flag_labels(tmp_path):
  folder = tmp_path / "rs" / "val"
  folder.mkdir(parents=True)
  Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(folder / "pole.jpg")
  anno = {
    "text": "the flagpole",
    "is_sentence": False,
    "shapes": [
      {"label": "flagpole", "points": [[2, 2], [10, 2], [10, 8], [2, 8]]},
      {"label": "flag", "points": [[4, 4], [6, 4], [6, 5], [4, 5]]},
    ],
  }
  (folder / "pole.json").write_text(json.dumps(anno))
  builder = builders.build("reason_seg", tmp_path / "rs", tmp_path / "tfds")
  (record,) = list(builder.as_data_source(split="val"))
  want = np.zeros((12, 16), np.uint8)
  want[2:9, 2:11] = 1  # The flagpole is the target; the "flag" shape is dropped.
  np.testing.assert_array_equal(np.asarray(record["label"]), want)


def test_reasonvos_builder_reads_the_released_layout(tmp_path):
  root = tmp_path / "rv"
  meta = {
    "videos": {
      "vid_B": {
        "source": "MeViS",
        "frames": ["00005", "00000"],
        "expressions": [{"obj_id": 2, "exp_id": 7, "exp_text": "Dog", "is_sent": False}],
      },
      "vidA": {
        "source": "MOSE",
        "frames": ["00000"],
        "expressions": [{"obj_id": 1, "exp_id": 3, "exp_text": "the pet", "is_sent": True}],
      },
    }
  }
  root.mkdir()
  (root / "meta_expressions.json").write_text(json.dumps(meta))
  for vid, key, names in (
    ("vid_B", "MeViS_vid_B_2", ["00000", "00005"]),
    ("vidA", "MOSE_vidA_1", ["00000"]),
  ):
    (root / "Annotations" / key).mkdir(parents=True)
    (root / "JPEGImages" / vid).mkdir(parents=True)
    for name in names:
      Image.fromarray(np.ones((4, 5), np.uint8), mode="P").save(
        root / "Annotations" / key / f"{name}.png"
      )
      Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "JPEGImages" / vid / f"{name}.jpg")
  builder = builders.build("reason_vos", root, tmp_path / "tfds")
  records = {r["id"].decode(): r for r in builder.as_data_source(split="test")}
  assert sorted(records) == ["MOSE_vidA_1_3", "MeViS_vid_B_2_7"]
  dog = records["MeViS_vid_B_2_7"]
  assert dog["annotation_dir"].decode() == "Annotations/MeViS_vid_B_2"
  assert [n.decode() for n in dog["frame_names"]] == ["00000", "00005"]
  assert dog["question"].decode() == "Please segment the dog in this scene."
  assert not dog["is_sentence"]
