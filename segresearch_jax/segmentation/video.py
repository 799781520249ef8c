"""Video segmentation from the policy's answer: one box + point on the keyframe (docs/method.md §7).

The policy names a keyframe (a frame NUMBER) and answers with a box and a point in
its coordinate convention. `keyframe_index` maps the number to its index in the
sorted frame list, `to_pixels` maps the prompt to pixels of the original frames, and
a video segmenter turns it into masks for every frame:

- `Sam2VideoSegmenter`: SAM2's video predictor. The keyframe gets the box AND the
  point in one `add_new_points_or_box` call, the mask is propagated forward and then
  backward (`reverse=True`), mask = logits > 0. `official_two_calls=True` reproduces
  the official evaluation instead: the box in one call, then the point in a second
  call that (with SAM2's default `clear_old_points=True`) drops the box (docs/differences.md).
- `WeightFreeVideoSegmenter`: the weight-free segmenter on the keyframe, then frame
  to frame in both directions: each next frame is segmented into colour regions and
  the regions that lie mostly inside a window around the previous mask and match its
  colours become the new mask.

A "no target" answer (keyframe -1, or the box [0, 0, 0, 0]) gives empty masks for
every frame (docs/differences.md: the official code cannot even parse it).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from segresearch_jax.data import okvos
from segresearch_jax.segmentation import segmenters

VIDEO_SEGMENTERS = ("weight_free", "sam2")


class VideoSegmenter(Protocol):
  """Masks for every frame from one box + point on the keyframe (pixels, original size)."""

  name: str

  def __call__(
    self, frames: np.ndarray, keyframe_index: int, box: np.ndarray, point: np.ndarray
  ) -> np.ndarray:
    """frames uint8 [T, H, W, 3] -> bool [T, H, W]."""


# ----------------------------------------------------------------------------
# From the policy's answer to pixels.
# ----------------------------------------------------------------------------


def to_pixels(
  box: Sequence[float],
  point: Sequence[float],
  convention: str,
  orig_w: int,
  orig_h: int,
  resized_w: int | None = None,
  resized_h: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A box [4] and point [2] from the policy's convention to original-frame pixels.

  Args:
    box, point: (x1, y1, x2, y2) and (x, y) as the policy wrote them.
    convention: "norm1000" (0-1000 of the frame, Qwen3-VL) or "abs_resized"
      (pixels of the resized image shown to the model, Qwen2.5-VL).
    orig_w, orig_h: the original frame size.
    resized_w, resized_h: the shown image size, required for "abs_resized".

  Returns:
    float64 box [4] and point [2] in original pixels (the inverse of docs/method.md §4.2's
    round(x / w * 1000) and round(x / w * new_w), up to that rounding).
  """
  box = np.asarray(box, np.float64).reshape(-1)
  point = np.asarray(point, np.float64).reshape(-1)
  if box.shape != (4,) or point.shape != (2,):
    raise ValueError(f"Expected a box of 4 and a point of 2 numbers, got {box} and {point}.")
  if orig_w <= 0 or orig_h <= 0:
    raise ValueError(f"The original frame size must be positive, got {orig_w}x{orig_h}.")
  if convention == "norm1000":
    from_w, from_h = 1000.0, 1000.0
  elif convention == "abs_resized":
    if not resized_w or not resized_h or resized_w <= 0 or resized_h <= 0:
      raise ValueError(
        "The abs_resized convention needs the resized image size (resized_w, resized_h), "
        f"got {resized_w}x{resized_h}."
      )
    from_w, from_h = float(resized_w), float(resized_h)
  else:
    raise ValueError(
      f"Unknown coordinate convention {convention!r}; expected one of {okvos.CONVENTIONS}."
    )
  scale = np.asarray([orig_w / from_w, orig_h / from_h])
  return box * np.tile(scale, 2), point * scale


def keyframe_index(frame_numbers: Sequence[int], keyframe: int) -> int:
  """Index of frame NUMBER `keyframe` in the video's sorted frame numbers; -1 if absent."""
  numbers = [int(n) for n in frame_numbers]
  if numbers != sorted(numbers):
    raise ValueError("frame_numbers must be sorted (the video's frame order).")
  try:
    return numbers.index(int(keyframe))
  except ValueError:
    return -1


def is_no_target(keyframe: int, box: Sequence[float]) -> bool:
  """The "no target" answer: keyframe -1 or the box [0, 0, 0, 0] (docs/method.md §1.1, docs/differences.md)."""
  return int(keyframe) < 0 or not np.any(np.asarray(box, np.float64))


def segment_video(
  frames: np.ndarray,
  keyframe_index: int,
  box: Sequence[float],
  point: Sequence[float],
  segmenter: VideoSegmenter,
) -> np.ndarray:
  """Masks for every frame from a box + point (original pixels) on one keyframe.

  Args:
    frames: uint8 [T, H, W, 3], the video in frame order.
    keyframe_index: the keyframe's INDEX in `frames` (see `keyframe_index`); -1 = no target.
    box: (x1, y1, x2, y2) in pixels of the original frames; [0, 0, 0, 0] = no target.
    point: (x, y) in pixels.
    segmenter: a `VideoSegmenter` (`make_video_segmenter`).

  Returns:
    bool [T, H, W]; all False for a "no target" answer.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(
      f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}."
    )
  t, h, w = frames.shape[:3]
  if is_no_target(keyframe_index, box):
    return np.zeros((t, h, w), bool)
  if not 0 <= keyframe_index < t:
    raise ValueError(f"keyframe_index {keyframe_index} is outside the video's {t} frames.")
  box = np.asarray(box, np.float64).reshape(-1)
  point = np.asarray(point, np.float64).reshape(-1)
  if box.shape != (4,) or point.shape != (2,) or not np.all(np.isfinite(np.r_[box, point])):
    raise ValueError(f"Expected a finite box of 4 and point of 2 numbers, got {box} and {point}.")
  masks = np.asarray(segmenter(frames, int(keyframe_index), box, point), bool)
  if masks.shape != (t, h, w):
    raise RuntimeError(f"{segmenter.name} returned masks {masks.shape}, expected {(t, h, w)}.")
  return masks


# ----------------------------------------------------------------------------
# Weight-free propagation.
# ----------------------------------------------------------------------------


class WeightFreeVideoSegmenter:
  """Keyframe by `WeightFreeSegmenter` (box + point), then region tracking both ways.

  Tracking one step: the previous mask's colours (the mean CIELAB colours of the
  regions it covers) and its box, grown by `search_margin` of its size on each side,
  form the model. In the next frame, the regions lying mostly (`inside_fraction`)
  inside that window, no larger than `max_growth` times the previous mask, whose
  colour is within `colour_distance` of the model become the mask. When the target
  vanishes (no such region) the mask is empty and the last seen model is kept, so the
  target is picked up again if it comes back near where it left.

  Args:
    segmenter: the image segmenter (a fresh `WeightFreeSegmenter` by default).
    search_margin: window growth per side, as a fraction of the box size.
    min_margin: the window grows at least this many pixels per side.
    colour_distance: CIELAB delta E for a region to match the model's colours.
    inside_fraction: a region's share that must lie inside the window.
    max_growth: regions larger than this times the previous mask area are rejected.
    min_colour_share: model colours covering less of the mask than this are ignored.
  """

  name = "weight_free"

  def __init__(
    self,
    segmenter: segmenters.WeightFreeSegmenter | None = None,
    *,
    search_margin: float = 1.5,
    min_margin: int = 4,
    colour_distance: float = 15.0,
    inside_fraction: float = 0.5,
    max_growth: float = 2.0,
    min_colour_share: float = 0.1,
  ):
    self.segmenter = segmenter or segmenters.WeightFreeSegmenter()
    self.search_margin = search_margin
    self.min_margin = min_margin
    self.colour_distance = colour_distance
    self.inside_fraction = inside_fraction
    self.max_growth = max_growth
    self.min_colour_share = min_colour_share

  def __call__(
    self, frames: np.ndarray, keyframe_index: int, box: np.ndarray, point: np.ndarray
  ) -> np.ndarray:
    t, h, w = frames.shape[:3]
    masks = np.zeros((t, h, w), bool)
    seg = self.segmenter
    seg.set_image(frames[keyframe_index])
    masks[keyframe_index] = seg.predict(points=point[None], boxes=box[None])[0]
    key_model = self._model(masks[keyframe_index])
    for order in (range(keyframe_index + 1, t), range(keyframe_index - 1, -1, -1)):
      model = key_model
      for i in order:
        if model is None:  # Nothing on the keyframe: nothing to follow.
          break
        seg.set_image(frames[i])
        masks[i] = self._track(model)
        if masks[i].any():
          model = self._model(masks[i])
    return masks

  def _model(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(colours [C, 3], window [x0, y0, x1, y1] inclusive, area) of a mask on the current image."""
    if not mask.any():
      return None
    seg = self.segmenter
    counts = np.bincount(seg.regions[mask], minlength=len(seg.region_area))
    keep = counts >= self.min_colour_share * counts.sum()
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    mx = max(self.min_margin, self.search_margin * (x1 - x0 + 1))
    my = max(self.min_margin, self.search_margin * (y1 - y0 + 1))
    window = np.asarray([x0 - mx, y0 - my, x1 + mx, y1 + my])
    return seg.region_colour[keep], window, float(mask.sum())

  def _track(self, model: tuple[np.ndarray, np.ndarray, float]) -> np.ndarray:
    colours, window, area = model
    seg = self.segmenter
    regions = seg.regions
    h, w = regions.shape
    c0, r0, c1, r1 = seg.box_pixels(window[None])[0]
    inside = np.bincount(regions[r0 : r1 + 1, c0 : c1 + 1].ravel(), minlength=len(seg.region_area))
    distance = np.sqrt(
      np.min(np.sum((seg.region_colour[:, None] - colours[None]) ** 2, axis=-1), axis=1)
    )
    chosen = (
      (inside >= self.inside_fraction * seg.region_area)
      & (seg.region_area <= self.max_growth * area)
      & (distance <= self.colour_distance)
    )
    mask = np.zeros((h, w), bool)
    mask[r0 : r1 + 1, c0 : c1 + 1] = chosen[regions[r0 : r1 + 1, c0 : c1 + 1]]
    return mask


# ----------------------------------------------------------------------------
# SAM2 video predictor.
# ----------------------------------------------------------------------------


class Sam2VideoSegmenter:
  """SAM2's video predictor (`sam2.build_sam.build_sam2_video_predictor`).

  Frames given as an array are written as lossless-quality JPEGs to a temporary
  folder (the predictor reads a JPEG folder); `segment_folder` takes a video's own
  JPEG folder directly, as the official evaluation does.

  Args:
    config: SAM2 model config inside the `sam2` package.
    checkpoint: local SAM2 checkpoint; must exist unless `random_weights`.
    device: torch device; default CUDA when available, else CPU.
    official_two_calls: reproduce the official box-then-point calls (docs/differences.md).
    random_weights: build without a checkpoint (tests only).
    checkpoint_key, config_key: the config keys named in error messages.
  """

  def __init__(
    self,
    config: str,
    checkpoint: str | None,
    device: str | None = None,
    *,
    official_two_calls: bool = False,
    random_weights: bool = False,
    checkpoint_key: str = "eval.sam2_checkpoint",
    config_key: str = "eval.sam2_config",
    seed: int = 0,
  ):
    checkpoint = segmenters.check_sam2_checkpoint(checkpoint, random_weights, checkpoint_key)
    import torch  # noqa: F401  (torch before anything that may pull in TensorFlow)
    from sam2.build_sam import build_sam2_video_predictor

    self.device = segmenters.torch_device(device)
    self.predictor = segmenters.build_sam2_model(
      build_sam2_video_predictor, config, checkpoint, self.device, config_key=config_key, seed=seed
    )
    self.official_two_calls = official_two_calls
    weights = os.path.basename(checkpoint) if checkpoint else f"random-seed{seed}"
    self.name = f"sam2:{config}:{weights}" + (":two_calls" if official_two_calls else "")

  def __call__(
    self, frames: np.ndarray, keyframe_index: int, box: np.ndarray, point: np.ndarray
  ) -> np.ndarray:
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="sam2_frames_") as tmp:
      for i, frame in enumerate(frames):
        # quality=100 without chroma subsampling: as close to the array as JPEG gets.
        Image.fromarray(frame).save(os.path.join(tmp, f"{i:05d}.jpg"), quality=100, subsampling=0)
      return self.segment_folder(tmp, keyframe_index, box, point)

  def segment_folder(
    self, video_dir: str | os.PathLike, keyframe_index: int, box: np.ndarray, point: np.ndarray
  ) -> np.ndarray:
    """Masks bool [T, H, W] for a folder of `<number>.jpg` frames (SAM2's frame order)."""
    import torch

    names = [
      p for p in os.listdir(video_dir) if pathlib.Path(p).suffix.lower() in (".jpg", ".jpeg")
    ]
    if not names:
      raise ValueError(f"No JPEG frames in {video_dir}.")
    predictor = self.predictor
    with torch.inference_mode():
      state = predictor.init_state(video_path=str(video_dir))
      t, h, w = state["num_frames"], state["video_height"], state["video_width"]
      if not 0 <= keyframe_index < t:
        raise ValueError(f"keyframe_index {keyframe_index} is outside the video's {t} frames.")
      box = np.asarray(box, np.float32)
      point = np.asarray(point, np.float32)[None]  # [1, 2]
      label = np.ones(1, np.int32)
      if self.official_two_calls:
        predictor.add_new_points_or_box(state, frame_idx=keyframe_index, obj_id=1, box=box)
        # clear_old_points=True (SAM2's default, as the official call): the box is dropped.
        predictor.add_new_points_or_box(
          state, frame_idx=keyframe_index, obj_id=1, points=point, labels=label
        )
      else:
        predictor.add_new_points_or_box(
          state, frame_idx=keyframe_index, obj_id=1, points=point, labels=label, box=box
        )
      masks = np.zeros((t, h, w), bool)
      for reverse in (False, True):
        for index, _, logits in predictor.propagate_in_video(
          state, start_frame_idx=keyframe_index, reverse=reverse
        ):
          masks[index] = (logits[0, 0] > 0.0).cpu().numpy()
    return masks


def make_video_segmenter(
  kind: str,
  *,
  sam2_config: str = "",
  sam2_checkpoint: str | None = None,
  official_two_calls: bool = False,
  device: str | None = None,
  random_weights: bool = False,
) -> VideoSegmenter:
  """The video segmenter `config.eval` names: "weight_free" | "sam2"."""
  if kind == "weight_free":
    return WeightFreeVideoSegmenter()
  if kind == "sam2":
    return Sam2VideoSegmenter(
      sam2_config,
      sam2_checkpoint,
      device,
      official_two_calls=official_two_calls,
      random_weights=random_weights,
    )
  raise ValueError(f"Unknown segmenter {kind!r} (eval.segmenter); use one of {VIDEO_SEGMENTERS}.")


def from_config(eval_config) -> VideoSegmenter:
  """`make_video_segmenter` from `config.eval` (segmenter, sam2_config, sam2_checkpoint,
  official_two_calls)."""
  return make_video_segmenter(
    eval_config.segmenter,
    sam2_config=eval_config.sam2_config,
    sam2_checkpoint=eval_config.sam2_checkpoint,
    official_two_calls=eval_config.official_two_calls,
  )
