"""Image segmenters behind one small interface: SAM2 and a weight-free region segmenter.

A segmenter takes one RGB image (`set_image`, where the expensive work happens once)
and then answers batches of prompts (`predict`): N points, N boxes, or N box+point
pairs, in pixel coordinates of that image, one mask per prompt. `prompt_ious` gives
the IoU of each prompt's mask with a ground-truth mask; it equals computing the IoU
from `predict` but need not materialise the masks, which is what the mask cache
(`mask_cache.py`) calls ~15,000 times per frame.

- `Sam2ImageSegmenter`: SAM2's `SAM2ImagePredictor` (image embedding once per image,
  prompts batched through the mask decoder, `multimask_output=False`, mask = logits > 0).
- `WeightFreeSegmenter`: a real algorithm that needs no weights, for the embedded
  default and CPU tests. `set_image` smooths the image, quantises its colours with a
  deterministic k-means in CIELAB, splits each colour class into connected regions
  and folds tiny regions into their nearest neighbour. A point selects the region
  under it; a box selects the regions lying mostly inside it (the "outside the box is
  background" assumption of GrabCut), cut to the box.

Pixel convention of the weight-free segmenter: x is the column, y the row; pixel
(row r, column c) is covered by a box [x1, y1, x2, y2] when x1 <= c <= x2 and
y1 <= r <= y2 (inclusive integer boxes, like docs/method.md §4.2's bbox_2d), and a point (x, y)
falls on pixel (floor(y), floor(x)), clipped into the image.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
from scipy import ndimage

SEGMENTERS = ("weight_free", "sam2")


class Segmenter(Protocol):
  """What the mask cache and the video segmentation need from an image segmenter."""

  name: str  # Identifies the algorithm (and weights) in cache manifests.

  def set_image(self, image: np.ndarray) -> None:
    """Takes uint8 [H, W, 3] RGB and does the per-image work once."""

  def predict(
    self, points: np.ndarray | None = None, boxes: np.ndarray | None = None
  ) -> np.ndarray:
    """Masks for N prompts: points float [N, 2] (x, y) and/or boxes float [N, 4]
    (x1, y1, x2, y2) in pixels; with both, prompt n is box n AND point n. -> bool [N, H, W]."""

  def prompt_ious(
    self, gt_mask: np.ndarray, points: np.ndarray | None = None, boxes: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """IoU with `gt_mask` of each point-only prompt [Np] and each box-only prompt [Nb]."""


# ----------------------------------------------------------------------------
# Shared checks and IoU.
# ----------------------------------------------------------------------------


def check_image(image: np.ndarray) -> np.ndarray:
  """Returns `image` as a C-contiguous uint8 [H, W, 3] array or raises a clear error."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"Expected an RGB image [H, W, 3], got shape {image.shape}.")
  if image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image, got {image.dtype}.")
  return np.ascontiguousarray(image)


def check_prompts(
  points: np.ndarray | None, boxes: np.ndarray | None, *, allow_unpaired: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None]:
  """Validates prompt arrays: points [N, 2], boxes [N, 4], finite; same N when both given."""
  if points is None and boxes is None:
    raise ValueError("Give at least one of points [N, 2] or boxes [N, 4].")
  if points is not None:
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
      raise ValueError(f"points must be [N, 2] (x, y), got shape {points.shape}.")
    if not np.all(np.isfinite(points)):
      raise ValueError("points contain NaN or infinity.")
  if boxes is not None:
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
      raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {boxes.shape}.")
    if not np.all(np.isfinite(boxes)):
      raise ValueError("boxes contain NaN or infinity.")
  if not allow_unpaired and points is not None and boxes is not None:
    if len(points) != len(boxes):
      raise ValueError(
        f"With both prompts, prompt n is box n AND point n: got {len(points)} points "
        f"and {len(boxes)} boxes."
      )
  return points, boxes


def check_gt_mask(gt_mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """`gt_mask` as bool [H, W] of the image's `shape`, or a clear error."""
  gt_mask = np.asarray(gt_mask)
  if gt_mask.shape != shape:
    raise ValueError(f"gt_mask has shape {gt_mask.shape}, the image is {shape}.")
  return gt_mask.astype(bool, copy=False)


def iou_from_counts(inter: np.ndarray, area: np.ndarray, gt_area: float) -> np.ndarray:
  """IoU = inter / (area + gt_area - inter); 1 when both masks are empty (docs/method.md §7's J)."""
  inter = np.asarray(inter, np.float64)
  union = np.asarray(area, np.float64) + float(gt_area) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)


def mask_ious(masks: np.ndarray, gt_mask: np.ndarray) -> np.ndarray:
  """IoU of bool masks [N, H, W] with one bool mask [H, W] -> float64 [N]."""
  masks = np.asarray(masks, bool)
  gt_mask = np.asarray(gt_mask, bool)
  inter = np.logical_and(masks, gt_mask).sum(axis=(1, 2))
  return iou_from_counts(inter, masks.sum(axis=(1, 2)), gt_mask.sum())


# ----------------------------------------------------------------------------
# Weight-free segmenter.
# ----------------------------------------------------------------------------


_SRGB_TO_LINEAR = np.where(
  np.arange(256) / 255.0 > 0.04045,
  ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4,
  np.arange(256) / 255.0 / 12.92,
).astype(np.float32)
_RGB_TO_XYZ = (
  np.asarray(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32
  )
  / np.asarray([[0.95047], [1.0], [1.08883]], np.float32)  # D65 white -> 1
)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
  """sRGB uint8 [..., 3] -> CIELAB (D65) float32 [..., 3]."""
  linear = _SRGB_TO_LINEAR[np.asarray(image, np.uint8)]  # A table: no per-pixel power.
  xyz = linear @ _RGB_TO_XYZ.T
  f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
  lab = np.empty_like(f)
  lab[..., 0] = 116.0 * f[..., 1] - 16.0
  lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
  lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
  return lab


def _kmeans(samples: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding; deterministic for a seeded `rng`."""
  k = min(k, len(samples))
  centres = [samples[int(rng.integers(len(samples)))]]
  closest = np.sum((samples - centres[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = closest.sum()
    if total <= 0:  # Fewer distinct colours than k.
      break
    centres.append(samples[int(rng.choice(len(samples), p=closest / total))])
    closest = np.minimum(closest, np.sum((samples - centres[-1]) ** 2, axis=1))
  centres = np.stack(centres)
  for _ in range(iterations):
    assign = _nearest(samples, centres)
    counts = np.bincount(assign, minlength=len(centres))
    sums = np.stack([np.bincount(assign, samples[:, c], len(centres)) for c in range(3)], 1)
    keep = counts > 0
    centres = sums[keep] / counts[keep, None]
  return centres.astype(np.float32)


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """Index of the nearest centre for each row of `points` [N, 3]."""
  # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 does not change the argmin.
  scores = points @ (-2.0 * centres.T) + np.sum(centres**2, axis=1)
  return np.argmin(scores, axis=1)


def _merge_close(centres: np.ndarray, weights: np.ndarray, distance: float) -> np.ndarray:
  """Greedily merges the closest pair of centres while it is closer than `distance`.

  k-means always uses all its centres, so a flat background gets split into several
  clusters that differ by noise only; merging them back keeps it one region.
  """
  centres, weights = centres.astype(np.float64), weights.astype(np.float64)
  while len(centres) > 1:
    d = np.sqrt(np.sum((centres[:, None] - centres[None]) ** 2, axis=-1))
    np.fill_diagonal(d, np.inf)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    if d[i, j] >= distance:
      break
    w = weights[i] + weights[j]
    merged = (centres[i] * weights[i] + centres[j] * weights[j]) / max(w, 1e-9)
    keep = np.ones(len(centres), bool)
    keep[j] = False
    centres[i], weights[i] = merged, w
    centres, weights = centres[keep], weights[keep]
  return centres.astype(np.float32)


_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _interior(regions: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose 4 neighbours (inside the image) share their region."""
  same = np.ones(regions.shape, bool)
  same[1:] &= regions[1:] == regions[:-1]
  same[:-1] &= regions[:-1] == regions[1:]
  same[:, 1:] &= regions[:, 1:] == regions[:, :-1]
  same[:, :-1] &= regions[:, :-1] == regions[:, 1:]
  return same


class WeightFreeSegmenter:
  """Colour regions in `set_image`; points and boxes select regions (see module doc).

  Args:
    colours: k-means clusters before merging near-identical ones.
    merge_distance: clusters closer than this (CIELAB delta E) become one colour.
    smooth_sigma: Gaussian blur (pixels) before quantising; removes sensor/JPEG noise.
    min_region: regions smaller than this fraction of the image (and never below
      `min_region_pixels`) are folded into the nearest larger region.
    min_region_pixels: the absolute floor of the tiny-region threshold.
    min_interior: regions with fewer interior pixels (all 4 neighbours in the region)
      than this fraction of their area are thin boundary rings and are folded too.
    inside_fraction: a box selects the regions with at least this fraction of their
      pixels inside it; if none qualifies, the region with the largest fraction.
    max_samples: pixels sampled (deterministically) for k-means.
  """

  name = "weight_free"

  def __init__(
    self,
    *,
    colours: int = 12,
    merge_distance: float = 12.0,
    smooth_sigma: float = 1.0,
    min_region: float = 2e-4,
    min_region_pixels: int = 6,
    min_interior: float = 0.25,
    inside_fraction: float = 0.5,
    max_samples: int = 4096,
  ):
    if colours < 1:
      raise ValueError(f"colours must be >= 1, got {colours}.")
    if not 0.0 < inside_fraction <= 1.0:
      raise ValueError(f"inside_fraction must be in (0, 1], got {inside_fraction}.")
    self.colours = colours
    self.merge_distance = merge_distance
    self.smooth_sigma = smooth_sigma
    self.min_region = min_region
    self.min_region_pixels = min_region_pixels
    self.min_interior = min_interior
    self.inside_fraction = inside_fraction
    self.max_samples = max_samples
    self.regions: np.ndarray | None = None  # int32 [H, W], ids 0..M-1
    self.region_area: np.ndarray | None = None  # float64 [M]
    self.region_colour: np.ndarray | None = None  # float32 [M, 3] mean CIELAB

  # -- per image --------------------------------------------------------------

  def set_image(self, image: np.ndarray) -> None:
    """Quantises colours, labels connected regions and folds tiny ones (see class doc)."""
    image = check_image(image)
    h, w = image.shape[:2]
    lab = rgb_to_lab(image)
    if self.smooth_sigma > 0:
      lab = ndimage.gaussian_filter(lab, sigma=(self.smooth_sigma, self.smooth_sigma, 0))
    flat = lab.reshape(-1, 3)
    # 1. Colour classes: k-means on a fixed pixel subsample, so equal images give
    #    equal regions (the mask cache relies on it), then merge noise-level splits.
    rng = np.random.default_rng(0)
    sample = (
      flat
      if len(flat) <= self.max_samples
      else flat[rng.choice(len(flat), self.max_samples, replace=False)]
    )
    centres = _kmeans(sample, self.colours, iterations=8, rng=rng)
    counts = np.bincount(_nearest(sample, centres), minlength=len(centres))
    centres = _merge_close(centres, counts, self.merge_distance)
    classes = _nearest(flat, centres).reshape(h, w)
    # 2. Connected regions of each colour class (4-connected: no leaks across corners).
    regions = np.zeros((h, w), np.int32)
    offset = 0
    for c in range(len(centres)):
      labels, n = ndimage.label(classes == c, structure=_FOUR_CONNECTED)
      inside = labels > 0
      regions[inside] = labels[inside] + offset - 1
      offset += n
    # 3. Fold regions that are tiny, or thin (mostly boundary: the rings of mixed
    #    colour that blur and JPEG leave around edges), into the nearest other region.
    area = np.bincount(regions.ravel(), minlength=offset)
    interior = np.bincount(regions[_interior(regions)], minlength=offset)
    threshold = max(self.min_region_pixels, self.min_region * h * w)
    fold = (area < threshold) | (interior < self.min_interior * area)
    tiny = fold[regions]
    if tiny.any() and not tiny.all():
      nearest = ndimage.distance_transform_edt(tiny, return_distances=False, return_indices=True)
      regions = regions[nearest[0], nearest[1]]
    present = np.bincount(regions.ravel(), minlength=offset) > 0
    regions = (np.cumsum(present) - 1).astype(np.int32)[regions]  # Ids 0..M-1, no gaps.
    m = int(present.sum())
    self.regions = regions
    self.region_area = np.bincount(regions.ravel(), minlength=m).astype(np.float64)
    self.region_colour = (
      np.stack([np.bincount(regions.ravel(), flat[:, c], m) for c in range(3)], 1)
      / self.region_area[:, None]
    ).astype(np.float32)

  def _require_image(self) -> np.ndarray:
    if self.regions is None:
      raise RuntimeError("Call set_image(image) before predicting.")
    return self.regions

  # -- prompts ----------------------------------------------------------------

  def point_regions(self, points: np.ndarray) -> np.ndarray:
    """The region id under each point [N, 2] -> int [N]."""
    regions = self._require_image()
    h, w = regions.shape
    cols = np.clip(np.floor(points[:, 0]), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(points[:, 1]), 0, h - 1).astype(np.int64)
    return regions[rows, cols]

  def box_pixels(self, boxes: np.ndarray) -> np.ndarray:
    """Inclusive pixel ranges [c0, r0, c1, r1] of boxes [N, 4]; empty when c0 > c1 or r0 > r1."""
    h, w = self._require_image().shape
    c0 = np.clip(np.ceil(boxes[:, 0]), 0, w).astype(np.int64)
    r0 = np.clip(np.ceil(boxes[:, 1]), 0, h).astype(np.int64)
    c1 = np.clip(np.floor(boxes[:, 2]), -1, w - 1).astype(np.int64)
    r1 = np.clip(np.floor(boxes[:, 3]), -1, h - 1).astype(np.int64)
    return np.stack([c0, r0, c1, r1], axis=1)

  def _box_counts(self, ranges: np.ndarray, weights: list[np.ndarray | None]) -> list[np.ndarray]:
    """Per box and region, the (weighted) pixel count inside the box: [N, M] per weight.

    All boxes' edges cut the image into a lattice of cells; one pass over the pixels
    counts each region's pixels per cell, and a 2-D prefix sum then gives any box's
    count in O(M). For the cache's K-bin boxes the lattice has at most 2K+1 cells a side.
    """
    regions = self._require_image()
    h, w = regions.shape
    m = len(self.region_area)
    n = len(ranges)
    c0, r0, c1, r1 = (ranges[:, i] for i in range(4))
    # An empty range counts nothing: give it zero width at its start.
    c_end = np.maximum(c1 + 1, c0)
    r_end = np.maximum(r1 + 1, r0)
    x_edges = np.unique(np.concatenate([[0, w], c0, c_end]))
    y_edges = np.unique(np.concatenate([[0, h], r0, r_end]))
    cell_x = np.searchsorted(x_edges, np.arange(w), side="right") - 1  # [W]
    cell_y = np.searchsorted(y_edges, np.arange(h), side="right") - 1  # [H]
    nx, ny = len(x_edges), len(y_edges)  # Prefix-sum sizes: cells + 1.
    index = (regions * ny + cell_y[:, None]) * nx + cell_x[None, :]  # [H, W]
    ix0, ix1 = np.searchsorted(x_edges, c0), np.searchsorted(x_edges, c_end)
    iy0, iy1 = np.searchsorted(y_edges, r0), np.searchsorted(y_edges, r_end)
    out = []
    for weight in weights:
      cells = np.bincount(
        index.ravel(), None if weight is None else weight.ravel(), minlength=m * ny * nx
      ).reshape(m, ny, nx)
      prefix = np.zeros((ny + 1, nx + 1, m), np.float64)  # [y, x, region]
      prefix[1:, 1:] = np.cumsum(np.cumsum(cells, axis=1), axis=2).transpose(1, 2, 0)
      counts = np.empty((n, m), np.float64)
      # Bounded chunks: N boxes x M regions can be large on busy real frames.
      step = max(1, (1 << 22) // max(m, 1))
      for s in range(0, n, step):
        e = slice(s, s + step)
        counts[e] = (
          prefix[iy1[e], ix1[e]]
          - prefix[iy0[e], ix1[e]]
          - prefix[iy1[e], ix0[e]]
          + prefix[iy0[e], ix0[e]]
        )
      out.append(counts)
    return out

  def _select(self, inside: np.ndarray) -> np.ndarray:
    """Regions a box selects, from their pixel counts inside it [N, M] -> bool [N, M]."""
    fraction = inside / self.region_area[None]
    selected = fraction >= self.inside_fraction
    none = ~selected.any(axis=1)
    if none.any():
      selected[np.flatnonzero(none), np.argmax(fraction[none], axis=1)] = True
    return selected

  def predict(
    self, points: np.ndarray | None = None, boxes: np.ndarray | None = None
  ) -> np.ndarray:
    """Masks bool [N, H, W]: the region under each point; the regions mostly inside each
    box, cut to the box; with both, their union cut to the box."""
    regions = self._require_image()
    points, boxes = check_prompts(points, boxes)
    h, w = regions.shape
    n = len(points) if points is not None else len(boxes)
    masks = np.zeros((n, h, w), bool)
    if boxes is not None:
      ranges = self.box_pixels(boxes)
      (inside,) = self._box_counts(ranges, [None])
      selected = self._select(inside)
      if points is not None:
        selected[np.arange(n), self.point_regions(points)] = True
      for i, (c0, r0, c1, r1) in enumerate(ranges):
        if c0 <= c1 and r0 <= r1:
          crop = regions[r0 : r1 + 1, c0 : c1 + 1]
          masks[i, r0 : r1 + 1, c0 : c1 + 1] = selected[i][crop]
    else:
      for i, r in enumerate(self.point_regions(points)):
        masks[i] = regions == r
    return masks

  def prompt_ious(
    self, gt_mask: np.ndarray, points: np.ndarray | None = None, boxes: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """IoUs of point-only and box-only prompts with `gt_mask`, from region counts alone.

    Equals `mask_ious(self.predict(points=...), gt_mask)` (and likewise for boxes)
    without building a single mask.
    """
    regions = self._require_image()
    points, boxes = check_prompts(points, boxes, allow_unpaired=True)
    gt = check_gt_mask(gt_mask, regions.shape)
    gt_area = float(gt.sum())
    m = len(self.region_area)
    point_iou = np.zeros(0)
    box_iou = np.zeros(0)
    if points is not None:
      inter = np.bincount(regions.ravel(), gt.ravel().astype(np.float64), minlength=m)
      region_iou = iou_from_counts(inter, self.region_area, gt_area)
      point_iou = region_iou[self.point_regions(points)]
    if boxes is not None:
      inside, inside_gt = self._box_counts(self.box_pixels(boxes), [None, gt.astype(np.float64)])
      selected = self._select(inside)
      box_iou = iou_from_counts(
        np.sum(inside_gt, axis=1, where=selected), np.sum(inside, axis=1, where=selected), gt_area
      )
    return point_iou, box_iou


# ----------------------------------------------------------------------------
# SAM2.
# ----------------------------------------------------------------------------


def torch_device(device: str | None) -> str:
  """`device`, or CUDA when available, else CPU."""
  if device:
    return device
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def check_sam2_checkpoint(
  checkpoint: str | None, random_weights: bool, checkpoint_key: str
) -> str | None:
  """The checkpoint path to load, or None for random weights; clear errors otherwise."""
  if random_weights:
    if checkpoint:
      raise ValueError(
        f"random_weights=True but a checkpoint was given ({checkpoint_key}={checkpoint!r}); "
        "pick one."
      )
    return None
  if not checkpoint:
    raise ValueError(
      f"SAM2 needs a checkpoint: set {checkpoint_key} to a local SAM2.1 .pt file "
      "(e.g. sam2.1_hiera_large.pt), or use the weight_free segmenter."
    )
  if not os.path.isfile(checkpoint):
    raise FileNotFoundError(f"{checkpoint_key}={checkpoint!r}: no such file.")
  return str(checkpoint)


def build_sam2_model(
  builder,
  config: str,
  checkpoint: str | None,
  device: str,
  *,
  config_key: str,
  seed: int = 0,
):
  """Calls a `sam2.build_sam` builder; random weights are drawn from a forked, seeded RNG."""
  import torch

  try:
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)  # Random-weight models are reproducible; the global RNG is untouched.
      return builder(config, ckpt_path=checkpoint, device=device)
  except Exception as e:
    if type(e).__name__ in ("MissingConfigException", "ConfigCompositionException"):
      raise ValueError(
        f"{config_key}={config!r} is not a SAM2 config of the installed `sam2` package "
        "(expected e.g. 'configs/sam2.1/sam2.1_hiera_l.yaml')."
      ) from e
    raise


class Sam2ImageSegmenter:
  """SAM2 through `sam2.sam2_image_predictor.SAM2ImagePredictor`.

  Args:
    config: SAM2 model config inside the `sam2` package, e.g.
      "configs/sam2.1/sam2.1_hiera_l.yaml".
    checkpoint: local SAM2 checkpoint (.pt); must exist unless `random_weights`.
    device: torch device; default CUDA when available, else CPU.
    random_weights: build the model without a checkpoint (tests only).
    batch_size: prompts per mask-decoder call.
    checkpoint_key, config_key: the config keys named in error messages.
    seed: the torch seed of random weights.
  """

  def __init__(
    self,
    config: str,
    checkpoint: str | None,
    device: str | None = None,
    *,
    random_weights: bool = False,
    batch_size: int = 32,
    checkpoint_key: str = "mask_cache.sam2_checkpoint",
    config_key: str = "mask_cache.sam2_config",
    seed: int = 0,
  ):
    checkpoint = check_sam2_checkpoint(checkpoint, random_weights, checkpoint_key)
    import torch  # noqa: F401  (torch before anything that may pull in TensorFlow)
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    self.device = torch_device(device)
    model = build_sam2_model(
      build_sam2, config, checkpoint, self.device, config_key=config_key, seed=seed
    )
    self.predictor = SAM2ImagePredictor(model, mask_threshold=0.0)
    self.batch_size = batch_size
    weights = os.path.basename(checkpoint) if checkpoint else f"random-seed{seed}"
    self.name = f"sam2:{config}:{weights}"
    self._shape: tuple[int, int] | None = None

  def set_image(self, image: np.ndarray) -> None:
    """Computes the image embedding once; every prompt on this image reuses it."""
    image = check_image(image)
    self.predictor.set_image(image)
    self._shape = image.shape[:2]

  def _mask_batches(self, points: np.ndarray | None, boxes: np.ndarray | None):
    """Yields torch bool masks [n, H, W] for consecutive batches of prompts."""
    import torch

    if self._shape is None:
      raise RuntimeError("Call set_image(image) before predicting.")
    n = len(points) if points is not None else len(boxes)
    for s in range(0, n, self.batch_size):
      e = min(n, s + self.batch_size)
      coords = labels = None
      if points is not None:
        coords = points[s:e, None, :]  # [n, 1, 2]: one point per prompt
        labels = np.ones((e - s, 1), np.int64)
      box = boxes[s:e] if boxes is not None else None
      # The predictor's own prompt transform and batched decoder (what `predict` runs),
      # kept on the device so the cache can reduce masks to IoUs there.
      _, coords_t, labels_t, box_t = self.predictor._prep_prompts(
        coords, labels, box, None, normalize_coords=True
      )
      with torch.inference_mode():
        logits, _, _ = self.predictor._predict(
          coords_t, labels_t, box_t, None, multimask_output=False, return_logits=True
        )
      yield logits[:, 0] > 0.0

  def predict(
    self, points: np.ndarray | None = None, boxes: np.ndarray | None = None
  ) -> np.ndarray:
    """Masks bool [N, H, W] (logits > 0), one per prompt; box+point in one prompt when both."""
    points, boxes = check_prompts(points, boxes)
    return np.concatenate([m.cpu().numpy() for m in self._mask_batches(points, boxes)])

  def prompt_ious(
    self, gt_mask: np.ndarray, points: np.ndarray | None = None, boxes: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """IoUs of point-only and box-only prompts with `gt_mask`, reduced on the device."""
    import torch

    points, boxes = check_prompts(points, boxes, allow_unpaired=True)
    if self._shape is None:
      raise RuntimeError("Call set_image(image) before predicting.")
    gt = torch.from_numpy(np.array(check_gt_mask(gt_mask, self._shape))).to(self.device)
    gt_area = float(gt.sum())

    def ious(p, b):
      out = []
      for masks in self._mask_batches(p, b):
        inter = (masks & gt).sum(dim=(1, 2)).double().cpu().numpy()
        area = masks.sum(dim=(1, 2)).double().cpu().numpy()
        out.append(iou_from_counts(inter, area, gt_area))
      return np.concatenate(out) if out else np.zeros(0)

    point_iou = ious(points, None) if points is not None else np.zeros(0)
    box_iou = ious(None, boxes) if boxes is not None else np.zeros(0)
    return point_iou, box_iou


def make_segmenter(
  kind: str,
  *,
  sam2_config: str = "",
  sam2_checkpoint: str | None = None,
  device: str | None = None,
  random_weights: bool = False,
  config_prefix: str = "mask_cache",
) -> Segmenter:
  """The segmenter a config names ("weight_free" | "sam2"); `config_prefix` names its keys."""
  if kind == "weight_free":
    return WeightFreeSegmenter()
  if kind == "sam2":
    return Sam2ImageSegmenter(
      sam2_config,
      sam2_checkpoint,
      device,
      random_weights=random_weights,
      checkpoint_key=f"{config_prefix}.sam2_checkpoint",
      config_key=f"{config_prefix}.sam2_config",
    )
  raise ValueError(
    f"Unknown segmenter {kind!r} ({config_prefix}.segmenter); use one of {SEGMENTERS}."
  )
