r"""Builds the mask-IoU cache the mask reward reads (docs/method.md §3.2).

    python -m segresearch_jax.tools.build_mask_cache --config=configs/okvos.py \
        [--split=train] [--config.mask_cache.segmenter=sam2 \
         --config.mask_cache.sam2_checkpoint=/ckpt/sam2.1_hiera_large.pt]

For every sample of the split and each of its shown frames (sampled exactly as the
training pipeline samples them: same `data.num_frames`, same `seed`), the configured
segmenter is prompted with a G x G point grid and all K-bin boxes, and each mask's IoU
with the GT mask is stored (`segmentation/mask_cache.py` has the format). Output goes
to `{okvos_dir}/mask_cache/{split}/` unless `mask_cache.dir` is set. The build is
resumable: rerun it after an interruption and finished samples are skipped.

Reads config.data (source, okvos_dir, synthetic_dir, num_frames, train_split), config.workdir,
config.seed and config.mask_cache (segmenter, sam2_config, sam2_checkpoint, point_grid,
box_bins, dir).
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from segresearch_jax.data import pipeline
from segresearch_jax.segmentation import mask_cache, segmenters


def _define_flags() -> None:
  """Flags of the command line only: the trainer imports `build` under its own --config."""
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
  flags.DEFINE_string("split", None, "Split to build; default config.data.train_split.")


def build(config, split: str | None = None, *, progress: bool = True) -> str:
  """Builds (or completes) the cache of `split` and returns the cache root.

  The root is what `mask_cache.load_entry` and the data pipeline's `mask_cache_dir`
  take; the split's files are in `{root}/{split}/`.

  Args:
    config: the run config (see the module doc for the fields read).
    split: the split; default `config.data.train_split`.
    progress: show a progress bar.
  """
  split = split or config.data.train_split
  okvos_dir, _ = pipeline.resolve_data(config.data, config.workdir, config.seed)
  root = mask_cache.default_cache_dir(okvos_dir, config.mask_cache.dir)
  mc = config.mask_cache
  segmenter = segmenters.make_segmenter(
    mc.segmenter,
    sam2_config=mc.sam2_config,
    sam2_checkpoint=mc.sam2_checkpoint or None,
    config_prefix="mask_cache",
  )
  mask_cache.build_split(
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
  )
  return os.path.abspath(root)


def main(argv) -> None:
  del argv
  if flags.FLAGS.config is None:
    raise app.UsageError("Pass --config=configs/okvos.py (and any --config.x=... overrides).")
  build(flags.FLAGS.config, flags.FLAGS.split)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
