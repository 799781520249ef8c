"""Builds the mask-IoU cache behind the mask reward (docs/method.md §3.2) by running a segmenter.

`data/mask_tables.py` holds the format (grids, files, reading); this module prompts a
segmenter with every grid point and box of a sample's shown frames and writes the
tables. A build is resumable: a sample whose file exists with the same G, K and
segmenter is skipped, and it can stop at the samples that the first N positions of the
training stream read (a run of a few steps reads few of a split's samples). `build` is
the whole step from a run config (the trainer calls it before training with the mask
reward, for its own steps; `tools/build_mask_cache.py` is its command line, for a
whole split).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import numpy as np

from segresearch_jax.data import mask_tables, okvos, pipeline
from segresearch_jax.segmentation import segmenters

# ----------------------------------------------------------------------------
# One sample's tables.
# ----------------------------------------------------------------------------


def frame_tables(
  segmenter: segmenters.Segmenter,
  frame: np.ndarray,
  gt_mask: np.ndarray,
  point_grid_size: int,
  box_bins: int,
) -> tuple[np.ndarray, np.ndarray]:
  """One frame's uint8 tables: point_iou [G, G] and box_iou [P, P] (`data/mask_tables.py`)."""
  mask_tables.check_grid(point_grid_size, box_bins)
  frame = segmenters.check_image(frame)
  h, w = frame.shape[:2]
  scale = np.asarray([w, h], np.float64)
  segmenter.set_image(frame)  # The expensive part, once per frame.
  point_iou, box_iou = segmenter.prompt_ious(
    gt_mask,
    points=mask_tables.point_grid(point_grid_size) * scale,
    boxes=mask_tables.box_grid(box_bins) * np.tile(scale, 2),
  )
  p = mask_tables.num_pairs(box_bins)
  return (
    mask_tables.to_uint8(point_iou).reshape(point_grid_size, point_grid_size),
    mask_tables.to_uint8(box_iou).reshape(p, p),
  )


def sample_tables(
  segmenter: segmenters.Segmenter,
  frames: np.ndarray,
  masks: np.ndarray,
  point_grid_size: int,
  box_bins: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Tables of a sample's frames uint8 [F, H, W, 3] against GT masks bool [F, H, W].

  Returns:
    point_iou uint8 [F, G, G] and box_iou uint8 [F, P, P].
  """
  if len(frames) != len(masks):
    raise ValueError(f"{len(frames)} frames but {len(masks)} masks.")
  tables = [frame_tables(segmenter, f, m, point_grid_size, box_bins) for f, m in zip(frames, masks)]
  return np.stack([t[0] for t in tables]), np.stack([t[1] for t in tables])


# ----------------------------------------------------------------------------
# Building a split.
# ----------------------------------------------------------------------------


def build_split(
  okvos_dir: str | os.PathLike,
  split: str,
  cache_dir: str | os.PathLike,
  segmenter: segmenters.Segmenter,
  *,
  point_grid_size: int,
  box_bins: int,
  num_frames: int,
  seed: int,
  on_error: str = "skip",
  progress: bool = True,
  log=print,
  stream_samples: int | None = None,
  shards: int = 1,
) -> dict[str, Any]:
  """Builds (or completes) the cache of one split; `data/mask_tables.py` has the format.

  Samples are read with `okvos.OkvosDataSource` with the same `num_frames` and `seed`
  as the training pipeline, so the frames match (the train split's anchor frame is
  seeded per sample).

  Args:
    okvos_dir: the raw OK-VOS folder.
    split: the split to build.
    cache_dir: the cache root; files go to `{cache_dir}/{split}/`.
    segmenter: any `segmenters.Segmenter`.
    point_grid_size, box_bins: G and K.
    num_frames, seed: the pipeline's frame sampling.
    on_error: "skip" (count) or "raise" for broken samples.
    progress: show a tqdm bar.
    log: where the size estimate and the summary go.
    stream_samples: only the samples a training stream (`pipeline.stream_order`,
      shuffled with `seed`) reads in its first `stream_samples` positions, broken
      samples not counted (the stream drops them and reads on); None = every sample.
    shards: the processes the stream is dealt to; each broken sample moves its
      process's reads, so the walk goes `shards - 1` positions further for each.

  Returns:
    A summary: samples, built, skipped (up to date), broken, frames, seconds,
    seconds_per_frame, bytes_per_sample, cache_dir, covered (the samples the build
    went through).
  """
  mask_tables.check_grid(point_grid_size, box_bins)
  source = okvos.OkvosDataSource(
    okvos_dir, split, num_frames=num_frames, seed=seed, on_error=on_error
  )
  out_dir = mask_tables.split_dir(cache_dir, split)
  out_dir.mkdir(parents=True, exist_ok=True)
  per_sample = mask_tables.bytes_per_sample(num_frames, point_grid_size, box_bins)
  log(
    f"mask cache {split}: {len(source)} samples x {per_sample / 1e3:.1f} KB "
    f"(G={point_grid_size}, K={box_bins}, {num_frames} frames) ~ "
    f"{len(source) * per_sample / 1e6:.1f} MB at most, segmenter {segmenter.name}, in {out_dir}"
  )
  manifest = {
    "format": mask_tables.FORMAT_VERSION,
    "point_grid": point_grid_size,
    "box_bins": box_bins,
    "segmenter": segmenter.name,
    "num_frames": num_frames,
    "seed": seed,
    "layout": "point_iou [F, G, G] rows=y; box_iou [F, P, P] (x pair, y pair), P = K(K-1)/2",
  }
  (out_dir / mask_tables.MANIFEST).write_text(json.dumps(manifest, indent=1))

  built = skipped = frames = 0
  build_seconds = 0.0
  covered: set[int] = set()

  def cover(index: int) -> bool:
    """Makes sure sample `index` has its file; False when the sample is broken."""
    nonlocal built, skipped, frames, build_seconds
    covered.add(index)
    sid = okvos.sample_id(source.rows[index], split, index)
    path = mask_tables.entry_path(cache_dir, split, sid)
    if path.is_file() and mask_tables.entry_matches(
      path, point_grid_size, box_bins, segmenter.name
    ):
      skipped += 1
      return True
    example = source[index]
    if example is None:  # Broken sample, counted in source.errors.
      return False
    start = time.perf_counter()
    point_iou, box_iou = sample_tables(
      segmenter, example["frames"], example["masks"], point_grid_size, box_bins
    )
    build_seconds += time.perf_counter() - start
    mask_tables.write_entry(
      path,
      sample_id=sid,
      frame_numbers=example["frame_numbers"],
      point_iou=point_iou,
      box_iou=box_iou,
      segmenter_name=segmenter.name,
    )
    built += 1
    frames += len(example["frame_numbers"])
    return True

  bar = None
  if progress:
    from tqdm import tqdm

    total = len(source) if stream_samples is None else stream_samples
    bar = tqdm(total=total, desc=f"mask cache {split}", unit="sample")
  if stream_samples is None:
    for index in range(len(source)):
      cover(index)
      if bar is not None:
        bar.update()
  else:
    # Walk the stream: a position counts once its sample has a file; a broken
    # sample's positions do not (the stream skips them).
    order, good, broken = pipeline.stream_order(len(source), seed), 0, set()
    for position in itertools.count():
      if good >= stream_samples + len(broken) * (shards - 1) or len(broken) == len(source):
        break
      index = int(order[position])
      if index in broken:
        continue
      if index not in covered and not cover(index):
        broken.add(index)
        continue
      good += 1
      if bar is not None:
        bar.update()
  if bar is not None:
    bar.close()
  summary = {
    "cache_dir": str(cache_dir),
    "samples": len(source),
    "built": built,
    "skipped": skipped,
    "broken": len(source.errors),
    "frames": frames,
    "seconds": build_seconds,
    "seconds_per_frame": build_seconds / frames if frames else 0.0,
    "bytes_per_sample": per_sample,
    "covered": len(covered),
  }
  scope = (
    ""
    if stream_samples is None
    else (f" (the {len(covered)} that the stream's first {stream_samples} positions read)")
  )
  log(
    f"mask cache {split}: built {built}, up to date {skipped}, broken {len(source.errors)} "
    f"of {len(source)} samples{scope}; {frames} frames at "
    f"{summary['seconds_per_frame'] * 1e3:.1f} ms/frame"
  )
  return summary


def build(
  config, split: str | None = None, *, progress: bool = True, stream_samples: int | None = None
) -> str:
  """Builds (or completes) the cache of `split` from a run config and returns the cache root.

  Reads config.data (source, okvos_dir, synthetic_dir, num_frames, train_split, on_error),
  config.workdir, config.seed and config.mask_cache (segmenter, sam2_config,
  sam2_checkpoint, point_grid, box_bins, dir). The root is what `mask_tables.load_entry`
  and the data pipeline's `mask_cache_dir` take; the split's files are in `{root}/{split}/`.

  Args:
    config: the run config.
    split: the split; default `config.data.train_split`.
    progress: show a progress bar.
    stream_samples: only what the first `stream_samples` positions of the training
      stream read (`build_split`); None = the whole split.
  """
  import jax  # Only for the process count.

  split = split or config.data.train_split
  okvos_dir, _ = pipeline.resolve_data(config.data, config.workdir, config.seed)
  root = mask_tables.default_cache_dir(okvos_dir, config.mask_cache.dir)
  mc = config.mask_cache
  segmenter = segmenters.make_segmenter(
    mc.segmenter,
    sam2_config=mc.sam2_config,
    sam2_checkpoint=mc.sam2_checkpoint or None,
    config_prefix="mask_cache",
  )
  build_split(
    okvos_dir,
    split,
    root,
    segmenter,
    point_grid_size=mc.point_grid,
    box_bins=mc.box_bins,
    num_frames=config.data.num_frames,
    seed=config.seed,
    on_error=config.data.on_error,
    progress=progress,
    stream_samples=stream_samples,
    shards=jax.process_count(),
  )
  return os.path.abspath(root)
