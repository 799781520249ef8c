"""OK-VOS raw reading and preprocessing, checked against hand-computed values."""

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segresearch_jax.data import okvos

W, H = 40, 20


def two_blob_mask() -> np.ndarray:
  """A 5x5 square at x 2..6, y 3..7 and a 2x2 square at x 15..16, y 10..11."""
  m = np.zeros((H, W), bool)
  m[3:8, 2:7] = True
  m[10:12, 15:17] = True
  return m


def write_palette_png(path: pathlib.Path, index_map: np.ndarray) -> None:
  """Index 255 = the target, drawn DARK; index 1 = a distractor drawn WHITE."""
  im = Image.fromarray(index_map.astype(np.uint8), mode="P")
  palette = [0, 0, 0] * 256
  palette[3:6] = [255, 255, 255]
  palette[255 * 3 : 256 * 3] = [20, 0, 0]
  im.putpalette(palette)
  path.parent.mkdir(parents=True, exist_ok=True)
  im.save(path)


def make_raw(
  root: pathlib.Path,
  split: str,
  masks: list[np.ndarray],
  *,
  names: list[str] | None = None,
  extra_rows: list[dict] | None = None,
  drop_column: str | None = None,
) -> None:
  """One video `v0`, object `1`, frames named 00000, 00005, ... (numbers != indices)."""
  names = names or [f"{5 * i:05d}" for i in range(len(masks))]
  for i, (name, mask) in enumerate(zip(names, masks)):
    frame = np.full((H, W, 3), 10 * i, np.uint8)
    path = root / split / "JPEGImages" / "v0" / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path)
    index_map = np.where(mask, 255, 0)
    index_map[0, 0] = 1  # A white distractor pixel: brightness 255, index 1.
    write_palette_png(root / split / "Annotations" / "v0" / "1" / f"{name}.png", index_map)
  rows = [
    {
      "id": "s0",
      "question": "Please find 'the thing' in the provided video.",
      "images": names,
      "ability": "one-hop",
      "video": "v0",
      "oid": "1",
      "steps": ["who won the cup"],
    }
  ] + (extra_rows or [])
  table = pa.Table.from_pylist(rows)
  if drop_column:
    table = table.drop_columns([drop_column])
  pq.write_table(table, root / f"{split}.parquet")


def test_mask_stats_two_blobs():
  stats = okvos.mask_stats(two_blob_mask())
  assert stats["bbox_2d"] == [2, 3, 16, 11]
  assert stats["point_2d"] == [4, 5]  # Centre of the 5x5 square: deepest pixel.
  assert stats["area"] == 29.0
  assert stats["max_conn_area"] == 25.0


def test_mask_stats_diagonal_blobs_are_one_8_connected_component():
  m = np.zeros((6, 6), bool)
  m[1, 1] = m[2, 2] = m[3, 3] = True
  assert okvos.mask_stats(m)["max_conn_area"] == 3.0


def test_sample_frame_indices_linspace_and_anchor():
  np.testing.assert_array_equal(okvos.sample_frame_indices(10, 6), [0, 1, 3, 5, 7, 9])
  np.testing.assert_array_equal(okvos.sample_frame_indices(4, 6), [0, 1, 2, 3])
  present = [i == 4 for i in range(10)]
  rng = np.random.default_rng(0)
  # Anchor 4 replaces the closest sampled index (3, the first of the ties 3 and 5).
  np.testing.assert_array_equal(okvos.sample_frame_indices(10, 6, present, rng), [0, 1, 4, 5, 7, 9])


def test_read_mask_uses_palette_index_not_brightness(tmp_path):
  index_map = np.zeros((H, W), np.uint8)
  index_map[2:4, 3:6] = 255  # Target: index 255, drawn dark.
  index_map[10:12, 10:12] = 1  # Distractor: index 1, drawn white.
  write_palette_png(tmp_path / "m.png", index_map)
  mask = okvos.read_mask(tmp_path / "m.png")
  np.testing.assert_array_equal(mask, index_map == 255)
  assert not np.array_equal(np.asarray(Image.open(tmp_path / "m.png").convert("L")) == 255, mask), (
    "the fixture must make brightness and index disagree"
  )


def test_load_example_field_by_field(tmp_path):
  big = two_blob_mask()
  small = np.zeros((H, W), bool)
  small[0:2, 30:35] = True  # 10 pixels at x 30..34, y 0..1.
  empty = np.zeros((H, W), bool)
  masks = [big, empty, empty, small] + [empty] * 6  # 10 frames.
  make_raw(tmp_path, "test", masks)
  (ex,) = list(okvos.iter_raw_examples(tmp_path, "test"))
  assert ex["id"] == "s0" and ex["video"] == "v0" and ex["oid"] == "1"
  assert ex["ability"] == "one-hop" and ex["steps"] == ["who won the cup"]
  # Test split: no anchor. linspace indices [0,1,3,5,7,9] -> numbers x5.
  np.testing.assert_array_equal(ex["frame_numbers"], [0, 5, 15, 25, 35, 45])
  assert ex["frame_numbers"].dtype == np.int32
  assert [pathlib.Path(p).name for p in ex["frame_paths"]][:2] == ["00000.jpg", "00005.jpg"]
  assert ex["frames"].shape == (6, H, W, 3) and ex["frames"].dtype == np.uint8
  assert abs(int(ex["frames"][2].mean()) - 30) <= 2  # Index 3 was drawn with value 30.
  assert ex["masks"].shape == (6, H, W) and ex["masks"].dtype == bool
  np.testing.assert_array_equal(ex["masks"][0], big)
  np.testing.assert_array_equal(ex["masks"][2], small)
  gt = ex["ground_truth"]
  assert sorted(gt) == ["0", "15"]
  assert gt["0"] == {
    "bbox_2d": [2, 3, 16, 11],
    "point_2d": [4, 5],
    "area": 1.0,
    "max_conn_area": 1.0,
  }
  assert gt["15"]["bbox_2d"] == [30, 0, 34, 1]
  assert gt["15"]["area"] == pytest.approx(10 / 29)
  assert gt["15"]["max_conn_area"] == pytest.approx(10 / 25)

  norm = okvos.convert_ground_truth(gt, "norm1000", W, H)
  assert norm["0"]["bbox_2d"] == [50, 150, 400, 550]  # round(2/40*1000), round(3/20*1000), ...
  assert norm["0"]["point_2d"] == [100, 250]
  assert norm["15"]["area"] == gt["15"]["area"]
  absr = okvos.convert_ground_truth(gt, "abs_resized", W, H, resized=(448, 448))
  # round(2/40*448)=22, round(3/20*448)=67, round(16/40*448)=179, round(11/20*448)=246.
  assert absr["0"]["bbox_2d"] == [22, 67, 179, 246]
  assert absr["0"]["point_2d"] == [45, 112]
  with pytest.raises(ValueError, match="resized"):
    okvos.convert_ground_truth(gt, "abs_resized", W, H)
  with pytest.raises(ValueError, match="convention"):
    okvos.convert_ground_truth(gt, "pixels", W, H)


def test_train_split_anchor_is_seeded_and_contains_target(tmp_path):
  empty = np.zeros((H, W), bool)
  masks = [empty] * 10
  masks[4] = two_blob_mask()
  make_raw(tmp_path, "train", masks)
  (ex,) = list(okvos.iter_raw_examples(tmp_path, "train", seed=3))
  np.testing.assert_array_equal(ex["frame_numbers"], [0, 5, 20, 25, 35, 45])
  assert list(ex["ground_truth"]) == ["20"]
  (no_anchor,) = list(okvos.iter_raw_examples(tmp_path, "train", anchor=False))
  assert no_anchor["ground_truth"] == {}


def test_full_video_masks_read_lazily(tmp_path):
  masks = [two_blob_mask()] * 8
  make_raw(tmp_path, "test", masks)
  (ex,) = list(okvos.iter_raw_examples(tmp_path, "test"))
  numbers, video_masks = okvos.read_video_masks(ex["annotation_dir"])
  assert numbers == [5 * i for i in range(8)] and video_masks.shape == (8, H, W)


# ----------------------------------------------------------------------------
# Errors: clear message naming the sample; skip-and-count or raise.
# ----------------------------------------------------------------------------


def test_missing_frame_raises_or_skips(tmp_path):
  masks = [two_blob_mask()] * 4
  make_raw(tmp_path, "test", masks)
  (tmp_path / "test" / "JPEGImages" / "v0" / "00005.jpg").unlink()
  with pytest.raises(okvos.DataError, match=r"Sample s0: Missing frame .*00005\.jpg"):
    list(okvos.iter_raw_examples(tmp_path, "test"))
  errors = []
  assert list(okvos.iter_raw_examples(tmp_path, "test", on_error="skip", errors=errors)) == []
  assert len(errors) == 1 and "s0" in errors[0]


def test_unreadable_png_names_sample_and_file(tmp_path):
  make_raw(tmp_path, "test", [two_blob_mask()] * 3)
  (tmp_path / "test" / "Annotations" / "v0" / "1" / "00010.png").write_bytes(b"not a png")
  with pytest.raises(okvos.DataError, match=r"Sample s0: Cannot read annotation .*00010\.png"):
    list(okvos.iter_raw_examples(tmp_path, "test"))


def test_empty_target_everywhere_is_an_error_and_skips_count(tmp_path):
  good = {
    "id": "s1",
    "question": "q",
    "images": ["00000", "00005"],
    "ability": "in-video",
    "video": "v0",
    "oid": "1",
    "steps": None,
  }
  make_raw(tmp_path, "test", [np.zeros((H, W), bool)] * 2 + [two_blob_mask()], extra_rows=[good])
  with pytest.raises(okvos.DataError, match="Sample s0: the target mask is empty in every frame"):
    okvos.load_example(tmp_path, "test", {**good, "id": "s0", "images": ["00000", "00005"]}, 0)
  errors = []
  examples = list(okvos.iter_raw_examples(tmp_path, "test", on_error="skip", errors=errors))
  # s0 spans all 3 frames (target in the last) and loads; s1 only sees empty frames.
  assert [e["id"] for e in examples] == ["s0"]
  assert len(errors) == 1 and "Sample s1" in errors[0]


def test_parquet_without_required_column(tmp_path):
  make_raw(tmp_path, "test", [two_blob_mask()], drop_column="ability")
  with pytest.raises(okvos.DataError, match="ability"):
    list(okvos.iter_raw_examples(tmp_path, "test"))


def test_unknown_ability_and_bad_on_error(tmp_path):
  make_raw(tmp_path, "test", [two_blob_mask()])
  row = okvos.read_rows(tmp_path, "test")[0]
  with pytest.raises(okvos.DataError, match="Sample s0: unknown ability"):
    okvos.load_example(tmp_path, "test", {**row, "ability": "two-hop"}, 0)
  with pytest.raises(ValueError, match="on_error"):
    list(okvos.iter_raw_examples(tmp_path, "test", on_error="ignore"))


def test_data_source_skips_to_none_and_counts(tmp_path):
  make_raw(tmp_path, "test", [two_blob_mask()] * 2)
  (tmp_path / "test" / "JPEGImages" / "v0" / "00000.jpg").unlink()
  source = okvos.OkvosDataSource(tmp_path, "test", on_error="skip")
  assert len(source) == 1 and source[0] is None and len(source.errors) == 1


def test_mask_stats_matches_full_image_transform_on_random_masks():
  """The cropped distance transform gives the official full-image answer."""
  from scipy import ndimage

  rng = np.random.default_rng(0)
  for trial in range(40):
    h, w = rng.integers(3, 25, size=2)
    mask = (
      ndimage.binary_opening(rng.random((h, w)) < 0.6) if trial % 2 else rng.random((h, w)) < 0.5
    )
    if not mask.any():
      continue
    full = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(np.argmax(full)), mask.shape)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    stats = okvos.mask_stats(mask)
    assert stats["point_2d"] == [int(x), int(y)], trial
    assert stats["max_conn_area"] == np.bincount(labels.ravel())[1:].max()


def test_mask_touching_the_border_keeps_official_semantics():
  m = np.zeros((10, 10), bool)
  m[0:5, :] = True  # The image edge is not background: deepest pixel on the edge row.
  # Distance is 5 - y on every column; the first maximum in row-major order is (0, 0).
  assert okvos.mask_stats(m)["point_2d"] == [0, 0]
  full = np.ones((4, 6), bool)  # No background at all: the fallback picks a mask pixel.
  x, y = okvos.mask_stats(full)["point_2d"]
  assert full[y, x]


def test_missing_annotation_png_means_target_absent(tmp_path):
  make_raw(tmp_path, "test", [two_blob_mask()] * 3)
  (tmp_path / "test" / "Annotations" / "v0" / "1" / "00005.png").unlink()
  (ex,) = list(okvos.iter_raw_examples(tmp_path, "test"))
  assert sorted(ex["ground_truth"]) == ["0", "10"] and not ex["masks"][1].any()


def test_id_defaults_to_row_index(tmp_path):
  make_raw(tmp_path, "test", [two_blob_mask()], drop_column="id")
  (ex,) = list(okvos.iter_raw_examples(tmp_path, "test"))
  assert ex["id"] == "0"


REAL_VIDEO = pathlib.Path(__file__).parents[2] / "shared" / "data" / "real_video" / "toy_horse"


@pytest.mark.skipif(not REAL_VIDEO.is_dir(), reason="real video frames not available")
def test_real_frames_in_raw_layout(tmp_path):
  """Real JPEGs (640x360): every 3rd frame, so numbers 0,3,6,... differ from indices."""
  import shutil

  names = [f"{3 * i:05d}" for i in range(12)]
  frame_dir = tmp_path / "test" / "JPEGImages" / "horse"
  frame_dir.mkdir(parents=True)
  for name in names:
    shutil.copy(REAL_VIDEO / f"{name}.jpg", frame_dir / f"{name}.jpg")
    index_map = np.zeros((360, 640), np.uint8)
    index_map[90:271, 160:481] = 255  # x 160..480, y 90..270.
    write_palette_png(tmp_path / "test" / "Annotations" / "horse" / "0" / f"{name}.png", index_map)
  row = {"question": "q", "images": names, "ability": "in-video", "video": "horse", "oid": "0"}
  pq.write_table(pa.Table.from_pylist([row]), tmp_path / "test.parquet")
  (ex,) = list(okvos.iter_raw_examples(tmp_path, "test"))
  # linspace(0, 11, 6) -> indices [0, 2, 4, 6, 8, 11] -> numbers x3.
  np.testing.assert_array_equal(ex["frame_numbers"], [0, 6, 12, 18, 24, 33])
  assert ex["frames"].shape == (6, 360, 640, 3)
  np.testing.assert_array_equal(
    ex["frames"][5], np.asarray(Image.open(REAL_VIDEO / "00033.jpg").convert("RGB"))
  )
  gt = okvos.convert_ground_truth(ex["ground_truth"], "norm1000", 640, 360)
  assert gt["33"]["bbox_2d"] == [250, 250, 750, 750]  # round(160/640*1000) = 250, ...
  # Depth 91 holds along the middle row y=180 for x in 250..390; the first is (250, 180):
  # round(250/640*1000) = 391, round(180/360*1000) = 500.
  assert ex["ground_truth"]["33"]["point_2d"] == [250, 180]
  assert gt["33"]["point_2d"] == [391, 500]
