"""Rollout decode speed: the jitted episode loop vs transformers `generate`.

    python benchmarks/rollout_speed.py [--preset mid] [--batch 32] [--frames 6] [--size 224]

Same model, weights and prompts on both sides. Rows sample until `--new_tokens`
(no stop pattern can fire, so no host call interrupts the measurement). Decoding
time is a run to N tokens minus a run to 1 token (same vision encoding, prefill and
first sample), on both sides, alternating, best of `--repeats`. Prints decode
tokens/s and its ratio to transformers, the decode step time against the memory
floor (language-model weights + KV cache read once at the measured read bandwidth)
and against the matmul floor (its FLOPs at the measured rate of a [B, hidden] x
[hidden, intermediate] matmul) and against its matrix products alone
(`decode_floor.dots_alone_s`: what XLA's kernels take for them), and the XLA
compilations over 5 batches.

`--episodes` adds whole episodes with tool use: the embedded policy and tokenizer
on a synthetic OK-VOS knowledge base (dense retrieval with the packaged MiniLM),
every row scripted to search once and pick a keyframe, through the real bridge;
episodes/s with the search cache cold (new file) and then warm.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import decode_floor  # benchmarks/ is on sys.path when this file runs
import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax import notebook
from segresearch_jax.agent import rollout
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy, weights

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
  lambda name, *a, **k: (
    _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
  )
)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="mid")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--frames", type=int, default=6)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--new_tokens", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=3, help="best of this many, alternating")
  parser.add_argument("--episodes", action="store_true", help="also time episodes with search")
  args = parser.parse_args()
  if args.episodes:
    episodes(args.batch)
  import torch
  import transformers

  torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores XLA:CPU uses
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

  never = np.full((1, 1), cfg.text.vocab_size + 7, np.int32)  # no sampled token equals it

  def host_fn(pending, actions, act_len):  # never reached: no pattern can match
    raise RuntimeError("unexpected host call")

  sampling = notebook.load_config().rollout  # the default run's sampling settings

  def rollout_fn(new_tokens):
    rcfg = rollout.RolloutConfig(
      group_size=1,
      max_turns=1,
      max_response_length=new_tokens,
      max_action_length=new_tokens + 1,
      max_obs_length=8,
      temperature=1.0,
      top_p=sampling.top_p,
      top_k=sampling.top_k,
      im_end_id=-5,  # never sampled: every row decodes exactly new_tokens tokens
      frame_grid=merged,
      keyframe_grid=(1, 1),
      search_grid=(1, 2),
      banned_ids=(),
      observe_rows=sampling.observe_rows,
      max_episode_tokens=sampling.max_episode_tokens,
      slots=0,
    )
    return rollout.make_rollout_fn(cfg, rcfg, never, host_fn, (2 * m * m, pd))

  def batch_for(seed):
    r = np.random.default_rng(seed)
    return rollout.PromptBatch(
      prompt_ids=jnp.asarray(ids, jnp.int32),
      prompt_valid=jnp.ones(ids.shape, bool),
      prompt_positions=jnp.asarray(pos),
      next_pos=jnp.asarray(next_pos),
      frame_patches=jnp.asarray(r.standard_normal(frames.shape), jnp.float32),
      keyframe_patches=jnp.zeros((b, args.frames, m * m, pd), jnp.float32),
    )

  fns = {"full": rollout_fn(args.new_tokens), "first": rollout_fn(1)}
  batch = batch_for(0)
  n0 = len(_COMPILES)
  for fn in fns.values():
    out = jax.block_until_ready(fn(params, batch, jax.random.PRNGKey(0)))
  compiles_first = len(_COMPILES) - n0
  n0 = len(_COMPILES)
  times = []
  for seed in range(1, 5):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fns["full"](params, batch_for(seed), jax.random.PRNGKey(seed)))
    times.append(time.perf_counter() - t0)
  compiles_rollout = len(_COMPILES) - n0
  assert np.min(out.response_length) == args.new_tokens

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

  def hf_generate(n):
    return lambda: hf.generate(
      **hf_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_p=1.0, top_k=0
    )

  # Decoding = a run to N tokens minus a run to 1 token (the same vision + prompt
  # prefill and first sample); both sides take turns, best of `repeats` each.
  ours = {
    name: (lambda fn=fn: jax.block_until_ready(fn(params, batch, jax.random.PRNGKey(9))))
    for name, fn in fns.items()
  }
  theirs = {"full": hf_generate(args.new_tokens), "first": hf_generate(1)}
  best = {}
  with torch.no_grad():
    theirs["first"]()  # warm-up
    for _ in range(args.repeats):
      for name in ("full", "first"):
        for side, calls in (("ours", ours), ("theirs", theirs)):
          t0 = time.perf_counter()
          calls[name]()
          t = time.perf_counter() - t0
          best[side, name] = min(best.get((side, name), t), t)
  ours_decode_s = max(best["ours", "full"] - best["ours", "first"], 1e-9)
  hf_decode_s = max(best["theirs", "full"] - best["theirs", "first"], 1e-9)
  decode_tokens = b * (args.new_tokens - 1)

  # Memory floor of one decode step: the language model's weights (the tied
  # embedding is read whole by the LM head) and the KV cache, each read once.
  t = cfg.text
  cache_len = ids.shape[1] + 2 * args.new_tokens + 2  # prompt + the rollout's buffer
  weight_bytes = decode_floor.text_bytes(params)
  kv_bytes = decode_floor.kv_bytes(cfg, b, cache_len)
  bandwidth = decode_floor.read_bandwidth()
  floor_s = (weight_bytes + kv_bytes) / bandwidth
  step_s = ours_decode_s / (args.new_tokens - 1)
  # Compute floor: the matmul FLOPs of a step at this machine's measured matmul rate.
  step_flops = (
    2 * b * (weight_bytes // 4 - t.vocab_size * t.hidden_size * (not t.tie_word_embeddings))
  )
  gflops = decode_floor.matmul_rate(b, t.hidden_size, t.intermediate_size)
  dots_s = decode_floor.dots_alone_s(params, cfg, b, cache_len)
  hf_step_s = hf_decode_s / (args.new_tokens - 1)

  ours_tps, hf_tps = decode_tokens / ours_decode_s, decode_tokens / hf_decode_s
  print(
    f"\n{args.preset}: batch {b}, prompt {ids.shape[1]} tokens ({args.frames} frames of "
    f"{args.size}px), {args.new_tokens} sampled tokens per row, device {jax.devices()[0]}, "
    f"torch threads {torch.get_num_threads()}"
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
    f"{'decode step ms vs matmul floor':<34}{step_s * 1e3:>12.2f}"
    f"{step_flops / gflops * 1e3:>14.2f}{step_s / (step_flops / gflops):>8.2f}x{'':>8}"
  )
  print(
    f"{'decode step ms vs its dots alone':<34}{step_s * 1e3:>12.2f}{dots_s * 1e3:>14.2f}"
    f"{step_s / dots_s:>8.2f}x{'->1x':>8}"
  )
  print(
    f"{'XLA compilations, batch 1 / 2-5':<34}{compiles_first:>10d}/{compiles_rollout}"
    f"{'':>14}{'':>9}{'n/0':>8}"
  )
  print(
    f"(read bandwidth {bandwidth / 1e9:.1f} GB/s; LM weights {weight_bytes / 1e6:.0f} MB, "
    f"KV cache {kv_bytes / 1e6:.0f} MB; matmul {gflops / 1e9:.1f} GFLOP/s at "
    f"[{b}, {t.hidden_size}] x [{t.hidden_size}, {t.intermediate_size}]; compilations "
    f"counted over both programs (N tokens and 1 token) on batch 1)"
  )
  print(
    f"(dots alone = the step's matrix products chained and jitted without norms, softmax, "
    f"cache writes or sampling, see decode_floor.py; 3x transformers would need "
    f"{hf_step_s / 3 * 1e3:.1f} ms a step = {hf_step_s / 3 / dots_s:.2f}x the dots alone)"
  )


def episodes(batch_size: int) -> None:
  """Episodes/s with real search through the bridge, search cache cold then warm."""
  from segresearch_jax import protocol
  from segresearch_jax.agent import bridge as bridge_lib
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
    sampling = notebook.load_config().rollout  # the default run's sampling settings
    rcfg = rollout.RolloutConfig(
      group_size=1,
      max_turns=2,
      max_response_length=384,
      max_action_length=96,
      max_obs_length=256,
      temperature=1.0,
      top_p=sampling.top_p,
      top_k=sampling.top_k,
      im_end_id=tok.im_end_id,
      frame_grid=frame_grid,
      keyframe_grid=key_grid,
      search_grid=search_grid,
      banned_ids=(tok.image_pad_id, tok.vision_start_id, tok.vision_end_id),
      observe_rows=sampling.observe_rows,
      max_episode_tokens=sampling.max_episode_tokens,
      slots=0,
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
    batch = rollout.PromptBatch(
      prompt_ids=jnp.asarray(ids),
      prompt_valid=jnp.ones(ids.shape, bool),
      prompt_positions=jnp.asarray(pos),
      next_pos=jnp.asarray(next_pos),
      frame_patches=jnp.repeat(pixels, batch_size, 0),
      keyframe_patches=jnp.repeat(pixels, batch_size, 0),
      forced_tokens=jnp.asarray(forced),
    )
    search_cfg = {"cache_path": tmp + "/search_cache.sqlite"}
    settings = dataclasses.replace(
      factory.SearchConfig.from_config(notebook.load_config().search),
      backend="local",
      method="dense",
      cache_mode="read_write",
    )

    def host_for(cache_path):
      backend = factory.make_backend(
        settings,
        text_corpus=paths.text_corpus,
        image_corpus=paths.image_corpus,
        images_dir=paths.kb_dir + "/images",
        cache_path=cache_path,
      )
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
      assert int(np.min(out.num_turns)) == 2, "every scripted row searches and picks a keyframe"
      lat = sorted(r.latency_s for r in br.pop_records() if r.action == "search")
      rows.append((phase, batch_size / dt, 1e3 * lat[len(lat) // 2], 1e3 * lat[-1]))

    # Continuous batching on a mixed-length batch: half the episodes answer at once
    # after 0 to 3 x 8 words of thinking, half search, pick a keyframe and think 0 to
    # 3 x 20 words before the answer (each turn under max_action_length).
    def script(i):
      k = (i * 5) % 8
      answer = '<answer> {"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]} </answer><|im_end|>'
      think = " ".join(words[j % 8] for j in range((k % 4) * (8 if k < 4 else 20)))
      if k < 4:
        return tok.encode(f"<thinking> {think} </thinking> {answer}")
      return tok.encode(
        f'<thinking> q </thinking> <search> {{"name": "text_search", "query": '
        f'"{words[i % 8]} {words[(i * 3 + 1) % 8]} {i}"}} </search>'
        f"<thinking> k </thinking> <keyframe> 5 </keyframe><thinking> {think} </thinking> " + answer
      )

    mixed = [script(i) for i in range(batch_size)]
    forced = np.full((batch_size, max(map(len, mixed))), -1, np.int32)
    for i, sc in enumerate(mixed):
      forced[i, : len(sc)] = sc
    mixed_batch = batch.replace(forced_tokens=jnp.asarray(forced))
    slotted = {}
    for slots in (0, batch_size // 2, batch_size // 4):
      fn = rollout.make_rollout_fn(
        cfg,
        dataclasses.replace(rcfg, slots=slots),
        rollout.stop_patterns(tok, ["</search>", "</keyframe>"]),
        lambda *a: current["fn"](*a),
        (16, cfg.vision.patch_dim),
      )
      jax.block_until_ready(fn(params, mixed_batch, jax.random.PRNGKey(0)))  # compile
      t0 = time.perf_counter()
      out = jax.device_get(fn(params, mixed_batch, jax.random.PRNGKey(1)))
      dt = time.perf_counter() - t0
      slotted[slots] = (out, dt)
    full = slotted[0][0]
    lengths = np.asarray(full.response_length)
    generated = np.asarray(full.loss_mask).sum(1)
  print(
    f"\nepisodes: embedded policy, batch {batch_size}, one text_search + keyframe + answer each, "
    "dense KB"
  )
  print(f"{'search cache':<14}{'episodes/s':>12}{'search p50 ms':>15}{'search max ms':>15}")
  for phase, per_s, p50, pmax in rows:
    print(f"{phase:<14}{per_s:>12.2f}{p50:>15.1f}{pmax:>15.1f}")
  print(
    f"\ncontinuous batching: {batch_size} episodes of {lengths.min()} to {lengths.max()} tokens "
    f"({generated.min()} to {generated.max()} generated, mean {generated.mean():.0f}), search "
    "cached; useful = generated tokens of live episodes / slot-steps computed"
  )
  print(
    f"{'slots':<14}{'episodes/s':>12}{'decode steps':>14}{'useful':>9}{'speed-up':>10}{'same':>6}"
  )
  for slots, (out, dt) in slotted.items():
    m = slots or batch_size
    useful = np.asarray(out.loss_mask).sum() / (int(out.decode_steps) * m)
    same = all(
      np.array_equal(getattr(out, k), getattr(full, k))
      for k in ("response_ids", "loss_mask", "stop_reason", "num_turns")
    )
    label = f"{m}" + (" (none)" if not slots else "")
    print(
      f"{label:<14}{batch_size / dt:>12.2f}{int(out.decode_steps):>14}{useful:>9.2f}"
      f"{slotted[0][1] / dt:>9.2f}x{'yes' if same else 'NO':>6}"
    )


if __name__ == "__main__":
  main()
