r"""Seg-ReSearch on OK-VOS.

The embedded default (no argument) needs nothing but this repository: a synthetic
OK-VOS-style dataset and knowledge base made on first use, a tiny Qwen3-VL trained
from scratch, BM25 search over the synthetic KB and the weight-free mask cache.

    python -m segresearch_jax.train --config=configs/okvos.py

The paper recipe (Qwen3-VL-4B, 16 prompts x 8 rollouts, lr 1e-6, 100 steps):

    python -m segresearch_jax.train --config=configs/okvos.py:paper \
        --config.model.hf_dir=/ckpt/Qwen3-VL-4B-Instruct \
        --config.data.okvos_dir=/data/OK-VOS --config.search.kb_dir=/data/local_KB

Any field can be overridden with `--config.x.y=value`; a misspelled key fails at once
(`lock_config=True`). Lengths: we cap the *response* at `rollout.max_response_length`
(the official code caps prompt + response together at that number).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks a preset: None (embedded default) or 'paper'."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/okvos"
  c.total_steps = 40
  c.dry_run = False  # Build the model with abstract arrays and print the plan, then exit.

  c.model = ml_collections.ConfigDict()
  c.model.preset = "embedded"  # tiny | embedded | mid | qwen3_vl_2b | qwen3_vl_4b | qwen3_vl_8b
  c.model.hf_dir = ""  # A local HF checkpoint; overrides the preset's shapes and weights.
  c.model.tokenizer_dir = ""  # Local HF tokenizer/processor dir; empty = the embedded tokenizer.
  c.model.dtype = "float32"  # Compute dtype (params stay fp32): float32 | bfloat16.

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | okvos
  c.data.okvos_dir = ""  # Raw OK-VOS layout (SPEC §4.1) when source == okvos.
  c.data.synthetic_dir = ""  # Where the synthetic set is built and cached; empty = under workdir.
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_frames = 6
  c.data.frame_size = 128  # Shown frames are resized to this square (448 in the paper).
  c.data.keyframe_size = 128  # The high-res keyframe observation (864 in the paper).
  c.data.search_image_size = 64  # image_search results (256 in the paper).
  c.data.on_error = "skip"  # skip (and count) | raise, for broken samples.

  c.search = ml_collections.ConfigDict()
  c.search.backend = "local"  # local | serper | ddgs | service
  c.search.kb_dir = ""  # Official-format KB; empty = the synthetic KB.
  c.search.method = "bm25"  # bm25 | dense | hybrid
  c.search.text_top_k = 2
  c.search.image_top_k = 1
  c.search.cache_mode = "read_write"  # off | read_write | replay
  c.search.cache_path = ""  # Empty = workdir/search_cache.sqlite.

  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 4
  c.rollout.max_turns = 4
  c.rollout.max_prompt_length = 512
  c.rollout.max_response_length = 512
  c.rollout.max_action_length = 128
  c.rollout.max_obs_length = 256
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0

  c.reward = ml_collections.ConfigDict()
  c.reward.tpr_p = 0.7
  c.reward.tpr_budget = 10
  c.reward.igr_threshold = 0.5
  c.reward.mask_weight = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.batch_size = 4  # Prompts per step.

  if arg is None or arg == "":
    return c
  if arg == "paper":
    c.total_steps = 100
    c.model.preset = "qwen3_vl_4b"
    c.model.dtype = "bfloat16"
    c.data.source = "okvos"
    c.data.frame_size = 448
    c.data.keyframe_size = 864
    c.data.search_image_size = 256
    c.search.method = "dense"
    c.rollout.group_size = 8
    c.rollout.max_turns = 6
    c.rollout.max_prompt_length = 2048
    c.rollout.max_response_length = 8192
    c.rollout.max_action_length = 4096
    c.rollout.max_obs_length = 4096
    c.optim.lr = 1e-6
    c.batch_size = 16
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
  raise ValueError(f"Unknown config preset {arg!r}; use no argument or 'paper'.")
