r"""Seg-ReSearch GRPO trainer.

    python -m segresearch_jax.train --config=configs/okvos.py

Stages of this file (banner-separated): policy, then in `main` the data and one
forward step.
The GRPO loop (rollout -> rewards -> advantages -> updates -> checkpoints) lands
here as its pieces (rollout, rewards, rl) are wired in; until then the command
builds the configured policy, prints its size and runs one forward pass over a
real prompt of the configured data to prove the path from data to logits.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from segresearch_jax.data import pipeline
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy, processor, weights
from segresearch_jax.models import tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
flags.mark_flags_as_required(["config"])


# ----------------------------------------------------------------------------
# Policy.
# ----------------------------------------------------------------------------


def build_policy(config, tokenizer) -> tuple[config_lib.ModelConfig, dict]:
  """The policy's shapes and initial parameters (from a HF directory or a preset).

  Small presets take their vocabulary and special-token ids from the run's
  tokenizer; a HF checkpoint brings its own config and weights.
  """
  dtype = jnp.dtype(config.model.dtype)
  if config.model.hf_dir:
    return weights.load_hf_checkpoint(config.model.hf_dir, dtype)
  model_cfg = config_lib.get_preset(config.model.preset)
  if model_cfg.text.vocab_size < tokenizer.vocab_size or config.model.preset in (
    "tiny",
    "embedded",
  ):
    model_cfg = dataclasses.replace(
      config_lib.with_vocab(model_cfg, tokenizer.vocab_size),
      image_token_id=tokenizer.image_pad_id,
      vision_start_token_id=tokenizer.vision_start_id,
      vision_end_token_id=tokenizer.vision_end_id,
    )
  params = jax.jit(policy.init_params, static_argnums=0)(model_cfg, jax.random.PRNGKey(config.seed))
  return model_cfg, params


def processor_config(model_cfg: config_lib.ModelConfig) -> processor.ImageProcessorConfig:
  return processor.QWEN3_VL if model_cfg.family == "qwen3_vl" else processor.QWEN2_5_VL


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  t0 = time.time()
  tokenizer = tokenizer_lib.load_tokenizer(config.model.tokenizer_dir or None)
  model_cfg, params = build_policy(config, tokenizer)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"policy {model_cfg.family} ({config.model.hf_dir or config.model.preset}): "
    f"{n_params / 1e6:.2f}M parameters, vocab {model_cfg.text.vocab_size}, "
    f"devices {jax.devices()}"
  )

  # Data: the configured split (the synthetic set is built on first use).
  okvos_dir, kb_dir = pipeline.resolve_data(config.data, config.workdir, config.seed)
  dataset, source = pipeline.okvos_dataset(
    okvos_dir,
    config.data.train_split,
    batch_size=config.batch_size,
    seed=config.seed,
    on_error=config.data.on_error,
    num_frames=config.data.num_frames,
    frame_size=config.data.frame_size,
    convention=model_cfg.coord_convention,
  )
  batch = next(iter(dataset))
  print(
    f"data: {len(source)} {config.data.train_split} samples in {okvos_dir} "
    f"(knowledge base {kb_dir or config.search.kb_dir}), batch of {len(batch['id'])}"
  )

  # One forward step over the first prompt of the batch.
  size = config.data.frame_size
  frames = list(batch["frames"][0][batch["frame_valid"][0]])
  enc = processor.encode_prompt(
    batch["prompt"][0], frames, tokenizer, processor_config(model_cfg), (size, size)
  )
  ids = np.asarray(enc["input_ids"], np.int32)[None]
  grid = tuple(int(g) for g in enc["grid_thw"][0][1:])
  merged = [(g // model_cfg.vision.spatial_merge_size) for g in grid]
  patches = jnp.asarray(enc["pixel_values"]).reshape(len(frames), grid[0] * grid[1], -1)
  model = policy.Policy(model_cfg)

  @jax.jit
  def forward(params, ids, positions, patches):
    visual, deepstack = model.apply(
      {"params": params}, patches, grid, method=policy.Policy.encode_images
    )
    visual = visual.reshape(1, -1, visual.shape[-1])
    deepstack = deepstack.reshape(deepstack.shape[0], 1, -1, deepstack.shape[-1])
    hidden, _ = model.apply(
      {"params": params},
      ids,
      positions,
      jnp.ones(ids.shape, bool),
      visual,
      deepstack,
      return_hidden=True,
    )
    return model.apply({"params": params}, hidden[:, -1], method=policy.Policy.logits)

  positions, _ = policy.rope_index(
    ids, np.ones_like(ids), [[tuple(merged)] * len(frames)], model_cfg.image_token_id
  )
  logits = forward(params, jnp.asarray(ids), jnp.asarray(positions), patches)
  next_token = int(jnp.argmax(logits[0]))
  print(
    f"forward on {batch['id'][0]} ({batch['ability'][0]}): {ids.shape[1]} prompt tokens "
    f"({len(frames)} frames of {size}px) -> "
    f"logits {tuple(logits.shape)}, next token {next_token!r} "
    f"({tokenizer.decode([next_token])!r}), {time.time() - t0:.1f}s total"
  )
  logging.info("The GRPO loop is not wired in yet; stopping after the forward step.")


if __name__ == "__main__":
  app.run(main)
