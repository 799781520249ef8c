"""The mask-IoU cache format (docs/method.md §3.2): grids, file layout, reading and writing.

For every (sample, shown frame) a segmenter is prompted once with every point of a
G x G grid and every box of a K-bin grid, and the IoU of each prompt's mask with the
GT mask (at the ORIGINAL resolution) is stored as uint8 round(255 * IoU). The reward
(`rewards/mask.py`) then gathers the entry nearest to the policy's prompt inside jit;
the data pipeline reads a sample's entry next to its frames. Building the tables
(running a segmenter) is `segmentation/mask_cache.py`; this module needs no segmenter.

Grids are in NORMALISED frame coordinates ([0, 1] of width and height), so one cache
serves every model family:

- points: the cell centres of a G x G grid, ((j + 0.5) / G, (i + 0.5) / G);
  `point_iou[f, i, j]` is the prompt in row i (y) and column j (x).
- boxes: K bin centres c_k = (k + 0.5) / K per coordinate, x1 < x2 and y1 < y2.
  An axis has P = K (K - 1) / 2 ordered bin pairs (lo < hi), numbered by `pair_index`;
  `box_iou[f, px, py]` is the box (c[x_lo], c[y_lo], c[x_hi], c[y_hi]) with
  px = pair_index(x_lo, x_hi), py = pair_index(y_lo, y_hi). This packed layout holds
  only valid boxes (K=16: 14,400 a frame instead of 65,536 for [K, K, K, K]).

On disk, one uncompressed `.npz` per sample in `{cache_dir}/{split}/` (fast random
reads in grain workers) with frame_numbers int32 [F], point_iou uint8 [F, G, G],
box_iou uint8 [F, P, P] and a JSON `meta` string; `manifest.json` there records G, K,
the segmenter and how frames were sampled. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import pathlib
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class MaskCacheError(ValueError):
  """A missing, stale or mismatched cache entry; the message says how to rebuild it."""


# ----------------------------------------------------------------------------
# Grids.
# ----------------------------------------------------------------------------


def bin_centres(k: int) -> np.ndarray:
  """The K bin centres (k + 0.5) / K of [0, 1] -> float32 [K]."""
  return ((np.arange(k) + 0.5) / k).astype(np.float32)


def num_pairs(k: int) -> int:
  """P = K (K - 1) / 2: ordered bin pairs lo < hi on one axis."""
  return k * (k - 1) // 2


def bins_from_pairs(p: int) -> int:
  """K from the pair count P = K (K - 1) / 2 of a box table's last axis."""
  k = int(round((1 + np.sqrt(1 + 8 * p)) / 2))
  if num_pairs(k) != p:
    raise MaskCacheError(f"{p} box pairs per axis is not K (K - 1) / 2 for any K.")
  return k


def pair_index(lo, hi, k: int):
  """Index of the bin pair (lo, hi), lo < hi, in 0..P-1 (NumPy or jnp integers).

  Pairs are numbered lo-major: (0,1), (0,2), ..., (0,K-1), (1,2), ...
  """
  return lo * (2 * k - lo - 1) // 2 + (hi - lo - 1)


def bin_pairs(k: int) -> np.ndarray:
  """All (lo, hi) bin pairs in `pair_index` order -> int32 [P, 2]."""
  lo, hi = np.triu_indices(k, 1)  # Row-major upper triangle = lo-major order.
  return np.stack([lo, hi], axis=1).astype(np.int32)


def point_grid(g: int) -> np.ndarray:
  """Normalised point prompts (x, y) in `point_iou` order (row i, column j) -> [G*G, 2]."""
  c = (np.arange(g) + 0.5) / g
  ys, xs = np.meshgrid(c, c, indexing="ij")
  return np.stack([xs.ravel(), ys.ravel()], axis=1)


def box_grid(k: int) -> np.ndarray:
  """Normalised box prompts (x1, y1, x2, y2) in `box_iou` order (px, py) -> [P*P, 4]."""
  c = bin_centres(k).astype(np.float64)
  pairs = bin_pairs(k)
  p = len(pairs)
  px, py = np.repeat(np.arange(p), p), np.tile(np.arange(p), p)
  return np.stack([c[pairs[px, 0]], c[pairs[py, 0]], c[pairs[px, 1]], c[pairs[py, 1]]], axis=1)


def to_uint8(iou: np.ndarray) -> np.ndarray:
  """IoU in [0, 1] -> uint8 round(255 * IoU)."""
  return np.clip(np.rint(np.asarray(iou, np.float64) * 255.0), 0, 255).astype(np.uint8)


def bytes_per_sample(num_frames: int, point_grid_size: int, box_bins: int) -> int:
  """Table bytes of one sample (the npz adds ~1 KB of headers)."""
  p = num_pairs(box_bins)
  return num_frames * (point_grid_size**2 + p * p) + 4 * num_frames


def check_grid(point_grid_size: int, box_bins: int) -> None:
  """Raises ValueError unless G >= 1 and K >= 2."""
  if point_grid_size < 1:
    raise ValueError(f"point_grid must be >= 1, got {point_grid_size}.")
  if box_bins < 2:
    raise ValueError(f"box_bins must be >= 2 (a box needs x1 < x2), got {box_bins}.")


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def split_dir(cache_dir: str | os.PathLike, split: str) -> pathlib.Path:
  """The folder of one split's entries and manifest."""
  return pathlib.Path(cache_dir) / split


def entry_path(cache_dir: str | os.PathLike, split: str, sample_id: str) -> pathlib.Path:
  """The file of one sample; the id is percent-encoded, so any id is a safe file name."""
  return split_dir(cache_dir, split) / f"{urllib.parse.quote(str(sample_id), safe='')}.npz"


def default_cache_dir(okvos_dir: str | os.PathLike, configured: str = "") -> str:
  """`config.mask_cache.dir` when set, else `{okvos_dir}/mask_cache` (next to the data)."""
  return str(configured) if configured else str(pathlib.Path(okvos_dir) / "mask_cache")


def write_entry(
  path: str | os.PathLike,
  *,
  sample_id: str,
  frame_numbers: np.ndarray,
  point_iou: np.ndarray,
  box_iou: np.ndarray,
  segmenter_name: str,
) -> None:
  """Writes one sample's tables atomically (a crash never leaves a half-written entry)."""
  path = pathlib.Path(path)
  g = point_iou.shape[-1]
  p = box_iou.shape[-1]
  k = bins_from_pairs(p)
  meta = {
    "format": FORMAT_VERSION,
    "sample_id": str(sample_id),
    "point_grid": int(g),
    "box_bins": int(k),
    "segmenter": segmenter_name,
  }
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(
      f,
      frame_numbers=np.asarray(frame_numbers, np.int32),
      point_iou=np.asarray(point_iou, np.uint8),
      box_iou=np.asarray(box_iou, np.uint8),
      meta=np.asarray(json.dumps(meta)),
    )
  os.replace(tmp, path)


def read_entry(path: str | os.PathLike) -> dict[str, Any]:
  """Reads one entry file: frame_numbers, point_iou, box_iou and the meta fields."""
  with np.load(path, allow_pickle=False) as data:
    out = {k: data[k] for k in ("frame_numbers", "point_iou", "box_iou")}
    meta = json.loads(str(data["meta"]))
  out.update(meta)
  return out


def entry_matches(path: pathlib.Path, point_grid_size: int, box_bins: int, name: str) -> bool:
  """Whether the entry at `path` reads and was built with this format, G, K and segmenter."""
  try:
    with np.load(path, allow_pickle=False) as data:
      meta = json.loads(str(data["meta"]))
  except Exception:  # An unreadable file is rebuilt, whatever broke it.
    return False
  return (
    meta.get("format") == FORMAT_VERSION
    and meta.get("point_grid") == point_grid_size
    and meta.get("box_bins") == box_bins
    and meta.get("segmenter") == name
  )


def load_entry(
  cache_dir: str | os.PathLike,
  split: str,
  sample_id: str,
  frame_numbers: Sequence[int],
  *,
  point_grid_size: int | None = None,
  box_bins: int | None = None,
) -> dict[str, Any]:
  """One sample's tables, checked against the frames the data pipeline shows.

  Args:
    cache_dir: the cache root (`{okvos_dir}/mask_cache` or `config.mask_cache.dir`).
    split: the split folder inside it.
    sample_id: the sample's id (`okvos.sample_id`).
    frame_numbers: the sample's shown frame numbers, in pipeline order (no padding).
    point_grid_size, box_bins: when given, the entry's G and K must equal them.

  Returns:
    frame_numbers int32 [F], point_iou uint8 [F, G, G], box_iou uint8 [F, P, P],
    point_grid, box_bins, segmenter, sample_id.

  Raises:
    MaskCacheError: the entry is missing, or was built for other frames or grids.
  """
  path = entry_path(cache_dir, split, sample_id)
  hint = (
    "build it with `python -m segresearch_jax.tools.build_mask_cache --config=... "
    f"--split={split}` using the same data.num_frames and seed as training"
  )
  if not path.is_file():
    raise MaskCacheError(
      f"No mask-cache entry for sample {sample_id!r} ({split}) at {path}; {hint}."
    )
  try:
    entry = read_entry(path)
  except Exception as e:
    raise MaskCacheError(f"Cannot read mask-cache entry {path}: {e}; {hint}.") from e
  want = [int(n) for n in frame_numbers]
  have = [int(n) for n in entry["frame_numbers"]]
  if have != want:
    raise MaskCacheError(
      f"Mask-cache entry for sample {sample_id!r} ({split}) holds frames {have} but the "
      f"pipeline shows {want}; {hint}."
    )
  for key, expected in (("point_grid", point_grid_size), ("box_bins", box_bins)):
    if expected is not None and entry[key] != expected:
      raise MaskCacheError(
        f"Mask-cache entry {path} has {key}={entry[key]}, expected {expected}; {hint}."
      )
  return entry
