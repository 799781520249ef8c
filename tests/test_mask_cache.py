"""The mask cache: grids, building, resuming, reading, and lookups equal to the segmenter."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import okvos as okvos_config
from segresearch_jax.data import mask_tables, okvos, pipeline, synthetic
from segresearch_jax.rewards import mask
from segresearch_jax.segmentation import mask_cache, segmenters

G, K = 6, 4
mask_score = jax.jit(mask.mask_score, static_argnames="prompt")  # one compile per shape
P = K * (K - 1) // 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
  return synthetic.build(
    tmp_path_factory.mktemp("syn"), num_train=2, num_test=2, frames=(3, 4), size=(64, 48)
  )


def build(syn, cache_dir, split="train", segmenter=None, g=G, k=K, **kw):
  return mask_cache.build_split(
    syn.okvos_dir,
    split,
    cache_dir,
    segmenter or segmenters.WeightFreeSegmenter(),
    point_grid_size=g,
    box_bins=k,
    num_frames=6,
    seed=0,
    progress=False,
    log=lambda *_: None,
    **kw,
  )


# ----------------------------------------------------------------------------
# Grids.
# ----------------------------------------------------------------------------


def test_grids_and_pair_numbering():
  pairs = mask_tables.bin_pairs(K)
  assert len(pairs) == mask_tables.num_pairs(K) == P
  np.testing.assert_array_equal(mask_tables.pair_index(pairs[:, 0], pairs[:, 1], K), np.arange(P))
  assert np.all(pairs[:, 0] < pairs[:, 1])
  assert mask_tables.bins_from_pairs(P) == K
  with pytest.raises(mask_tables.MaskCacheError):
    mask_tables.bins_from_pairs(4)
  boxes = mask_tables.box_grid(K)
  assert boxes.shape == (P * P, 4)
  assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])
  c = mask_tables.bin_centres(K)
  # box_iou[px, py] is (c[x_lo], c[y_lo], c[x_hi], c[y_hi]).
  px, py = 4, 1
  np.testing.assert_allclose(
    boxes[px * P + py], [c[pairs[px, 0]], c[pairs[py, 0]], c[pairs[px, 1]], c[pairs[py, 1]]]
  )
  points = mask_tables.point_grid(3)
  np.testing.assert_allclose(points[1], [0.5, 1 / 6])  # row 0 (y), column 1 (x)
  assert mask_tables.bytes_per_sample(6, 32, 16) == 6 * (1024 + 14400) + 24
  np.testing.assert_array_equal(mask_tables.to_uint8([0, 0.5, 1, 1.2]), [0, 128, 255, 255])


# ----------------------------------------------------------------------------
# Building, resuming, reading.
# ----------------------------------------------------------------------------


def test_build_writes_one_entry_per_sample_with_the_pipeline_frames(syn, tmp_path):
  summary = build(syn, tmp_path)
  assert summary["built"] == 2 and summary["skipped"] == 0 and summary["frames"] > 0
  manifest = json.loads((tmp_path / "train" / mask_tables.MANIFEST).read_text())
  assert (manifest["point_grid"], manifest["box_bins"], manifest["segmenter"]) == (
    G,
    K,
    "weight_free",
  )
  source = okvos.OkvosDataSource(syn.okvos_dir, "train", num_frames=6, seed=0)
  for i in range(len(source)):
    example = source[i]
    entry = mask_tables.load_entry(tmp_path, "train", example["id"], example["frame_numbers"])
    n = len(example["frame_numbers"])
    assert entry["point_iou"].shape == (n, G, G) and entry["point_iou"].dtype == np.uint8
    assert entry["box_iou"].shape == (n, P, P) and entry["box_iou"].dtype == np.uint8
    # Tables follow the frames: no overlap where the target is absent, some where present.
    for f, m in enumerate(example["masks"]):
      assert entry["box_iou"][f].any() == m.any() and entry["point_iou"][f].max() <= 255
      assert entry["point_iou"][f].any() <= m.any()


def test_build_resumes_and_rebuilds_what_changed(syn, tmp_path):
  build(syn, tmp_path)
  again = build(syn, tmp_path)
  assert (again["built"], again["skipped"]) == (0, 2)
  files = sorted((tmp_path / "train").glob("*.npz"))
  files[0].unlink()
  files[1].write_bytes(b"truncated")
  resumed = build(syn, tmp_path)
  assert (resumed["built"], resumed["skipped"]) == (2, 0)
  other_grid = build(syn, tmp_path, g=G + 1)
  assert other_grid["built"] == 2
  sid = okvos.sample_id(okvos.read_rows(syn.okvos_dir, "train")[0], "train", 0)
  assert (
    mask_tables.read_entry(mask_tables.entry_path(tmp_path, "train", sid))["point_grid"] == G + 1
  )
  assert not list((tmp_path / "train").glob(".*tmp"))  # atomic writes leave no temp files


def test_load_entry_errors(syn, tmp_path):
  build(syn, tmp_path)
  source = okvos.OkvosDataSource(syn.okvos_dir, "train", num_frames=6, seed=0)
  example = source[0]
  with pytest.raises(mask_tables.MaskCacheError, match="No mask-cache entry.*build_mask_cache"):
    mask_tables.load_entry(tmp_path, "test", example["id"], example["frame_numbers"])
  with pytest.raises(mask_tables.MaskCacheError, match="holds frames"):
    mask_tables.load_entry(tmp_path, "train", example["id"], list(example["frame_numbers"])[:-1])
  with pytest.raises(mask_tables.MaskCacheError, match="point_grid"):
    mask_tables.load_entry(
      tmp_path, "train", example["id"], example["frame_numbers"], point_grid_size=G + 2
    )


def test_ids_with_any_characters_are_safe_file_names(tmp_path):
  path = mask_tables.entry_path(tmp_path, "train", "a/b c?")
  assert path.parent == tmp_path / "train" and "/" not in path.name
  mask_tables.write_entry(
    path,
    sample_id="a/b c?",
    frame_numbers=[3],
    point_iou=np.ones((1, 2, 2), np.uint8),
    box_iou=np.ones((1, 1, 1), np.uint8),
    segmenter_name="weight_free",
  )
  entry = mask_tables.load_entry(tmp_path, "train", "a/b c?", [3])
  assert entry["box_bins"] == 2 and entry["sample_id"] == "a/b c?"


# ----------------------------------------------------------------------------
# A lookup equals running the segmenter on that prompt.
# ----------------------------------------------------------------------------


def lookups_equal_direct_runs(segmenter, frames, masks, entry, rng, n_points, n_boxes):
  """Gathers `mask.mask_score` at grid prompts (off-centre inside their cell) and compares
  with the segmenter run on the cell-centre prompt directly."""
  f = len(frames)
  h, w = frames.shape[1:3]
  g, k = entry["point_grid"], entry["box_bins"]
  c_points, c_boxes = mask_tables.point_grid(g), mask_tables.box_grid(k)
  for slot in range(f):
    segmenter.set_image(frames[slot])
    pi = rng.choice(len(c_points), n_points, replace=False)
    bi = rng.choice(len(c_boxes), n_boxes, replace=False)
    direct_point = segmenters.mask_ious(
      segmenter.predict(points=c_points[pi] * [w, h]), masks[slot]
    )
    direct_box = segmenters.mask_ious(
      segmenter.predict(boxes=c_boxes[bi] * [w, h, w, h]), masks[slot]
    )
    # Jitter within the cell: the nearest entry is still that cell's.
    jitter_p = rng.uniform(-0.4, 0.4, (n_points, 2)) / g
    jitter_b = rng.uniform(-0.2, 0.2, (n_boxes, 4)) / k
    for prompt, idx, boxes, points, direct in (
      (
        "point",
        pi,
        np.tile([0.1, 0.1, 0.9, 0.9], (n_points, 1)),
        c_points[pi] + jitter_p,
        direct_point,
      ),
      ("box", bi, c_boxes[bi] + jitter_b, np.full((n_boxes, 2), 0.5), direct_box),
    ):
      n = len(idx)
      got = mask_score(
        np.repeat(entry["point_iou"][None], n, 0),
        np.repeat(entry["box_iou"][None], n, 0),
        np.full(n, slot),
        boxes.astype(np.float32),
        points.astype(np.float32),
        np.ones(n, bool),
        prompt=prompt,
      )
      np.testing.assert_allclose(
        np.asarray(got), mask_tables.to_uint8(direct) / 255.0, rtol=1e-6, err_msg=prompt
      )


def test_cache_lookup_equals_running_the_weight_free_segmenter(syn, tmp_path):
  build(syn, tmp_path)
  source = okvos.OkvosDataSource(syn.okvos_dir, "train", num_frames=6, seed=0)
  example = source[1]
  entry = mask_tables.load_entry(tmp_path, "train", example["id"], example["frame_numbers"])
  lookups_equal_direct_runs(
    segmenters.WeightFreeSegmenter(),
    example["frames"],
    example["masks"],
    entry,
    np.random.default_rng(0),
    n_points=12,
    n_boxes=24,
  )


@pytest.mark.slow
def test_sam2_cache_end_to_end_on_two_small_frames(syn, tmp_path):
  pytest.importorskip("sam2")
  sam = segmenters.Sam2ImageSegmenter(
    "configs/sam2.1/sam2.1_hiera_t.yaml", None, "cpu", random_weights=True, batch_size=8
  )
  example = okvos.OkvosDataSource(syn.okvos_dir, "train", num_frames=6, seed=0)[0]
  frames, masks, numbers = example["frames"][:2], example["masks"][:2], example["frame_numbers"][:2]
  point_iou, box_iou = mask_cache.sample_tables(sam, frames, masks, 2, 3)
  path = mask_tables.entry_path(tmp_path, "train", example["id"])
  mask_tables.write_entry(
    path,
    sample_id=example["id"],
    frame_numbers=numbers,
    point_iou=point_iou,
    box_iou=box_iou,
    segmenter_name=sam.name,
  )
  entry = mask_tables.load_entry(tmp_path, "train", example["id"], numbers)
  assert entry["segmenter"].startswith("sam2:") and entry["point_iou"].shape == (2, 2, 2)
  assert entry["box_iou"].shape == (2, 3, 3)
  lookups_equal_direct_runs(sam, frames, masks, entry, np.random.default_rng(0), 2, 2)


# ----------------------------------------------------------------------------
# The data pipeline and the build tool.
# ----------------------------------------------------------------------------


def test_pipeline_carries_the_tables_in_frame_order(syn, tmp_path):
  build(syn, tmp_path)
  kw = dict(
    batch_size=2,
    frame_size=16,
    shuffle=False,
    num_epochs=1,
    shard_index=0,
    shard_count=1,
    num_frames=6,
  )
  ds, _ = pipeline.okvos_dataset(syn.okvos_dir, "train", mask_cache_dir=tmp_path, **kw)
  batch = next(iter(ds))
  assert batch["mask_point_iou"].shape == (2, 6, G, G)
  assert batch["mask_box_iou"].shape == (2, 6, P, P)
  for b, sid in enumerate(batch["id"]):
    numbers = batch["frame_numbers"][b][batch["frame_valid"][b]]
    entry = mask_tables.load_entry(tmp_path, "train", sid, numbers)
    n = len(numbers)
    np.testing.assert_array_equal(batch["mask_point_iou"][b, :n], entry["point_iou"])
    np.testing.assert_array_equal(batch["mask_box_iou"][b, :n], entry["box_iou"])
    assert not batch["mask_point_iou"][b, n:].any()  # padding frames read as IoU 0
  plain, _ = pipeline.okvos_dataset(syn.okvos_dir, "train", **kw)
  assert "mask_point_iou" not in next(iter(plain))
  missing, _ = pipeline.okvos_dataset(syn.okvos_dir, "test", mask_cache_dir=tmp_path, **kw)
  with pytest.raises(mask_tables.MaskCacheError, match="No mask-cache entry"):
    next(iter(missing))


def tiny_config(syn, tmp_path):
  config = okvos_config.get_config()
  config.workdir = str(tmp_path / "run")
  config.data.source = "okvos"
  config.data.okvos_dir = syn.okvos_dir
  config.mask_cache.point_grid = G
  config.mask_cache.box_bins = K
  config.mask_cache.dir = str(tmp_path / "cache")
  return config


def test_build_function_from_the_config(syn, tmp_path):
  config = tiny_config(syn, tmp_path)
  root = mask_cache.build(config, "test", progress=False)
  assert root == str(tmp_path / "cache")
  assert len(list((tmp_path / "cache" / "test").glob("*.npz"))) == 2
  config.mask_cache.segmenter = "sam2"
  with pytest.raises(ValueError, match="mask_cache.sam2_checkpoint"):
    mask_cache.build(config, "test", progress=False)


def test_build_tool_command_line(syn, tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.tools.build_mask_cache",
    "--config=configs/okvos.py",
    "--split=train",
    "--config.data.source=okvos",
    f"--config.data.okvos_dir={syn.okvos_dir}",
    f"--config.workdir={tmp_path / 'run'}",
    f"--config.mask_cache.point_grid={G}",
    f"--config.mask_cache.box_bins={K}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "samples x" in run.stdout and "built 2" in run.stdout  # estimate and summary
  assert len(list(pathlib.Path(syn.okvos_dir).glob("mask_cache/train/*.npz"))) == 2


def test_stream_build_covers_exactly_what_the_training_stream_reads(tmp_path):
  """A run of N positions needs the tables of the samples the pipeline reads there."""
  syn = synthetic.build(tmp_path / "syn", num_train=12, num_test=2, frames=(3, 4), size=(64, 48))
  source = okvos.OkvosDataSource(syn.okvos_dir, "train", num_frames=6, seed=0)
  ds = pipeline.make_dataset(
    source, batch_size=2, seed=0, num_epochs=None, num_threads=1, shard_index=0, shard_count=1
  )
  it = iter(ds)
  read = [sid for _ in range(4) for sid in next(it)["id"]]  # 8 positions of the stream
  order = pipeline.stream_order(len(source), seed=0)
  ids = [okvos.sample_id(source.rows[int(order[p])], "train", int(order[p])) for p in range(8)]
  assert read == ids

  summary = build(syn, tmp_path / "cache", stream_samples=8)
  assert summary["covered"] == summary["built"] == len(set(ids)) < 12
  files = {p.stem for p in (tmp_path / "cache" / "train").glob("*.npz")}
  assert files == {
    pathlib.Path(mask_tables.entry_path(tmp_path / "cache", "train", i)).stem for i in ids
  }
  # A longer run adds only what it reads beyond; the whole split is the default.
  assert build(syn, tmp_path / "cache", stream_samples=8)["built"] == 0
  assert build(syn, tmp_path / "cache")["built"] == 12 - len(set(ids))


def test_stream_build_walks_past_broken_samples(tmp_path):
  syn = synthetic.build(tmp_path / "syn", num_train=6, num_test=2, frames=(3, 4), size=(64, 48))
  source = okvos.OkvosDataSource(syn.okvos_dir, "train", num_frames=6, seed=0)
  order = pipeline.stream_order(len(source), seed=0)
  first = int(order[0])
  video = pathlib.Path(syn.okvos_dir) / "train" / "JPEGImages" / source.rows[first]["video"]
  for jpg in video.glob("*.jpg"):
    jpg.write_bytes(b"not a jpeg")
  fresh = okvos.OkvosDataSource(syn.okvos_dir, "train", num_frames=6, seed=0, on_error="skip")
  good = [int(i) for i in (order[p] for p in range(12)) if fresh[int(i)] is not None][:2]
  assert fresh[first] is None and first not in good
  summary = build(syn, tmp_path / "cache", stream_samples=2)
  assert summary["broken"] >= 1 and summary["built"] == len(set(good))
  # Dealt to 2 processes, the one that met the broken sample reads one position further.
  good = [int(i) for i in (order[p] for p in range(12)) if fresh[int(i)] is not None][:3]
  assert sum(fresh[i] is None for i in range(len(fresh))) == 1  # One broken sample.
  assert build(syn, tmp_path / "sharded", stream_samples=2, shards=2)["built"] == len(set(good))
  # Every sample broken: the walk ends instead of spinning.
  for row in source.rows:
    for jpg in (pathlib.Path(syn.okvos_dir) / "train" / "JPEGImages" / row["video"]).glob("*.jpg"):
      jpg.write_bytes(b"not a jpeg")
  assert build(syn, tmp_path / "cache2", stream_samples=4)["built"] == 0
