r"""Builds the mask-IoU cache the mask reward reads (docs/method.md §3.2).

    python -m segresearch_jax.tools.build_mask_cache --config=configs/okvos.py \
        [--split=train] [--config.mask_cache.segmenter=sam2 \
         --config.mask_cache.sam2_checkpoint=/ckpt/sam2.1_hiera_large.pt]

For every sample of the split and each of its shown frames (sampled exactly as the
training pipeline samples them: same `data.num_frames`, same `seed`), the configured
segmenter is prompted with a G x G point grid and all K-bin boxes, and each mask's IoU
with the GT mask is stored (`data/mask_tables.py` has the format). The build itself is
`segmentation/mask_cache.build`; this is its command line. Output goes
to `{okvos_dir}/mask_cache/{split}/` unless `mask_cache.dir` is set. The build is
resumable: rerun it after an interruption and finished samples are skipped.

Reads config.data (source, okvos_dir, synthetic_dir, num_frames, train_split), config.workdir,
config.seed and config.mask_cache (segmenter, sam2_config, sam2_checkpoint, point_grid,
box_bins, dir).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from segresearch_jax.segmentation import mask_cache


def _define_flags() -> None:
  """Flags of the command line only: the trainer calls `mask_cache.build` under its own --config."""
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
  flags.DEFINE_string("split", None, "Split to build; default config.data.train_split.")


def main(argv) -> None:
  del argv
  if flags.FLAGS.config is None:
    raise app.UsageError("Pass --config=configs/okvos.py (and any --config.x=... overrides).")
  mask_cache.build(flags.FLAGS.config, flags.FLAGS.split)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
