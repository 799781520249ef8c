"""Checks a converted checkpoint: same logits from transformers and from our Flax model.

    python -m segresearch_jax.tools.check_hf_parity --hf_dir /path/to/Qwen3-VL-4B-Instruct

Loads the directory with transformers (PyTorch, fp32 by default) and with
`weights.load_hf_checkpoint`, runs one random image between two runs of random text
through both, prints the max |delta logits| and exits non-zero above the tolerance.
Run it on every checkpoint you convert or export; `--scan_layers` and `--remat`
check the stacked (scanned) layout and rematerialised layers the same way.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from segresearch_jax.models import policy, weights


def compare(
  hf_dir: str,
  *,
  grid: tuple[int, int] = (8, 8),
  text_tokens: int = 16,
  seed: int = 0,
  dtype: str = "float32",
  scan_layers: bool = False,
  remat: str = "none",
) -> float:
  """Max |logits_hf - logits_flax| on one random image + text input."""
  import torch
  import transformers

  # The layout under test; `Policy(cfg, dtype)` below sets the compute dtype itself.
  compute = {"dtype": "float32", "remat": remat, "scan_layers": scan_layers, "attention": "auto"}
  cfg, params = weights.load_hf_checkpoint(hf_dir, jnp.dtype(dtype), run_model=compute)
  torch_dtype = getattr(torch, dtype)
  hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch_dtype).eval()

  rng = np.random.default_rng(seed)
  n_visual = grid[0] * grid[1] // cfg.vision.spatial_merge_size**2
  special = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
  vocab = np.array([t for t in range(min(cfg.text.vocab_size, 50_000)) if t not in special])
  left, right = (
    rng.choice(vocab, text_tokens // 2),
    rng.choice(vocab, text_tokens - text_tokens // 2),
  )
  ids = np.concatenate(
    [
      left,
      [cfg.vision_start_token_id],
      np.full(n_visual, cfg.image_token_id),
      [cfg.vision_end_token_id],
      right,
    ]
  )[None].astype(np.int64)
  pixels = rng.standard_normal((grid[0] * grid[1], cfg.vision.patch_dim)).astype(np.float32)

  with torch.no_grad():
    expected = (
      hf(
        input_ids=torch.tensor(ids),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
        pixel_values=torch.tensor(pixels, dtype=torch_dtype),
        image_grid_thw=torch.tensor([[1, *grid]]),
        mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)),
      )
      .logits.float()
      .numpy()
    )

  model = policy.Policy(cfg, jnp.dtype(dtype))
  visual, deepstack = model.apply(
    {"params": params}, jnp.asarray(pixels)[None], grid, method=policy.Policy.encode_images
  )
  merged = (grid[0] // cfg.vision.spatial_merge_size, grid[1] // cfg.vision.spatial_merge_size)
  pos, _ = policy.rope_index(ids, np.ones_like(ids), [[merged]], cfg.image_token_id)
  logits, _ = model.apply(
    {"params": params},
    jnp.asarray(ids, jnp.int32),
    jnp.asarray(pos),
    jnp.ones(ids.shape, bool),
    visual,
    deepstack,
  )
  return float(np.abs(np.asarray(logits, np.float32) - expected).max())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hf_dir", required=True, help="local HF checkpoint directory")
  parser.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |delta logits|")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--scan_layers", action="store_true", help="stacked decoder layers")
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  args = parser.parse_args(argv)
  diff = compare(
    args.hf_dir, seed=args.seed, dtype=args.dtype, scan_layers=args.scan_layers, remat=args.remat
  )
  ok = diff <= args.tolerance
  print(
    f"max |delta logits| = {diff:.3e}  (tolerance {args.tolerance:.1e})  {'OK' if ok else 'FAIL'}"
  )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
