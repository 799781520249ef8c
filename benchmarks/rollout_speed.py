"""Rollout decode speed: the jitted episode loop vs transformers `generate`.

    python benchmarks/rollout_speed.py [--preset mid] [--batch 32] [--frames 6] [--size 224]

Same model, weights and prompts on both sides. Rows sample until `--new_tokens`
(no stop pattern can fire, so no host call interrupts the measurement). Prints decode
tokens/s and its ratio to transformers, the decode step time against the memory
bandwidth floor (parameter + KV-cache bytes per step over the measured copy
bandwidth), and the XLA compilations over 5 batches.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax.agent import rollout
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy, weights

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
  lambda name, *a, **k: (
    _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
  )
)


def copy_bandwidth() -> float:
  """Bytes/s of a jitted elementwise pass over 256 MB (read + write counted)."""
  x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  f(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    f(x).block_until_ready()
  return 2 * x.nbytes * 5 / (time.perf_counter() - t0)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="mid")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--frames", type=int, default=6)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--new_tokens", type=int, default=48)
  args = parser.parse_args()
  import torch
  import transformers

  cfg = config_lib.get_preset(
    args.preset, image_token_id=100, vision_start_token_id=101, vision_end_token_id=102
  )
  params = policy.init_params(cfg, jax.random.PRNGKey(0))
  m = cfg.vision.spatial_merge_size
  grid = (args.size // cfg.vision.patch_size,) * 2
  merged = (grid[0] // m, grid[1] // m)
  n_patch = grid[0] * grid[1]
  rng = np.random.default_rng(0)
  row = []
  for _ in range(args.frames):
    row += list(rng.integers(200, 1000, 4)) + [101] + [100] * (n_patch // m**2) + [102]
  row += list(rng.integers(200, 1000, 40))
  b = args.batch
  ids = np.array([row] * b)
  pos, next_pos = policy.rope_index(ids, np.ones_like(ids), [[merged] * args.frames] * b, 100)
  pd = cfg.vision.patch_dim
  frames = rng.standard_normal((b, args.frames, n_patch, pd)).astype(np.float32)

  rcfg = rollout.RolloutConfig(
    group_size=1,
    max_turns=1,
    max_response_length=args.new_tokens,
    max_action_length=args.new_tokens + 1,
    max_obs_length=8,
    temperature=1.0,
    im_end_id=-5,  # never sampled: every row decodes exactly new_tokens tokens
    frame_grid=merged,
    keyframe_grid=(1, 1),
    search_grid=(1, 2),
  )
  never = np.full((1, 1), cfg.text.vocab_size + 7, np.int32)  # no sampled token equals it

  def host_fn(pending, actions, act_len):  # never reached: no pattern can match
    raise RuntimeError("unexpected host call")

  fn = rollout.make_rollout_fn(cfg, rcfg, never, host_fn, (2 * m * m, pd))

  def batch_for(seed):
    r = np.random.default_rng(seed)
    return dict(
      prompt_ids=jnp.asarray(ids, jnp.int32),
      prompt_valid=jnp.ones(ids.shape, bool),
      prompt_positions=jnp.asarray(pos),
      next_pos=jnp.asarray(next_pos),
      frame_patches=jnp.asarray(r.standard_normal(frames.shape), jnp.float32),
      keyframe_patches=jnp.zeros((b, args.frames, m * m, pd), jnp.float32),
    )

  model = policy.Policy(cfg)

  @jax.jit
  def prefill_only(params, batch):
    f = batch["frame_patches"]
    tok, ds = model.apply(
      {"params": params},
      f.reshape(b * args.frames, n_patch, pd),
      grid,
      method=policy.Policy.encode_images,
    )
    cache = policy.init_cache(cfg, b, ids.shape[1] + 2 * args.new_tokens + 10)
    logits, cache = model.apply(
      {"params": params},
      batch["prompt_ids"],
      batch["prompt_positions"],
      batch["prompt_valid"],
      tok.reshape(b, -1, tok.shape[-1]),
      ds.reshape(ds.shape[0], b, -1, ds.shape[-1]),
      cache,
    )
    return logits[:, -1]

  batch = batch_for(0)
  n0 = len(_COMPILES)
  out = fn(params, batch, jax.random.PRNGKey(0))
  jax.block_until_ready(out)
  assert int(out["response_length"].min()) == args.new_tokens
  compiles_first = len(_COMPILES) - n0
  n0 = len(_COMPILES)
  times = []
  for seed in range(1, 5):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, batch_for(seed), jax.random.PRNGKey(seed)))
    times.append(time.perf_counter() - t0)
  compiles_rollout = len(_COMPILES) - n0
  prefill_only(params, batch).block_until_ready()
  t0 = time.perf_counter()
  prefill_only(params, batch).block_until_ready()
  t_prefill = time.perf_counter() - t0
  ours_decode_s = max(min(times) - t_prefill, 1e-9)
  decode_tokens = b * (args.new_tokens - 1)

  with tempfile.TemporaryDirectory() as tmp:
    weights.save_hf_checkpoint(params, cfg, tmp)
    hf_cls = getattr(transformers, config_lib.to_hf_config(cfg)["architectures"][0])
    hf = hf_cls.from_pretrained(tmp, dtype=torch.float32).eval()
  hf_inputs = dict(
    input_ids=torch.tensor(ids),
    attention_mask=torch.ones(ids.shape, dtype=torch.long),
    pixel_values=torch.tensor(frames.reshape(-1, pd)),
    image_grid_thw=torch.tensor([[1, *grid]] * (b * args.frames)),
    mm_token_type_ids=torch.tensor((ids == 100).astype(np.int64)),
  )
  with torch.no_grad():
    t0 = time.perf_counter()
    hf(**hf_inputs, logits_to_keep=1)
    hf_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.generate(
      **hf_inputs,
      max_new_tokens=args.new_tokens,
      min_new_tokens=args.new_tokens,
      do_sample=True,
      top_p=1.0,
      top_k=0,
    )
    hf_decode_s = max(time.perf_counter() - t0 - hf_prefill, 1e-9)

  # Memory-bandwidth floor of one decode step: every parameter and the KV cache read once.
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  t = cfg.text
  cache_len = ids.shape[1] + args.new_tokens + 10
  kv_bytes = 2 * t.num_layers * b * cache_len * t.num_kv_heads * t.head_dim * 4
  bandwidth = copy_bandwidth()
  floor_s = (param_bytes + kv_bytes) / bandwidth
  step_s = ours_decode_s / (args.new_tokens - 1)

  ours_tps, hf_tps = decode_tokens / ours_decode_s, decode_tokens / hf_decode_s
  print(
    f"\n{args.preset}: batch {b}, prompt {ids.shape[1]} tokens ({args.frames} frames of "
    f"{args.size}px), {args.new_tokens} sampled tokens per row, device {jax.devices()[0]}"
  )
  print(f"{'metric':<34}{'ours (jax)':>12}{'baseline':>14}{'ratio':>9}{'goal':>8}")
  print(
    f"{'decode tokens/s vs HF generate':<34}{ours_tps:>12.1f}{hf_tps:>14.1f}"
    f"{ours_tps / hf_tps:>8.2f}x{'>=3.0x':>8}"
  )
  print(
    f"{'decode step ms vs bandwidth floor':<34}{step_s * 1e3:>12.2f}{floor_s * 1e3:>14.2f}"
    f"{step_s / floor_s:>8.2f}x{'->1x':>8}"
  )
  print(
    f"{'XLA compilations, batch 1 / 2-5':<34}{compiles_first:>10d}/{compiles_rollout}"
    f"{'':>14}{'':>9}{'n/0':>8}"
  )
  print(
    f"(copy bandwidth {bandwidth / 1e9:.1f} GB/s; params {param_bytes / 1e6:.0f} MB, "
    f"KV cache {kv_bytes / 1e6:.0f} MB)"
  )


if __name__ == "__main__":
  main()
