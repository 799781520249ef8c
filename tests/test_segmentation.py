"""Image and video segmenters: weight-free quality, the SAM2 paths, coordinates, no-target."""

import pathlib

import numpy as np
import pytest

from segresearch_jax.data import okvos, synthetic
from segresearch_jax.segmentation import segmenters, video

REAL_VIDEO = pathlib.Path(__file__).resolve().parents[2] / "shared/data/real_video/toy_horse"
SAM2_TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
  return synthetic.build(
    tmp_path_factory.mktemp("syn"), num_train=16, num_test=1, frames=(5, 6), size=(96, 72)
  )


def clear_frames(okvos_dir, min_area=120):
  """(frame, mask) pairs where the target is clearly visible."""
  out = []
  for example in okvos.iter_raw_examples(okvos_dir, "train"):
    for frame, m in zip(example["frames"], example["masks"]):
      if m.sum() >= min_area:
        out.append((frame, m))
  return out


def full_video(okvos_dir, index):
  row = okvos.read_rows(okvos_dir, "train")[index]
  names = sorted(row["images"])
  base = pathlib.Path(okvos_dir) / "train"
  frames = np.stack(
    [okvos.read_frame(base / "JPEGImages" / row["video"] / f"{n}.jpg") for n in names]
  )
  numbers, masks = okvos.read_video_masks(base / "Annotations" / row["video"] / row["oid"])
  return frames, numbers, masks


# ----------------------------------------------------------------------------
# Weight-free image segmenter.
# ----------------------------------------------------------------------------


def test_weight_free_segments_a_clear_object_from_a_point_and_from_a_box(syn):
  seg = segmenters.WeightFreeSegmenter()
  point_ious, box_ious = [], []
  for frame, gt in clear_frames(syn.okvos_dir):
    stats = okvos.mask_stats(gt)
    seg.set_image(frame)
    px, py = stats["point_2d"]
    by_point = seg.predict(points=np.asarray([[px + 0.5, py + 0.5]]))
    by_box = seg.predict(boxes=np.asarray([stats["bbox_2d"]], float))
    point_ious.append(segmenters.mask_ious(by_point, gt)[0])
    box_ious.append(segmenters.mask_ious(by_box, gt)[0])
  assert len(point_ious) >= 8
  assert np.mean(point_ious) > 0.9 and np.min(point_ious) > 0.6, point_ious
  assert np.mean(box_ious) > 0.9 and np.min(box_ious) > 0.6, box_ious


def test_weight_free_box_masks_stay_in_the_box_and_add_the_point_region(syn):
  frame, gt = clear_frames(syn.okvos_dir)[0]
  seg = segmenters.WeightFreeSegmenter()
  seg.set_image(frame)
  x1, y1, x2, y2 = okvos.mask_stats(gt)["bbox_2d"]
  box = np.asarray([[x1, y1, (x1 + x2) / 2, y2]], float)  # the left half of the object
  only_box = seg.predict(boxes=box)[0]
  ys, xs = np.nonzero(only_box)
  assert xs.max() <= box[0, 2] and ys.min() >= y1
  far_point = np.asarray([[2.0, 2.0]])  # on the background, outside the box
  both = seg.predict(points=far_point, boxes=box)[0]
  assert np.all(both >= only_box)  # the point's region is added ...
  ys, xs = np.nonzero(both)
  assert xs.max() <= box[0, 2] and ys.min() >= y1 and ys.max() <= y2  # ... cut to the box


def test_weight_free_is_deterministic_and_validates_input(syn):
  frame, _ = clear_frames(syn.okvos_dir)[0]
  a, b = segmenters.WeightFreeSegmenter(), segmenters.WeightFreeSegmenter()
  with pytest.raises(RuntimeError, match="set_image"):
    a.predict(points=np.zeros((1, 2)))
  a.set_image(frame)
  b.set_image(frame.copy())
  np.testing.assert_array_equal(a.regions, b.regions)
  with pytest.raises(ValueError, match="uint8"):
    a.set_image(frame.astype(np.float32))
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    a.set_image(frame[..., 0])
  with pytest.raises(ValueError, match="at least one"):
    a.predict()
  with pytest.raises(ValueError, match=r"points must be \[N, 2\]"):
    a.predict(points=np.zeros(2))
  with pytest.raises(ValueError, match="box n AND point n"):
    a.predict(points=np.zeros((2, 2)), boxes=np.zeros((1, 4)))
  with pytest.raises(ValueError, match="NaN"):
    a.predict(boxes=np.asarray([[0, 0, np.nan, 4]]))
  with pytest.raises(ValueError, match="gt_mask has shape"):
    a.prompt_ious(np.zeros((3, 3), bool), points=np.zeros((1, 2)))


def test_weight_free_segmenter_on_a_real_frame():
  if not REAL_VIDEO.is_dir():
    pytest.skip(f"{REAL_VIDEO} not available")
  frame = okvos.read_frame(REAL_VIDEO / "00040.jpg")
  seg = segmenters.WeightFreeSegmenter()
  seg.set_image(frame)
  h, w = frame.shape[:2]
  # Real frames break into many regions, but not into pixels.
  assert 5 < len(seg.region_area) < 2000
  box = np.asarray([[0.4 * w, 0.2 * h, 0.8 * w, 0.95 * h]])
  masks = seg.predict(points=np.asarray([[0.6 * w, 0.6 * h]]), boxes=box)
  assert masks.shape == (1, h, w) and 0 < masks.sum() <= (0.4 * w + 1) * (0.75 * h + 1)


# ----------------------------------------------------------------------------
# SAM2 image segmenter (random-weight hiera-tiny, CPU).
# ----------------------------------------------------------------------------


def test_sam2_needs_an_existing_checkpoint_named_by_its_key(tmp_path):
  with pytest.raises(ValueError, match="mask_cache.sam2_checkpoint"):
    segmenters.Sam2ImageSegmenter(SAM2_TINY, None)
  with pytest.raises(FileNotFoundError, match="mask_cache.sam2_checkpoint"):
    segmenters.Sam2ImageSegmenter(SAM2_TINY, str(tmp_path / "missing.pt"))
  with pytest.raises(FileNotFoundError, match="eval.sam2_checkpoint"):
    video.Sam2VideoSegmenter(SAM2_TINY, str(tmp_path / "missing.pt"))
  with pytest.raises(ValueError, match="pick one"):
    segmenters.Sam2ImageSegmenter(SAM2_TINY, "x.pt", random_weights=True)
  with pytest.raises(ValueError, match="Unknown segmenter"):
    segmenters.make_segmenter("grabcut")


@pytest.mark.slow
def test_sam2_image_path_on_two_small_frames(syn):
  pytest.importorskip("sam2")
  # batch_size=1: batches of two prompts go through the chunking path.
  seg = segmenters.Sam2ImageSegmenter(SAM2_TINY, None, "cpu", random_weights=True, batch_size=1)
  assert seg.name.startswith("sam2:")
  for frame, gt in clear_frames(syn.okvos_dir)[:2]:
    h, w = frame.shape[:2]
    seg.set_image(frame)
    stats = okvos.mask_stats(gt)
    points = np.asarray([stats["point_2d"], [w / 2, h / 2]], float)
    boxes = np.asarray([stats["bbox_2d"], [2, 2, w - 3, h - 3]], float)
    both = seg.predict(points=points, boxes=boxes)
    assert both.shape == (2, h, w) and both.dtype == bool
    # A batch of prompts gives each prompt's own mask; the IoUs reduced on the device
    # equal the IoUs of the returned masks.
    point_masks = seg.predict(points=points)
    np.testing.assert_array_equal(seg.predict(points=points[1:])[0], point_masks[1])
    point_iou, box_iou = seg.prompt_ious(gt, points=points, boxes=boxes)
    np.testing.assert_allclose(point_iou, segmenters.mask_ious(point_masks, gt), atol=1e-9)
    np.testing.assert_allclose(
      box_iou, segmenters.mask_ious(seg.predict(boxes=boxes), gt), atol=1e-9
    )


# ----------------------------------------------------------------------------
# Coordinates, keyframes and "no target".
# ----------------------------------------------------------------------------


def test_to_pixels_for_both_conventions():
  box, point = video.to_pixels([100, 200, 500, 1000], [250, 500], "norm1000", 640, 360)
  np.testing.assert_allclose(box, [64, 72, 320, 360])
  np.testing.assert_allclose(point, [160, 180])
  box, point = video.to_pixels([28, 56, 112, 448], [56, 224], "abs_resized", 640, 360, 448, 448)
  np.testing.assert_allclose(box, [40, 45, 160, 360])
  np.testing.assert_allclose(point, [80, 180])
  with pytest.raises(ValueError, match="resized image size"):
    video.to_pixels([0, 0, 1, 1], [0, 0], "abs_resized", 640, 360)
  with pytest.raises(ValueError, match="Unknown coordinate convention"):
    video.to_pixels([0, 0, 1, 1], [0, 0], "relative", 640, 360)
  with pytest.raises(ValueError, match="4 and a point of 2"):
    video.to_pixels([0, 0, 1], [0, 0], "norm1000", 640, 360)


def test_to_pixels_inverts_the_ground_truth_conversion():
  gt = {"5": {"bbox_2d": [10, 20, 150, 90], "point_2d": [70, 50], "area": 1, "max_conn_area": 1}}
  for convention, resized in (("norm1000", None), ("abs_resized", (448, 448))):
    conv = okvos.convert_ground_truth(gt, convention, 192, 144, resized=resized)["5"]
    rw, rh = resized or (None, None)
    box, point = video.to_pixels(conv["bbox_2d"], conv["point_2d"], convention, 192, 144, rw, rh)
    np.testing.assert_allclose(box, gt["5"]["bbox_2d"], atol=0.5)
    np.testing.assert_allclose(point, gt["5"]["point_2d"], atol=0.5)


def test_keyframe_number_maps_to_its_index():
  assert video.keyframe_index([0, 5, 10, 15], 10) == 2
  assert video.keyframe_index([0, 5, 10, 15], 7) == -1
  assert video.keyframe_index([0, 5, 10, 15], -1) == -1
  with pytest.raises(ValueError, match="sorted"):
    video.keyframe_index([5, 0], 5)


class MustNotRun:
  name = "must_not_run"

  def __call__(self, *args):
    raise AssertionError("a no-target answer must not run the segmenter")


def test_no_target_answers_give_empty_masks():
  frames = np.full((3, 8, 10, 3), 100, np.uint8)
  for keyframe, box in ((-1, [1, 1, 5, 5]), (1, [0, 0, 0, 0])):
    masks = video.segment_video(frames, keyframe, box, [0, 0], MustNotRun())
    assert masks.shape == (3, 8, 10) and masks.dtype == bool and not masks.any()
  assert video.is_no_target(-1, [1, 2, 3, 4]) and video.is_no_target(3, [0, 0, 0, 0])
  assert not video.is_no_target(0, [0, 0, 1, 1])


def test_segment_video_validates_input():
  frames = np.zeros((3, 8, 10, 3), np.uint8)
  seg = video.WeightFreeVideoSegmenter()
  with pytest.raises(ValueError, match="outside"):
    video.segment_video(frames, 3, [1, 1, 4, 4], [2, 2], seg)
  with pytest.raises(ValueError, match="uint8"):
    video.segment_video(frames.astype(float), 0, [1, 1, 4, 4], [2, 2], seg)
  with pytest.raises(ValueError, match="finite box"):
    video.segment_video(frames, 0, [1, 1, np.inf, 4], [2, 2], seg)
  with pytest.raises(ValueError, match="Unknown segmenter"):
    video.make_video_segmenter("xmem")


# ----------------------------------------------------------------------------
# Video segmentation.
# ----------------------------------------------------------------------------


def test_weight_free_video_tracks_the_target_both_ways(syn):
  js, tracked = [], 0
  for index in range(16):
    frames, numbers, gts = full_video(syn.okvos_dir, index)
    # From the frame where the target is largest (the ground-truth keyframe), in the
    # middle of the video so that both directions run.
    key = int(np.argmax(gts.sum(axis=(1, 2))))
    if not 0 < key < len(gts) - 1 or tracked == 3:
      continue
    tracked += 1
    stats = okvos.mask_stats(gts[key])
    masks = video.segment_video(
      frames, key, stats["bbox_2d"], stats["point_2d"], video.WeightFreeVideoSegmenter()
    )
    assert masks.shape == gts.shape
    assert key not in (0, len(frames) - 1) or len(frames) <= 2  # both directions exercised
    js.extend(segmenters.mask_ious(masks[i : i + 1], gts[i])[0] for i in range(len(gts)))
  assert tracked == 3 and np.mean(js) > 0.85, np.round(js, 2)


@pytest.mark.slow
def test_sam2_video_path_on_real_frames(tmp_path):
  pytest.importorskip("sam2")
  paths = sorted(REAL_VIDEO.glob("*.jpg"))[:2] if REAL_VIDEO.is_dir() else []
  if len(paths) < 2:
    pytest.skip(f"{REAL_VIDEO} not available")
  frames = np.stack([okvos.read_frame(p) for p in paths])
  t, h, w = frames.shape[:3]
  seg = video.make_video_segmenter("sam2", sam2_config=SAM2_TINY, device="cpu", random_weights=True)
  predictor = seg.predictor
  # Record what reaches SAM2: the prompts on the keyframe and the frames propagated.
  states, tracked = [], []
  init_state, propagate = predictor.init_state, predictor.propagate_in_video

  def spy_init(*a, **kw):
    states.append(init_state(*a, **kw))
    return states[-1]

  def spy_propagate(*a, **kw):
    for out in propagate(*a, **kw):
      tracked.append(out[0])
      yield out

  predictor.init_state, predictor.propagate_in_video = spy_init, spy_propagate
  box, point = video.to_pixels([300, 100, 800, 950], [550, 600], "norm1000", w, h)
  labels = []
  for two_calls in (False, True):
    seg.official_two_calls = two_calls
    tracked.clear()
    masks = video.segment_video(frames, 1, box, point, seg)
    assert masks.shape == (t, h, w) and masks.dtype == bool
    assert tracked == [1, 1, 0]  # forward from the keyframe (the last frame), then backward
    inputs = states[-1]["point_inputs_per_obj"][0][1]
    labels.append(inputs["point_labels"].cpu().numpy().ravel().tolist())
  # One call: box corners (labels 2, 3) AND the point (1). Official two calls: the
  # second call clears the box, only the point is left.
  assert labels == [[2, 3, 1], [1]]
