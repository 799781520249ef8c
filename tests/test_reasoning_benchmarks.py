"""ReasonSeg / ReasonVOS / ReVOS from their released layouts, and their official tables.

The fixtures are written here, in the released formats with the official loaders' field
names; the "official" functions below re-derive each evaluator's arithmetic from its
description (LISA's validation, VideoLISA's eval_reason_vos, VISA's eval_revos) to
check our numbers against.
"""

import json
import pathlib

import cv2
import numpy as np
import pytest
from PIL import Image

from segresearch_jax import evaluate
from segresearch_jax.data import okvos, reasoning
from segresearch_jax.eval import predictions as predictions_lib
from segresearch_jax.eval import reasoning as reasoning_eval

# ----------------------------------------------------------------------------
# Fixture writers (released layouts).
# ----------------------------------------------------------------------------

TARGET_A = [[4, 3], [34, 4], [33, 26], [6, 25]]
FLAG_A = [[12, 10], [20, 10], [20, 16], [12, 16]]  # Inside the target: dropped.
IGNORE_A = [[24, 12], [30, 12], [30, 20]]
FLAGPOLE_B = [[5, 4], [28, 6], [20, 18]]  # Upright coordinates of the rotated photo.
LINE_C = [[2, 20], [30, 5]]  # A two-point shape: a line.
POLY_C = [[10, 2], [18, 2], [18, 9]]


def _jpeg(path, array, exif_orientation=None):
  im = Image.fromarray(array)
  if exif_orientation is None:
    im.save(path, quality=95)
  else:
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    im.save(path, quality=95, exif=exif)


def _gradient(h, w, seed):
  rng = np.random.default_rng(seed)
  base = rng.integers(40, 200, size=3)
  yy, xx = np.mgrid[0:h, 0:w]
  return np.clip(base + np.stack([xx * 3, yy * 3, xx + yy], -1), 0, 255).astype(np.uint8)


def write_reasonseg(root: pathlib.Path, split: str = "val") -> pathlib.Path:
  folder = root / split
  folder.mkdir(parents=True)
  _jpeg(folder / "img_a.jpg", _gradient(32, 40, 0))
  anno_a = {
    "text": ["the thing holding the flag", "a second text LISA's validation ignores"],
    "is_sentence": True,
    "shapes": [
      {"label": "target", "points": TARGET_A, "shape_type": "polygon"},
      {"label": "Flag", "points": FLAG_A, "shape_type": "polygon"},
      {"label": "ignore", "points": IGNORE_A, "shape_type": "polygon"},
    ],
  }
  (folder / "img_a.json").write_text(json.dumps(anno_a), encoding="utf-8")
  # Stored 24 wide x 36 high with EXIF orientation 6: upright it is 36 x 24.
  raw = _gradient(36, 24, 1)
  raw[:4] = 255  # A white band at the stored top: upright, on the right edge.
  _jpeg(folder / "img_b.jpg", raw, exif_orientation=6)
  anno_b = {"text": "the pole’s top", "is_sentence": False}
  anno_b["shapes"] = [{"label": "flagpole", "points": FLAGPOLE_B, "shape_type": "polygon"}]
  # cp1252, not UTF-8: the right quote is byte 0x92.
  (folder / "img_b.json").write_bytes(json.dumps(anno_b, ensure_ascii=False).encode("cp1252"))
  _jpeg(folder / "img_c.jpg", _gradient(24, 32, 2))
  anno_c = {
    "text": ["wire"],
    "is_sentence": False,
    "shapes": [
      {"label": "target", "points": LINE_C, "shape_type": "line"},
      {"label": "target", "points": POLY_C, "shape_type": "polygon"},
    ],
  }
  (folder / "img_c.json").write_text(json.dumps(anno_c), encoding="utf-8")
  return root


def _palette_png(path, index_map):
  im = Image.fromarray(index_map.astype(np.uint8), mode="P")
  im.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30] + [0] * (256 * 3 - 9))
  im.save(path)


def _box(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


REASONVOS_H, REASONVOS_W = 24, 32


def write_reasonvos(root: pathlib.Path, old_release: bool = False) -> pathlib.Path:
  """Two videos (one name with an underscore), three expressions; source-prefixed masks."""
  h, w = REASONVOS_H, REASONVOS_W
  videos = {
    "vidA": {"source": "MOSE", "frames": ["00000", "00001", "00002", "00003"]},
    "vid_B": {"source": "MeViS", "frames": ["00000", "00005", "00010"]},
  }
  exps = {
    "vidA": [
      {"obj_id": 1, "exp_id": 0, "exp_text": "the animal that guards the house", "is_sent": True},
      {"obj_id": 2, "exp_id": 1, "exp_text": "Red Ball", "is_sent": False},
    ],
    "vid_B": [{"obj_id": 3, "exp_id": 2, "exp_text": "what the rider sits on", "is_sent": True}],
  }
  for seed, (vid, entry) in enumerate(videos.items()):
    frame_dir = root / "JPEGImages" / vid
    frame_dir.mkdir(parents=True)
    for t, name in enumerate(entry["frames"]):
      frame = _gradient(h, w, seed)
      frame[4 + t : 12 + t, 6 + 2 * t : 16 + 2 * t] = (250, 20, 20)
      _jpeg(frame_dir / f"{name}.jpg", frame)
  for vid, items in exps.items():
    for e in items:
      folder = root / "Annotations" / f"{videos[vid]['source']}_{vid}_{e['obj_id']}"
      folder.mkdir(parents=True)
      names = videos[vid]["frames"]
      scored = names if e["obj_id"] != 2 else names[::2]  # Not every frame annotated.
      for name in scored:
        t = names.index(name)
        m = _box(h, w, 4 + t, 12 + t, 6 + 2 * t + e["obj_id"], 16 + 2 * t)
        _palette_png(folder / f"{name}.png", m * 1)  # Palette index 1: nonzero = target.
  meta = {"videos": {}}
  for vid, entry in videos.items():
    if old_release:  # Before Dec 2024: a dict keyed by expression id, is_sent per video.
      expressions = {
        str(e["exp_id"]): {"exp": e["exp_text"], "obj_id": str(e["obj_id"])} for e in exps[vid]
      }
      meta["videos"][vid] = {**entry, "is_sent": True, "expressions": expressions}
    else:
      meta["videos"][vid] = {**entry, "expressions": exps[vid]}
  (root / "meta_expressions.json").write_text(json.dumps(meta))
  return root


def rle_runs(mask: np.ndarray) -> list[int]:
  """Run lengths over the column-major pixels, starting with background (maybe 0)."""
  flat = np.asarray(mask, bool).T.reshape(-1)
  counts, current, run = [], False, 0
  for v in flat:
    if v != current:
      counts.append(run)
      current, run = v, 0
    run += 1
  counts.append(run)
  return counts


def rle_string(mask: np.ndarray) -> dict:
  """COCO's compressed RLE of a bool mask, encoded as the format describes."""
  counts, chars = rle_runs(mask), []
  for i, x in enumerate(counts):
    if i > 2:
      x -= counts[i - 2]
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = (x != -1) if c & 0x10 else (x != 0)
      if more:
        c |= 0x20
      chars.append(chr(c + 48))
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def rle_list(mask: np.ndarray) -> dict:
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_runs(mask)}


REVOS_H, REVOS_W = 20, 28


def revos_object_masks():
  """anno_id -> per-frame bool masks (None = not annotated in that frame)."""
  h, w = REVOS_H, REVOS_W
  return {
    "10": [_box(h, w, 2, 9, 3, 12), None, _box(h, w, 4, 11, 5, 14), _box(h, w, 5, 12, 6, 15)],
    "11": [_box(h, w, 8, 16, 10, 20), _box(h, w, 9, 17, 12, 22), None, None],
  }


def write_revos(root: pathlib.Path) -> pathlib.Path:
  h, w = REVOS_H, REVOS_W
  frames = ["00000", "00001", "00002", "00003"]
  for vid, seed in (("v1", 3), ("v2", 4)):
    folder = root / "JPEGImages" / vid
    folder.mkdir(parents=True)
    for name in frames:
      _jpeg(folder / f"{name}.jpg", _gradient(h, w, seed))
  masks = revos_object_masks()
  mask_dict = {}
  for aid, per_frame in masks.items():
    encode = rle_string if aid == "10" else rle_list  # Both counts forms.
    mask_dict[aid] = [None if m is None else encode(m) for m in per_frame]
  mask_dict["20"] = [rle_string(_box(h, w, 1, 6, 1, 8)) for _ in frames]
  meta = {
    "videos": {
      "v1": {
        "vid_id": 0,
        "frames": frames,
        "expressions": {
          "0": {"exp": "the two boxes", "obj_id": [0, 1], "anno_id": [10, 11], "type_id": 0},
          "1": {"exp": "which box would you keep", "obj_id": [0], "anno_id": [10], "type_id": 1},
          "2": {"exp": "the missing giraffe", "obj_id": [], "anno_id": [], "type_id": 2},
        },
      },
      "v2": {
        "vid_id": 1,
        "frames": frames,
        "expressions": {
          "0": {"exp": "the corner patch", "obj_id": [0], "anno_id": [20], "type_id": 0}
        },
      },
    }
  }
  (root / "meta_expressions_valid_.json").write_text(json.dumps(meta))
  (root / "mask_dict.json").write_text(json.dumps(mask_dict))
  return root


# ----------------------------------------------------------------------------
# LISA's ReasonSeg ground truth, drawn with cv2 as LISA draws it.
# ----------------------------------------------------------------------------


def lisa_label(json_path, height, width):
  try:
    anno = json.loads(pathlib.Path(json_path).read_text(encoding="utf-8"))
  except UnicodeDecodeError:
    anno = json.loads(pathlib.Path(json_path).read_text(encoding="cp1252"))
  areas, kept = [], []
  for shape in anno["shapes"]:
    if shape["label"].lower() == "flag":
      continue
    tmp = np.zeros((height, width), np.uint8)
    pts = np.array([shape["points"]], dtype=np.int32)
    cv2.polylines(tmp, pts, True, 1, 1)
    cv2.fillPoly(tmp, pts, 1)
    areas.append(tmp.sum())
    kept.append(shape)
  label = np.zeros((height, width), np.uint8)
  for i in np.argsort(areas)[::-1]:
    shape = kept[i]
    value = 255 if "ignore" in shape["label"].lower() else 1
    pts = np.array([shape["points"]], dtype=np.int32)
    cv2.polylines(label, pts, True, value, 1)
    cv2.fillPoly(label, pts, value)
  return label


# ----------------------------------------------------------------------------
# ReasonSeg reader.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reasonseg_root(tmp_path_factory):
  return write_reasonseg(tmp_path_factory.mktemp("reasonseg"))


def _record(root, name):
  return next(r for r in reasoning.read_reasonseg(root, "val") if r["id"] == name)


def test_reasonseg_drops_exactly_flag_and_keeps_flagpole_targets(reasonseg_root):
  _, label_a = reasoning.load_reasonseg(_record(reasonseg_root, "img_a"))
  # The "Flag" shape inside the target is dropped: no hole, no ignore region there.
  assert (label_a[10:17, 12:21] == 1).all()
  assert (label_a == 255).any()  # The "ignore" shape is still an ignore region.
  _, label_b = reasoning.load_reasonseg(_record(reasonseg_root, "img_b"))
  assert set(np.unique(label_b)) == {0, 1}  # "flagpole" is a target, not ignore.


def test_reasonseg_reads_cp1252_json(reasonseg_root):
  record = _record(reasonseg_root, "img_b")
  assert record["texts"] == ["the pole’s top"]
  assert record["is_sentence"] is False


def test_reasonseg_applies_exif_rotation(reasonseg_root):
  record = _record(reasonseg_root, "img_b")
  image, label = reasoning.load_reasonseg(record)
  assert image.shape == (24, 36, 3) and label.shape == (24, 36)
  # cv2.imread (what LISA reads with) also turns the photo upright.
  want = cv2.imread(record["image_path"])[..., ::-1]
  assert want.shape == image.shape
  assert np.abs(want.astype(int) - image).mean() < 3
  assert image[:, -4:].mean() > 240  # The white band is now on the right.


def test_reasonseg_labels_equal_lisa_cv2_drawing(reasonseg_root):
  for name in ("img_a", "img_b", "img_c"):
    record = _record(reasonseg_root, name)
    image, label = reasoning.load_reasonseg(record)
    want = lisa_label(record["json_path"], *image.shape[:2])
    np.testing.assert_array_equal(label, want, err_msg=name)
  # The two-point shape is a cv2 line.
  _, label_c = reasoning.load_reasonseg(_record(reasonseg_root, "img_c"))
  line = np.zeros_like(label_c)
  cv2.line(line, tuple(LINE_C[0]), tuple(LINE_C[1]), 1, 1)
  assert (label_c[line == 1] == 1).all()


@pytest.mark.parametrize("seed", range(3))
def test_shape_rasterising_equals_cv2_pixel_for_pixel(seed):
  rng = np.random.default_rng(seed)
  for _ in range(150):
    h, w = (int(v) for v in rng.integers(4, 50, size=2))
    n = int(rng.integers(1, 9))
    points = rng.uniform(0, [w, h], size=(n, 2))  # Float vertices, self-crossing allowed.
    want = np.zeros((h, w), np.uint8)
    pts = np.array([points.tolist()], dtype=np.int32)
    cv2.polylines(want, pts, True, 3, 1)
    cv2.fillPoly(want, pts, 3)
    got = np.zeros((h, w), np.uint8)
    reasoning.draw_shape(got, np.trunc(points).astype(np.int64), 3)
    np.testing.assert_array_equal(got, want, err_msg=str(pts.tolist()))


def test_reasonseg_malformed_record_names_the_file(tmp_path):
  root = write_reasonseg(tmp_path / "rs")
  (root / "val" / "img_c.json").write_text(json.dumps({"text": ["x"], "shapes": []}))
  with pytest.raises(okvos.DataError, match=r"img_c\.json.*is_sentence"):
    reasoning.read_reasonseg(root, "val")
  bad = {"text": ["x"], "is_sentence": False, "shapes": [{"label": "t", "points": [[1]]}]}
  (root / "val" / "img_c.json").write_text(json.dumps(bad))
  record = _record(root, "img_c")
  with pytest.raises(okvos.DataError, match=r"img_c\.json shape 0"):
    reasoning.load_reasonseg(record)


# ----------------------------------------------------------------------------
# ReasonVOS reader.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("old_release", [False, True])
def test_reasonvos_reads_both_metadata_releases(tmp_path, old_release):
  root = write_reasonvos(tmp_path / "rv", old_release=old_release)
  records = reasoning.read_reasonvos(root)
  assert [r["id"] for r in records] == ["MOSE_vidA_1_0", "MOSE_vidA_2_1", "MeViS_vid_B_3_2"]
  first, second, third = records
  assert first["annotation_dir"] == "Annotations/MOSE_vidA_1"
  assert third["annotation_dir"] == "Annotations/MeViS_vid_B_3"
  assert third["source"] == "MeViS" and third["frame_dir"] == "JPEGImages/vid_B"
  assert first["question"] == "the animal that guards the house"
  if not old_release:  # is_sent selects the prompt form.
    assert second["is_sentence"] is False
    assert second["question"] == "Please segment the red ball in this scene."


def test_reasonvos_masks_count_any_nonzero_pixel(tmp_path):
  root = write_reasonvos(tmp_path / "rv")
  records = {r["id"]: r for r in reasoning.read_reasonvos(root)}
  names, masks = reasoning.reasonvos_masks(root, records["MOSE_vidA_1_0"])
  assert names == ["00000", "00001", "00002", "00003"]
  assert masks.sum() == sum(8 * (10 - 1) for _ in range(4))  # Index 1 is target.
  names, _ = reasoning.reasonvos_masks(root, records["MOSE_vidA_2_1"])
  assert names == ["00000", "00002"]  # Only the annotated frames are scored.


def test_reasonvos_malformed_expression_names_the_record(tmp_path):
  root = write_reasonvos(tmp_path / "rv")
  meta = json.loads((root / "meta_expressions.json").read_text())
  del meta["videos"]["vid_B"]["expressions"][0]["exp_text"]
  (root / "meta_expressions.json").write_text(json.dumps(meta))
  with pytest.raises(okvos.DataError, match=r"vid_B.*expression 0.*exp_text"):
    reasoning.read_reasonvos(root)


def test_reasonvos_missing_mask_folder_fails_naming_the_record(tmp_path):
  import shutil

  root = write_reasonvos(tmp_path / "rv")
  shutil.rmtree(root / "Annotations" / "MeViS_vid_B_3")
  with pytest.raises(okvos.DataError, match=r"MeViS_vid_B_3_2.*Annotations/MeViS_vid_B_3"):
    reasoning_eval.prepare_samples("reasonvos", root, "test", tmp_path / "out")


# ----------------------------------------------------------------------------
# ReVOS reader and RLE.
# ----------------------------------------------------------------------------


def test_decode_rle_hand_made_mask():
  mask = np.array([[0, 1, 1], [0, 0, 1]], bool)
  # Column-major: 0 0 | 1 0 | 1 1 -> runs 2 (bg), 1, 1, 2.
  np.testing.assert_array_equal(
    reasoning.decode_rle({"size": [2, 3], "counts": [2, 1, 1, 2]}), mask
  )
  np.testing.assert_array_equal(reasoning.decode_rle({"size": [2, 3], "counts": "2111"}), mask)
  assert rle_string(mask)["counts"] == "2111"


def test_decode_rle_round_trips_random_masks():
  rng = np.random.default_rng(0)
  for _ in range(20):
    h, w = (int(v) for v in rng.integers(1, 40, size=2))
    mask = rng.random((h, w)) < rng.random()
    np.testing.assert_array_equal(reasoning.decode_rle(rle_string(mask)), mask)
    np.testing.assert_array_equal(reasoning.decode_rle(rle_list(mask)), mask)
  with pytest.raises(okvos.DataError, match="sum to"):
    reasoning.decode_rle({"size": [2, 3], "counts": [2, 1]}, "x")


def test_revos_unions_anno_ids_over_every_frame(tmp_path):
  root = write_revos(tmp_path / "revos")
  records = {r["id"]: r for r in reasoning.read_revos(root, "valid")}
  assert sorted(records) == ["v1_0", "v1_1", "v1_2", "v2_0"]
  assert records["v1_0"]["category"] == "referring" and records["v1_1"]["category"] == "reasoning"
  mask_dict = reasoning.read_revos_mask_dict(root)
  names, masks = reasoning.revos_masks(root, records["v1_0"], mask_dict)
  assert names == ["00000", "00001", "00002", "00003"]
  objects = revos_object_masks()
  for t in range(4):
    want = np.zeros((REVOS_H, REVOS_W), bool)
    for per_frame in objects.values():
      if per_frame[t] is not None:
        want |= per_frame[t]
    np.testing.assert_array_equal(masks[t], want)
  _, empty = reasoning.revos_masks(root, records["v1_2"], mask_dict)
  assert empty.shape == (4, REVOS_H, REVOS_W) and not empty.any()
  del mask_dict["11"]
  with pytest.raises(okvos.DataError, match="v1_0 anno_id 11"):
    reasoning.revos_masks(root, records["v1_0"], mask_dict)


def test_revos_missing_frame_fails_naming_the_record(tmp_path):
  root = write_revos(tmp_path / "revos")
  (root / "JPEGImages" / "v2" / "00002.jpg").unlink()
  with pytest.raises(okvos.DataError, match=r"v2_0: 1 frame\(s\) missing.*00002\.jpg"):
    reasoning_eval.prepare_samples("revos", root, "valid", tmp_path / "out")


# ----------------------------------------------------------------------------
# Scoring: our numbers against each official evaluator's arithmetic.
# ----------------------------------------------------------------------------


def test_revos_overall_is_the_mean_of_the_two_categories():
  from segresearch_jax.eval import metrics

  per_sample = [
    {"id": "a", "category": "referring", "J": 0.2, "F": 0.4},
    {"id": "b", "category": "referring", "J": 0.4, "F": 0.6},
    {"id": "c", "category": "reasoning", "J": 0.9, "F": 0.7},
    {"id": "d", "category": "type2", "J": 0.0, "F": 0.0},  # Not in the table.
  ]
  table = metrics.revos_summary(per_sample)
  assert table["referring"]["J"] == pytest.approx(0.3)
  assert table["overall"]["J"] == pytest.approx((0.3 + 0.9) / 2)  # Not (0.2+0.4+0.9)/3.
  assert table["overall"]["JF"] == pytest.approx(((0.3 + 0.5) / 2 + 0.8) / 2)
  assert table["overall"]["count"] == 3


def box_segmenter(frames, keyframe_index, box, point):
  """Fills the box from the keyframe on: a deterministic stand-in for a video segmenter."""
  del point
  masks = np.zeros(frames.shape[:3], bool)
  x1, y1, x2, y2 = (int(round(v)) for v in box)
  masks[keyframe_index:, max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1] = True
  return masks


def _predictions(samples, boxes):
  preds = []
  for b in samples:
    s = b.sample
    box = boxes.get(s.id)
    if box is None:  # An unusable answer: scored as empty masks.
      response = "<think>no idea</think>"
    else:
      kf = s.frame_numbers[min(1, len(s.frame_numbers) - 1)]
      answer = json.dumps({"bbox_2d": box, "point_2d": [box[0], box[1]]})
      response = f"<keyframe>{kf}</keyframe><answer>{answer}</answer>"
    preds.append(predictions_lib.parse_response(s.id, s.ability, response))
  return preds


def _davis_bmap(seg):
  seg = seg.astype(bool)
  e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
  e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
  b = seg ^ e | seg ^ s | seg ^ se
  b[-1, :], b[:, -1] = seg[-1, :] ^ e[-1, :], seg[:, -1] ^ s[:, -1]
  b[-1, -1] = 0
  return b


def davis_j(gt, pred):
  gt, pred = gt.astype(bool), pred.astype(bool)
  union = np.sum(gt | pred)
  return 1.0 if union == 0 else np.sum(gt & pred) / union


def davis_f(gt, pred, bound_th=0.008):
  radius = int(np.ceil(bound_th * np.linalg.norm(gt.shape)))
  fb, gb = _davis_bmap(pred), _davis_bmap(gt)
  r = np.arange(-radius, radius + 1)
  x, y = np.meshgrid(r, r)
  disk = (x**2 + y**2 <= radius**2).astype(np.uint8)
  fd, gd = cv2.dilate(fb.astype(np.uint8), disk), cv2.dilate(gb.astype(np.uint8), disk)
  n_f, n_g = fb.sum(), gb.sum()
  if n_f == 0 and n_g == 0:
    p, rc = 1.0, 1.0
  elif n_f == 0:
    p, rc = 1.0, 0.0
  elif n_g == 0:
    p, rc = 0.0, 1.0
  else:
    p, rc = (fb * gd).sum() / n_f, (gb * fd).sum() / n_g
  return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def _gray(path):
  return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def official_reasonseg(root, out, split="val"):
  """LISA's validation: per image intersectionAndUnion with ignore 255, acc_iou =
  I / (U + 1e-5) (+1 when U == 0), gIoU = mean acc_iou, cIoU = sum I / (sum U + 1e-10),
  grouped by is_sentence (short / long) and over all."""
  rows = []
  for image_path in sorted((root / split).glob("*.jpg")):
    upright = cv2.imread(str(image_path))
    target = lisa_label(image_path.with_suffix(".json"), *upright.shape[:2])
    pred = (_gray(out / "masks" / image_path.stem / "0.png") > 0).astype(np.int64)
    pred[target == 255] = 255
    inter = np.sum((pred == 1) & (target == 1))
    union = np.sum(pred == 1) + np.sum(target == 1) - inter
    acc = inter / (union + 1e-5) + (1.0 if union == 0 else 0.0)
    raw = pathlib.Path(image_path.with_suffix(".json")).read_bytes()
    try:
      is_sentence = json.loads(raw.decode("utf-8"))["is_sentence"]
    except UnicodeDecodeError:
      is_sentence = json.loads(raw.decode("cp1252"))["is_sentence"]
    rows.append((is_sentence, inter, union, acc))
  table = {}
  for name, keep in (("short", False), ("long", True), ("overall", None)):
    group = [r for r in rows if keep is None or r[0] == keep]
    if group:
      table[name] = {
        "gIoU": float(np.mean([r[3] for r in group])),
        "cIoU": sum(r[1] for r in group) / (sum(r[2] for r in group) + 1e-10),
      }
  return table


def official_reasonvos(root, out):
  """VideoLISA's eval_reason_vos: per expression, J and F averaged over the PNGs of
  Annotations/{source}_{video}_{obj_id}, masks read as grayscale; means over expressions."""
  meta = json.loads((root / "meta_expressions.json").read_text())["videos"]
  js, fs = [], []
  for vid, entry in meta.items():
    for e in entry["expressions"]:
      key = f"{entry['source']}_{vid}_{e['obj_id']}"
      gt_dir = root / "Annotations" / key
      pred_dir = out / "masks" / f"{key}_{e['exp_id']}"
      names = sorted(p.name for p in gt_dir.glob("*.png"))
      gts = [_gray(gt_dir / n) for n in names]
      preds = [_gray(pred_dir / n) for n in names]
      js.append(np.mean([davis_j(g, p) for g, p in zip(gts, preds)]))
      fs.append(np.mean([davis_f(g, p) for g, p in zip(gts, preds)]))
  j, f = float(np.mean(js)), float(np.mean(fs))
  return {"J": j, "F": f, "JF": (j + f) / 2}


def official_revos(root, out):
  """VISA's eval_revos: per expression, the union of its anno_ids' masks in every frame,
  J and F averaged over all frames; referring (type 0) and reasoning (type 1) means and
  their average (type 2 left out). VISA also rounds each expression's percentages to
  two decimals first; that display rounding is left out here, as in ours."""
  meta = json.loads((root / "meta_expressions_valid_.json").read_text())["videos"]
  mask_dict = json.loads((root / "mask_dict.json").read_text())
  scores = {0: [], 1: []}
  for vid, entry in meta.items():
    for eid, e in entry["expressions"].items():
      if e["type_id"] == 2:
        continue
      js, fs = [], []
      for i, frame in enumerate(entry["frames"]):
        pred = _gray(out / "masks" / f"{vid}_{eid}" / f"{frame}.png")
        gt = np.zeros(pred.shape, np.uint8)
        for aid in e["anno_id"]:
          rle = mask_dict[str(aid)][i]
          if rle:
            gt += reasoning.decode_rle(rle).astype(np.uint8)
        js.append(davis_j(gt, pred))
        fs.append(davis_f(gt, pred))
      scores[e["type_id"]].append((np.mean(js), np.mean(fs)))
  table = {}
  for type_id, name in ((0, "referring"), (1, "reasoning")):
    j = float(np.mean([s[0] for s in scores[type_id]]))
    f = float(np.mean([s[1] for s in scores[type_id]]))
    table[name] = {"J": j, "F": f, "JF": (j + f) / 2}
  table["overall"] = {
    k: (table["referring"][k] + table["reasoning"][k]) / 2 for k in ("J", "F", "JF")
  }
  return table


def _score(benchmark, root, split, out, boxes):
  samples = reasoning_eval.prepare_samples(benchmark, root, split, out / "benchmark")
  preds = _predictions(samples, boxes)
  return reasoning_eval.score_predictions(
    benchmark, preds, samples, box_segmenter, "norm1000", out, split=split, print_table=False
  )


def test_reasonseg_table_equals_lisa_arithmetic(reasonseg_root, tmp_path):
  boxes = {"img_a": [100, 100, 700, 900], "img_b": [200, 100, 800, 600], "img_c": [0, 0, 600, 700]}
  results = _score("reasonseg", reasonseg_root, "val", tmp_path, boxes)
  table = results["benchmark"]["table"]
  want = official_reasonseg(reasonseg_root, tmp_path)
  assert sorted(table) == sorted(want) == ["long", "overall", "short"]
  for group, numbers in want.items():
    for key in ("gIoU", "cIoU"):
      assert abs(table[group][key] - numbers[key]) < 1e-6, (group, key)
  assert table["short"]["count"] == 2 and table["long"]["count"] == 1
  assert "Official table" in (tmp_path / "report.html").read_text()


def test_reasonvos_table_equals_videolisa_arithmetic(tmp_path):
  root = write_reasonvos(tmp_path / "rv")
  boxes = {"MOSE_vidA_1_0": [150, 150, 550, 550], "MOSE_vidA_2_1": [300, 200, 700, 600]}
  results = _score("reasonvos", root, "test", tmp_path / "out", boxes)
  table = results["benchmark"]["table"]["overall"]
  want = official_reasonvos(root, tmp_path / "out")
  for key in ("J", "F", "JF"):
    assert abs(table[key] - want[key]) < 1e-6, key
  assert table["count"] == 3  # The unusable answer scores empty masks, not skipped.


def test_revos_table_equals_visa_arithmetic(tmp_path):
  root = write_revos(tmp_path / "revos")
  boxes = {
    "v1_0": [100, 100, 700, 800],
    "v1_1": [100, 100, 500, 600],
    "v1_2": [0, 0, 300, 300],
    "v2_0": [0, 0, 300, 300],
  }
  results = _score("revos", root, "valid", tmp_path / "out", boxes)
  table = results["benchmark"]["table"]
  want = official_revos(root, tmp_path / "out")
  for group in ("referring", "reasoning", "overall"):
    for key in ("J", "F", "JF"):
      assert abs(table[group][key] - want[group][key]) < 1e-6, (group, key)
  assert table["referring"]["count"] == 2 and table["reasoning"]["count"] == 1
  # The type-2 expression is scored per sample but stays out of the table.
  assert {r["category"] for r in results["per_sample"]} == {"referring", "reasoning", "type2"}


# ----------------------------------------------------------------------------
# End to end: build each fixture with its TFDS builder, evaluate a tiny policy on it.
# ----------------------------------------------------------------------------

WRITERS = {
  "reasonseg": (write_reasonseg, "reason_seg", "val", 3),
  "reasonvos": (write_reasonvos, "reason_vos", "test", 3),
  "revos": (write_revos, "revos", "valid", 4),
}


@pytest.fixture(scope="module")
def tiny_policy():
  from configs import okvos as okvos_config
  from segresearch_jax import components

  config = okvos_config.get_config()
  config.model.preset = "tiny"
  config.data.num_frames = 4
  config.data.frame_size = 64
  config.data.keyframe_size = 64
  config.batch_size = 2
  config.rollout.max_turns = 2
  config.rollout.max_response_length = 64
  config.rollout.max_action_length = 32
  config.search.backend = "none"
  config.eval.report_samples = 2
  tokenizer = components.load_run_tokenizer(config)
  model_cfg, params = components.build_policy(config, tokenizer)
  # One runner for every benchmark: the batch shapes agree, so it compiles once.
  components = evaluate.eval_components(config, tokenizer, model_cfg)
  return config, params, components


@pytest.mark.slow  # One tiny-policy compile shared by the three.
@pytest.mark.parametrize("name", reasoning.BENCHMARKS)
def test_each_fixture_builds_and_evaluates_end_to_end(name, tiny_policy, tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  from segresearch_jax.data import builders

  write, builder_name, split, count = WRITERS[name]
  root = write(tmp_path / name)
  builder = builders.build(builder_name, root, tmp_path / "tfds")
  assert builder.info.splits[split].num_examples == count
  config, params, components = tiny_policy
  config = config.copy_and_resolve_references()
  config.data.benchmark = name
  config.data[f"{name}_dir"] = str(root)
  config.data.eval_split = split
  out = tmp_path / "eval"
  results = evaluate.evaluate_benchmark(config, params, components, out, search=False)
  printed = capsys.readouterr().out
  table = results["benchmark"]["table"]
  assert len(results["per_sample"]) == count
  assert len(predictions_lib.read_predictions(out / "predictions.jsonl")) == count
  assert (out / "report.html").is_file() and (out / "results.json").is_file()
  if name == "reasonseg":
    assert list(table) == ["short", "long", "overall"] and "gIoU" in printed
  elif name == "reasonvos":
    assert list(table) == ["overall"] and "J&F" in printed
  else:
    assert list(table) == ["referring", "reasoning", "overall"] and "referring" in printed
  print(printed)


@pytest.mark.slow
def test_evaluate_command_runs_a_benchmark_config(tiny_policy, tmp_path):
  import subprocess
  import sys

  import jax

  from segresearch_jax import checkpoint
  from segresearch_jax import components as components_lib

  config, params, components = tiny_policy
  ckpt_dir = tmp_path / "checkpoints"
  metadata = checkpoint.make_metadata(
    components.model_cfg, config, components_lib.load_run_tokenizer(config)
  )
  with checkpoint.Checkpointer(str(ckpt_dir), keep=1, save_every=1) as ckpt:
    ckpt.save(1, {"params": params}, jax.random.key(0), None, metadata)
  root = write_reasonvos(tmp_path / "rv")
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.evaluate",
    "--config=configs/okvos.py:reasonvos",
    f"--config.workdir={tmp_path / 'run'}",
    f"--config.data.reasonvos_dir={root}",
    "--config.model.preset=tiny",
    "--config.data.num_frames=4",
    "--config.data.frame_size=64",
    "--config.data.keyframe_size=64",
    "--config.batch_size=2",
    "--config.rollout.max_turns=2",
    "--config.rollout.max_response_length=64",
    "--config.rollout.max_action_length=32",
    "--config.search.backend=none",
    f"--checkpoint={ckpt_dir}",
    f"--out={tmp_path / 'eval'}",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "ReasonVOS test (percent)" in out.stdout and "J&F" in out.stdout
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["benchmark"]["table"]["overall"]["count"] == 3
  assert (tmp_path / "eval" / "report.html").is_file()
