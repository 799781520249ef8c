"""The grain pipeline: prompts, determinism, sharding, skipping, and resume."""

import json

import numpy as np
import pytest
from conftest import fake_sample, small_synthetic

from segresearch_jax import protocol
from segresearch_jax.data import okvos, pipeline


def fake_example(i: int, num_frames: int = 6, ability: str = "one-hop") -> dict:
  frames = np.full((num_frames, 20, 40, 3), i, np.uint8)
  masks = np.zeros((num_frames, 20, 40), bool)
  masks[:, 2:6, 4:12] = True
  numbers = np.arange(num_frames, dtype=np.int32) * 5
  return fake_sample(i, frames, masks, numbers, ability=ability, steps=["q"] * (i % 3))


def ids(batch) -> list[str]:
  return list(batch["id"])


def take(ds, n):
  it = iter(ds)
  return [ids(next(it)) for _ in range(n)]


def make(source, **kw):
  kw = {"batch_size": 4, "frame_size": 16, "shard_index": 0, "shard_count": 1, **kw}
  return pipeline.make_dataset(source, **kw)


def test_batch_fields_and_prompt():
  source = [fake_example(i) for i in range(3)] + [fake_example(3, num_frames=4, ability="in-video")]
  batch = next(iter(make(source, shuffle=False, num_epochs=1)))
  assert batch["frames"].shape == (4, 6, 16, 16, 3) and batch["frames"].dtype == np.uint8
  assert batch["masks"].shape == (4, 6, 16, 16) and batch["masks"].dtype == bool
  np.testing.assert_array_equal(batch["frame_numbers"][3], [0, 5, 10, 15, -1, -1])
  np.testing.assert_array_equal(batch["frame_valid"][3], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch["orig_size"][0], [40, 20])
  assert batch["steps"][2] == ["q", "q"]
  prompt = batch["prompt"][3]
  assert prompt == protocol.chat_prompt(
    protocol.system_prompt("in-video"),
    protocol.user_content([0, 5, 10, 15], "Please find 'thing 3' in the provided video."),
  )
  assert prompt.count(protocol.IMAGE_PLACEHOLDER) == 4
  assert batch["prompt"][0].count(protocol.IMAGE_PLACEHOLDER) == 6
  assert protocol.system_prompt("one-hop") in batch["prompt"][0]
  # Box x 4..11 of width 40 -> round(4/40*1000)=100, round(11/40*1000)=275.
  gt = json.loads(batch["ground_truth"][0])
  assert gt["0"]["bbox_2d"] == [100, 100, 275, 250]
  assert json.loads(batch["ground_truth_pixels"][0])["0"]["bbox_2d"] == [4, 2, 11, 5]
  absr = make(source, shuffle=False, num_epochs=1, convention="abs_resized")
  assert json.loads(next(iter(absr))["ground_truth"][0])["0"]["bbox_2d"] == [2, 2, 4, 4]


def test_resize_does_not_keep_aspect():
  frames = np.zeros((1, 20, 40, 3), np.uint8)
  frames[:, :, :20] = 255  # Left half white.
  out = pipeline.resize_frames(frames, 16)
  assert out.shape == (1, 16, 16, 3)
  assert out[0, :, :7].min() > 200 and out[0, :, 9:].max() < 50


def test_seeded_shuffle_is_deterministic_and_reshuffles_epochs():
  source = [fake_example(i) for i in range(8)]
  a, b = take(make(source, seed=1), 4), take(make(source, seed=1), 4)
  assert a == b
  assert take(make(source, seed=2), 4) != a
  epoch1, epoch2 = sorted(a[0] + a[1]), sorted(a[2] + a[3])
  assert epoch1 == epoch2 == sorted(f"s{i}" for i in range(8))  # Every sample once an epoch.
  assert a[0] + a[1] != a[2] + a[3]  # A new order each epoch.


def test_shards_are_disjoint_and_cover_the_source():
  source = [fake_example(i) for i in range(8)]
  seen = []
  for index in range(2):
    ds = make(source, batch_size=2, shard_index=index, shard_count=2, num_epochs=1)
    seen.append({s for batch in ds for s in batch["id"]})
  assert not seen[0] & seen[1] and seen[0] | seen[1] == {f"s{i}" for i in range(8)}
  with pytest.raises(ValueError, match="shard_index"):
    make(source, shard_index=2, shard_count=2)


def test_skipped_samples_are_dropped():
  source = [fake_example(i) for i in range(6)]
  source[2] = None
  got = [
    s for batch in make(source, batch_size=1, num_epochs=1, shuffle=False) for s in batch["id"]
  ]
  assert got == ["s0", "s1", "s3", "s4", "s5"]


def test_encode_fn_hook_adds_fields_and_rejects_clashes():
  source = [fake_example(i) for i in range(4)]

  def encode(ex):
    return {"prompt_len": np.int32(len(ex["prompt"]))}

  batch = next(iter(make(source, encode_fn=encode)))
  assert batch["prompt_len"].dtype == np.int32
  assert list(batch["prompt_len"]) == [len(p) for p in batch["prompt"]]
  with pytest.raises(ValueError, match="already exist"):
    next(iter(make(source, encode_fn=lambda ex: {"prompt": "x"})))


def test_resume_gives_the_same_next_batch():
  # `checkpoint.Checkpointer` saves this state (tests/test_checkpoint.py round-trips it).
  source = [fake_example(i) for i in range(10)]
  ds = make(source, batch_size=3, seed=7)
  it = iter(ds)
  for _ in range(4):  # Cross an epoch boundary.
    next(it)
  state = it.get_state()
  expected = [ids(next(it)) for _ in range(3)]

  fresh = iter(make(source, batch_size=3, seed=7))
  fresh.set_state(state)
  assert [ids(next(fresh)) for _ in range(3)] == expected


def test_over_raw_okvos_with_skip_counts(tmp_path):
  paths = small_synthetic(tmp_path / "syn")
  bad = tmp_path / "syn" / "okvos" / "train" / "JPEGImages" / "train_0001"
  for f in bad.iterdir():
    f.unlink()
  ds, source = pipeline.okvos_dataset(
    paths.okvos_dir,
    "train",
    batch_size=5,
    frame_size=32,
    on_error="skip",
    num_epochs=1,
    shard_index=0,
    shard_count=1,
  )
  (batch,) = list(ds)
  assert "syn-train_0001" not in set(batch["id"])
  assert len(source.errors) == 1 and "syn-train_0001" in source.errors[0]
  assert batch["frames"].shape == (5, 6, 32, 32, 3)


def test_resolve_data_builds_synthetic_and_checks_okvos(tmp_path):
  import ml_collections

  cfg = ml_collections.ConfigDict(
    {
      "source": "synthetic",
      "okvos_dir": "",
      "synthetic_dir": str(tmp_path / "syn"),
      "synthetic_train": 64,
      "synthetic_test": 32,
      "num_frames": 3,
    }
  )
  okvos_dir, kb_dir = pipeline.resolve_data(cfg, tmp_path)
  assert (tmp_path / "syn" / "okvos" / "train.parquet").is_file()
  assert kb_dir.endswith("kb") and okvos_dir.endswith("okvos")
  cfg.source = "okvos"
  with pytest.raises(ValueError, match="okvos_dir is empty"):
    pipeline.resolve_data(cfg, tmp_path)
  cfg.okvos_dir = "/data/OK-VOS"
  assert pipeline.resolve_data(cfg, tmp_path) == ("/data/OK-VOS", "")


def test_default_shard_is_this_process():
  source = [fake_example(i) for i in range(4)]
  ds = pipeline.make_dataset(source, batch_size=4, frame_size=8, num_epochs=1, shuffle=False)
  (batch,) = list(ds)  # One process: the whole source.
  assert list(batch["id"]) == ["s0", "s1", "s2", "s3"]


def test_a_source_with_nothing_usable_raises_instead_of_repeating_forever():
  ds = make([None] * 5, num_epochs=None, max_broken_fraction=1.0)
  with pytest.raises(okvos.DataError, match=r"5 of the 5 samples .*none is usable"):
    next(iter(ds))


def test_broken_cap_counts_distinct_samples_over_epochs():
  source = [fake_example(i) for i in range(9)] + [None]  # 1 of 10: at the cap, not over
  it = iter(make(source, batch_size=3, num_epochs=None, max_broken_fraction=0.1))
  seen = [i for _ in range(12) for i in ids(next(it))]  # four epochs, re-reading the None
  assert len(set(seen)) == 9
  source[3] = None  # 2 of 10
  with pytest.raises(okvos.DataError, match=r"2 of the 10 samples .*max_broken_fraction=0\.1"):
    it = iter(make(source, batch_size=3, num_epochs=None, max_broken_fraction=0.1))
    for _ in range(12):
      next(it)
  # Evaluation passes None: every broken sample is dropped here and scored by the caller.
  assert len(list(make([None] * 4, batch_size=1, num_epochs=1))) == 0
