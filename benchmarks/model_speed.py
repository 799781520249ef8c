"""Policy speed on CPU: our jitted Flax model vs transformers PyTorch (its default SDPA).

    python benchmarks/model_speed.py [--presets mid,mid_qwen2_5] [--batch 4] [--frames 6] [--size 448]

Same random weights on both sides (exported through our safetensors writer and
loaded by transformers), torch on as many threads as XLA uses. Prints, per model
family, prefill tokens/s (vision tower + prompt, logits of the last position),
greedy decode tokens/s and the number of XLA compilations over repeated calls.
Our decoding is `decoding.greedy_decode` timed on its own from a prefilled cache
(checked token for token against `greedy_generate`); transformers' is
`generate` of N tokens minus `generate` of 1 token (the same prefill cancels out).
Both sides take turns and each figure is the best of `--repeats`, so that load
from other processes on the machine hits them alike. A second table puts our decode
step against the memory floor and against its matrix products alone
(`decode_floor.py`), next to the step time that 3x transformers would need.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import decode_floor  # benchmarks/ is on sys.path when this file runs
import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax.models import config as config_lib
from segresearch_jax.models import decoding, policy, weights

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
  lambda name, *a, **k: (
    _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
  )
)


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--presets", default="mid,mid_qwen2_5")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--frames", type=int, default=6)
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--text", type=int, default=200)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3, help="best of this many, alternating")
  parser.add_argument(
    "--torch_threads", type=int, default=0, help="0 = as many as the CPU cores JAX uses"
  )
  args = parser.parse_args()

  import torch
  import transformers

  # The same cores for both sides: XLA:CPU uses every core of the process.
  torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
  print(f"torch threads {torch.get_num_threads()}, cores {len(os.sched_getaffinity(0))}")
  table, floors = [], []
  for preset in args.presets.split(","):
    rows, floor = bench(preset, args, torch, transformers)
    table += rows
    floors.append(floor)
  print(
    f"\n{'model':<13}{'metric':<24}{'ours (jax)':>12}{'transformers':>14}{'ratio':>8}{'goal':>7}"
    f"{'compiles':>10}"
  )
  for preset, name, ours, theirs, goal, compiles in table:
    print(
      f"{preset:<13}{name:<24}{ours:>12.1f}{theirs:>14.1f}{ours / theirs:>7.2f}x{goal:>6.1f}x"
      f"{compiles:>10}"
    )
  print("compiles = XLA compilations on the first call / over 3 further calls (goal: 1+ / 0)")
  bandwidth = decode_floor.read_bandwidth()
  print(
    f"\n{'model':<13}{'decode step ms':>15}{'memory floor':>14}{'ratio':>8}{'dots alone':>12}"
    f"{'ratio':>8}{'3x transformers':>17}"
  )
  for preset, step_s, hf_step_s, nbytes, dots_s in floors:
    floor_s = nbytes / bandwidth
    print(
      f"{preset:<13}{step_s * 1e3:>15.2f}{floor_s * 1e3:>14.2f}{step_s / floor_s:>7.2f}x"
      f"{dots_s * 1e3:>12.2f}{step_s / dots_s:>7.2f}x{hf_step_s / 3 * 1e3:>14.2f} ms"
    )
  print(
    f"memory floor = LM weights + KV cache read once at {bandwidth / 1e9:.1f} GB/s; dots alone = "
    "the step's matrix products chained and jitted, without norms, softmax or cache writes "
    "(decode_floor.py); 3x transformers = the step time the decode goal needs"
  )


def bench(preset, args, torch, transformers):
  """Rows (preset, metric, ours, theirs, goal, compiles) for one model preset, and
  (preset, our decode step s, transformers' step s, weight + KV bytes, dots-alone s)."""
  cfg = config_lib.get_preset(
    preset, image_token_id=100, vision_start_token_id=101, vision_end_token_id=102
  )
  params = policy.init_params(cfg, jax.random.PRNGKey(0))
  grid = (args.size // cfg.vision.patch_size,) * 2
  n_vis = grid[0] * grid[1] // 4
  rng = np.random.default_rng(0)
  row = []
  for _ in range(args.frames):
    row += list(rng.integers(200, 1000, 4)) + [101] + [100] * n_vis + [102]
  row += list(rng.integers(200, 1000, args.text))
  ids = np.array([row] * args.batch, np.int64)
  b, length = ids.shape
  pixels = rng.standard_normal((b * args.frames * grid[0] * grid[1], cfg.vision.patch_dim)).astype(
    np.float32
  )
  print(
    f"config {preset}: batch {b}, {length} tokens/row ({args.frames} frames of {args.size}px), "
    f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params, devices {jax.devices()}"
  )

  # --- Ours -----------------------------------------------------------------------------
  merged = (grid[0] // 2, grid[1] // 2)
  pos, next_pos = policy.rope_index(ids, np.ones_like(ids), [[merged] * args.frames] * b, 100)
  model = policy.Policy(cfg)
  patches = jnp.asarray(pixels).reshape(b * args.frames, grid[0] * grid[1], -1)

  def encode(params, patches):
    vis, ds = model.apply({"params": params}, patches, grid, method=policy.Policy.encode_images)
    per_row = args.frames * vis.shape[1]
    return vis.reshape(b, per_row, -1), ds.reshape(ds.shape[0], b, per_row, ds.shape[-1])

  @jax.jit
  def prefill_fn(params, patches, ids, pos):
    vis, ds = encode(params, patches)
    # Like transformers' logits_to_keep=1: the LM head only on the last position.
    hidden, _ = model.apply(
      {"params": params}, ids, pos, jnp.ones(ids.shape, bool), vis, ds, return_hidden=True
    )
    return model.apply({"params": params}, hidden[:, -1], method=policy.Policy.logits)

  @jax.jit
  def generate_fn(params, patches, ids, pos, next_pos):
    vis, ds = encode(params, patches)
    return decoding.greedy_generate(
      params,
      cfg,
      ids,
      pos,
      jnp.ones(ids.shape, bool),
      next_pos,
      vis,
      ds,
      max_new_tokens=args.new_tokens,
      cache_length=length + args.new_tokens,
    )

  # The decode loop of greedy_generate on its own, from a cache that holds the prompt:
  # timing it directly is steadier than subtracting two long runs on a loaded machine.
  @jax.jit
  def start_fn(params, patches, ids, pos):
    vis, ds = encode(params, patches)
    last = jnp.full((b,), length - 1, jnp.int32)
    logits, cache = decoding.prefill_prompt(
      params,
      cfg,
      length + args.new_tokens,
      ids,
      pos,
      jnp.ones(ids.shape, bool),
      vis,
      ds,
      logits_at=last,
    )
    return jnp.argmax(logits, axis=-1), cache

  @jax.jit
  def decode_fn(params, cache, first, next_pos):
    return decoding.greedy_decode(params, cfg, cache, first, next_pos, steps=args.new_tokens - 1)

  jargs = (params, patches, jnp.asarray(ids, jnp.int32), jnp.asarray(pos), jnp.asarray(next_pos))
  n0 = len(_COMPILES)
  prefill_fn(*jargs[:4]).block_until_ready()
  compiles = {"prefill": len(_COMPILES) - n0}
  n0 = len(_COMPILES)
  first, cache = start_fn(*jargs[:4])
  tokens = np.asarray(decode_fn(params, cache, first, jargs[4]))
  compiles["decode"] = len(_COMPILES) - n0
  # The split program decodes exactly what greedy_generate does.
  np.testing.assert_array_equal(tokens, np.asarray(generate_fn(*jargs))[:, 1:])
  ours = {
    "prefill": lambda: prefill_fn(*jargs[:4]).block_until_ready(),
    "decode": lambda: decode_fn(params, cache, first, jargs[4]).block_until_ready(),
  }

  # --- transformers, same weights ----------------------------------------------------------
  with tempfile.TemporaryDirectory() as tmp:
    weights.save_hf_checkpoint(params, cfg, tmp)
    hf_cls = getattr(transformers, config_lib.to_hf_config(cfg)["architectures"][0])
    hf = hf_cls.from_pretrained(tmp, dtype=torch.float32).eval()
  hf_inputs = dict(
    input_ids=torch.tensor(ids),
    attention_mask=torch.ones(ids.shape, dtype=torch.long),
    pixel_values=torch.tensor(pixels),
    image_grid_thw=torch.tensor([[1, *grid]] * (b * args.frames)),
    mm_token_type_ids=torch.tensor((ids == 100).astype(np.int64)),
  )

  def hf_generate(n):
    return lambda: hf.generate(**hf_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

  theirs = {
    "prefill": lambda: hf(**hf_inputs, logits_to_keep=1),
    "generate": hf_generate(args.new_tokens),
    "first": hf_generate(1),
  }
  # Both sides take turns, so that load from other processes hits them alike; each
  # figure is the best of `repeats`. transformers' decoding is generate(N) minus
  # generate(1) (the same vision + prompt prefill and first token).
  best = {}
  with torch.no_grad():
    theirs["prefill"]()  # warm-up
    for _ in range(args.repeats):
      for side, fns in (("ours", ours), ("theirs", theirs)):
        for name, fn in fns.items():
          t = _timed(fn, 1)
          best[side, name] = min(best.get((side, name), t), t)

  # Repeated calls must hit the compilation cache.
  n0 = len(_COMPILES)
  for _ in range(3):
    for fn in ours.values():
      fn()
    start_fn(*jargs[:4])
  recompiles = len(_COMPILES) - n0

  prefill_tokens = b * length
  decode_tokens = b * (args.new_tokens - 1)  # tokens produced by decode steps
  decode_s = {
    "ours": best["ours", "decode"],
    "theirs": best["theirs", "generate"] - best["theirs", "first"],
  }
  steps = args.new_tokens - 1
  cache_len = length + args.new_tokens
  floor = (
    preset,
    decode_s["ours"] / steps,
    decode_s["theirs"] / steps,
    decode_floor.text_bytes(params) + decode_floor.kv_bytes(cfg, b, cache_len),
    decode_floor.dots_alone_s(params, cfg, b, cache_len),
  )
  rows = [
    (
      preset,
      "prefill tokens/s",
      prefill_tokens / best["ours", "prefill"],
      prefill_tokens / best["theirs", "prefill"],
      1.0,
      f"{compiles['prefill']}/{recompiles}",
    ),
    (
      preset,
      "greedy decode tokens/s",
      decode_tokens / max(decode_s["ours"], 1e-9),
      decode_tokens / max(decode_s["theirs"], 1e-9),
      3.0,
      f"{compiles['decode']}/{recompiles}",
    ),
  ]
  return rows, floor


if __name__ == "__main__":
  main()
