"""Rollout decode speed: the jitted episode loop vs transformers `generate`.

    python benchmarks/rollout_speed.py [--preset mid] [--batch 32] [--frames 6] [--size 224]

Same model, weights and prompts on both sides. Rows sample until `--new_tokens`
(no stop pattern can fire, so no host call interrupts the measurement). Prints decode
tokens/s and its ratio to transformers, the decode step time against the memory
bandwidth floor (parameter + KV-cache bytes per step over the measured copy
bandwidth), and the XLA compilations over 5 batches.

`--episodes` adds whole episodes with tool use: the embedded policy and tokenizer
on a synthetic OK-VOS knowledge base (dense retrieval with the packaged MiniLM),
every row scripted to search once and pick a keyframe, through the real bridge;
episodes/s with the search cache cold (new file) and then warm.
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
from segresearch_jax.models import decoding, policy, weights

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
  parser.add_argument("--episodes", action="store_true", help="also time episodes with search")
  args = parser.parse_args()
  if args.episodes:
    episodes(args.batch)
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
    logits, _ = decoding.prefill(
      params,
      cfg,
      cache,
      batch["prompt_ids"],
      batch["prompt_positions"],
      batch["prompt_valid"],
      tok.reshape(b, -1, tok.shape[-1]),
      ds.reshape(ds.shape[0], b, -1, ds.shape[-1]),
      logits_at=jnp.full((b,), ids.shape[1] - 1, jnp.int32),
    )
    return logits

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


def episodes(batch_size: int) -> None:
  """Episodes/s with real search through the bridge, search cache cold then warm."""
  from segresearch_jax.agent import bridge as bridge_lib
  from segresearch_jax.agent import protocol
  from segresearch_jax.data import synthetic
  from segresearch_jax.models import processor
  from segresearch_jax.models import tokenizer as tokenizer_lib
  from segresearch_jax.search import factory

  tok = tokenizer_lib.embedded_tokenizer()
  cfg = config_lib.get_preset(
    "embedded",
    image_token_id=tok.image_pad_id,
    vision_start_token_id=tok.vision_start_id,
    vision_end_token_id=tok.vision_end_id,
  )
  cfg = config_lib.with_vocab(cfg, tok.vocab_size)
  params = policy.init_params(cfg, jax.random.PRNGKey(0))
  small = processor.dataclasses.replace(processor.QWEN3_VL, min_pixels=0)
  frame_grid, key_grid, search_grid = (4, 4), (4, 4), (2, 2)
  with tempfile.TemporaryDirectory() as tmp:
    paths = synthetic.build(tmp + "/syn", seed=0, num_train=8, num_test=8)
    rcfg = rollout.RolloutConfig(
      group_size=1,
      max_turns=2,
      max_response_length=384,
      max_action_length=96,
      max_obs_length=256,
      temperature=1.0,
      im_end_id=tok.im_end_id,
      frame_grid=frame_grid,
      keyframe_grid=key_grid,
      search_grid=search_grid,
      banned_ids=(tok.image_pad_id, tok.vision_start_id, tok.vision_end_id),
    )
    frame_numbers = [0, 5, 10]
    text = protocol.chat_prompt(
      protocol.system_prompt("one-hop"), protocol.user_content(frame_numbers, "q")
    )
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in frame_numbers]
    enc = processor.encode_prompt(text, frames, tok, small, (128, 128))
    ids = np.repeat(enc["input_ids"][None], batch_size, 0)
    pos, next_pos = policy.rope_index(
      ids, np.ones_like(ids), [[frame_grid] * 3] * batch_size, cfg.image_token_id
    )
    words = ["Cup", "winner", "Institute", "founder", "team", "emblem", "Prize", "coach"]
    scripts = [
      tok.encode(
        f'<thinking> q </thinking> <search> {{"name": "text_search", "query": '
        f'"{words[i % 8]} {words[(i * 3 + 1) % 8]} {i}"}} </search>'
        "<thinking> k </thinking> <keyframe> 5 </keyframe><thinking> a </thinking> "
        '<answer> {"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]} </answer><|im_end|>'
      )
      for i in range(batch_size)
    ]
    width = max(map(len, scripts))
    forced = np.full((batch_size, width), -1, np.int32)
    for i, sc in enumerate(scripts):
      forced[i, : len(sc)] = sc
    pixels = jnp.asarray(enc["pixel_values"]).reshape(1, 3, 64, -1)
    batch = dict(
      prompt_ids=jnp.asarray(ids),
      prompt_valid=jnp.ones(ids.shape, bool),
      prompt_positions=jnp.asarray(pos),
      next_pos=jnp.asarray(next_pos),
      frame_patches=jnp.repeat(pixels, batch_size, 0),
      keyframe_patches=jnp.repeat(pixels, batch_size, 0),
      forced_tokens=jnp.asarray(forced),
    )
    search_cfg = {
      "backend": "local",
      "text_corpus": paths.text_corpus,
      "image_corpus": paths.image_corpus,
      "images_dir": paths.kb_dir + "/images",
      "method": "dense",
      "cache_path": tmp + "/search_cache.sqlite",
      "cache_mode": "read_write",
    }

    def host_for(cache_path):
      backend = factory.make_backend({**search_cfg, "cache_path": cache_path})
      br = bridge_lib.SearchBridge(
        backend,
        tok,
        max_obs_length=256,
        keyframe_image_tokens=16,
        search_image_tokens=4,
        search_image_size=64,
        pad_id=tok.pad_id,
      )
      br.set_shown_frames([frame_numbers] * batch_size)
      return br, rollout.bridge_host_fn(br, small, 64)

    current = {}
    fn = rollout.make_rollout_fn(
      cfg,
      rcfg,
      rollout.stop_patterns(tok, ["</search>", "</keyframe>"]),
      lambda *a: current["fn"](*a),
      (16, cfg.vision.patch_dim),
    )
    _, current["fn"] = host_for(tmp + "/warmup.sqlite")  # compile with a throwaway cache
    jax.block_until_ready(fn(params, batch, jax.random.PRNGKey(0)))
    rows = []
    for phase in ("cold", "cached"):
      br, current["fn"] = host_for(search_cfg["cache_path"])
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(params, batch, jax.random.PRNGKey(1)))
      dt = time.perf_counter() - t0
      assert int(np.min(out["num_turns"])) == 2, "every scripted row searches and picks a keyframe"
      lat = sorted(r.latency_s for r in br.pop_records() if r.action == "search")
      rows.append((phase, batch_size / dt, 1e3 * lat[len(lat) // 2], 1e3 * lat[-1]))
  print(
    f"\nepisodes: embedded policy, batch {batch_size}, one text_search + keyframe + answer each, "
    "dense KB"
  )
  print(f"{'search cache':<14}{'episodes/s':>12}{'search p50 ms':>15}{'search max ms':>15}")
  for phase, eps, p50, pmax in rows:
    print(f"{phase:<14}{eps:>12.2f}{p50:>15.1f}{pmax:>15.1f}")


if __name__ == "__main__":
  main()
