"""Checks of the run config, before anything is read, built or compiled.

`validate_config` checks every enum (`CONFIG_CHOICES`) and bounded number
(`CONFIG_RANGES`) and the settings a recipe cannot run without; `check_config` adds
what needs the file system, the process count and the mesh (paths exist, the batch
splits into mini-batches, micro-batches, processes and devices). Errors name the field
and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from segresearch_jax import sharding
from segresearch_jax.data import okvos as okvos_lib
from segresearch_jax.data import reasoning as reasoning_data
from segresearch_jax.models import config as config_lib
from segresearch_jax.rewards import mask as mask_lib
from segresearch_jax.rl import losses
from segresearch_jax.search import cache as search_cache
from segresearch_jax.search import factory as search_factory
from segresearch_jax.search import local_kb
from segresearch_jax.segmentation import video as video_lib

# Every enum of the run config: field -> accepted values.
CONFIG_CHOICES: dict[str, tuple[str, ...]] = {
  "model.preset": tuple(config_lib.PRESETS),
  "model.dtype": ("float32", "bfloat16"),
  "data.source": ("synthetic", "okvos"),
  "data.on_error": okvos_lib.ON_ERROR,
  "data.benchmark": ("", *reasoning_data.BENCHMARKS),
  "search.backend": (*search_factory.BACKENDS, "none"),
  "search.method": local_kb.METHODS,
  "search.cache_mode": search_cache.MODES,
  "reward.mask_prompt": mask_lib.PROMPTS,
  "mask_cache.segmenter": video_lib.VIDEO_SEGMENTERS,
  "loss.kl_estimator": losses.KL_ESTIMATORS,
  "loss.aggregation": losses.AGGREGATIONS,
  "eval.segmenter": video_lib.VIDEO_SEGMENTERS,
  "eval.search": ("", *search_factory.BACKENDS, "none"),
}

# Every bounded number of the run config: (field, accepts, the rule in words).
CONFIG_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
  ("total_steps", lambda v: v >= 0, ">= 0"),
  ("batch_size", lambda v: v >= 1, ">= 1"),
  ("log_every", lambda v: v >= 1, ">= 1"),
  ("data.num_frames", lambda v: v >= 1, ">= 1"),
  ("data.frame_size", lambda v: v >= 1, ">= 1"),
  ("data.keyframe_size", lambda v: v >= 1, ">= 1"),
  ("data.search_image_size", lambda v: v >= 1, ">= 1"),
  ("data.min_pixels", lambda v: v >= -1, ">= -1"),
  ("data.max_broken_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("data.synthetic_train", lambda v: v >= 1, ">= 1"),
  ("data.synthetic_test", lambda v: v >= 1, ">= 1"),
  ("data.synthetic_train_teams", lambda v: 4 <= v <= 300, "in [4, 300] (the test split has 24)"),
  ("search.text_top_k", lambda v: v >= 1, ">= 1"),
  ("search.image_top_k", lambda v: v >= 1, ">= 1"),
  ("search.web_top_k", lambda v: v >= 1, ">= 1"),
  ("search.timeout_s", lambda v: v > 0, "> 0"),
  ("search.hybrid_alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("search.max_retries", lambda v: v >= 0, ">= 0"),
  ("search.backoff_s", lambda v: v >= 0, ">= 0"),
  ("search.summarizer_retries", lambda v: v >= 0, ">= 0"),
  ("search.summarizer_timeout_s", lambda v: v > 0, "> 0"),
  ("rollout.group_size", lambda v: v >= 1, ">= 1"),
  ("rollout.max_turns", lambda v: v >= 1, ">= 1"),
  ("rollout.max_prompt_length", lambda v: v >= 1, ">= 1"),
  ("rollout.max_response_length", lambda v: v >= 1, ">= 1"),
  ("rollout.max_action_length", lambda v: v >= 1, ">= 1"),
  ("rollout.max_obs_length", lambda v: v >= 1, ">= 1"),
  # A temperature <= 0 samples a flat or inverted distribution while the trainer
  # scores the tokens at the tempered one; top_p = 0 keeps no token.
  ("rollout.temperature", lambda v: v > 0, "> 0 (evaluation decodes greedily by itself)"),
  ("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
  ("rollout.top_k", lambda v: v >= 0, ">= 0 (0 = off)"),
  ("rollout.observe_rows", lambda v: v >= 0, ">= 0 (0 = a sixteenth of the batch)"),
  (
    "rollout.max_episode_tokens",
    lambda v: v >= 0,
    ">= 0 (0 = max_prompt_length + max_response_length)",
  ),
  ("rollout.slots", lambda v: v >= 0, ">= 0 (0 = one decode slot per episode)"),
  ("reward.tpr_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("reward.tpr_budget", lambda v: v >= 0, ">= 0"),
  ("reward.igr_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("reward.mask_weight", lambda v: v >= 0, ">= 0"),
  ("mask_cache.point_grid", lambda v: v >= 1, ">= 1"),
  ("mask_cache.box_bins", lambda v: v >= 1, ">= 1"),
  ("loss.clip_low", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("loss.clip_high", lambda v: v >= 0, ">= 0"),
  ("loss.dual_clip", lambda v: v == 0 or v > 1, "0 (off) or > 1"),
  ("loss.log_ratio_clamp", lambda v: v > 0, "> 0"),
  ("loss.kl_coef", lambda v: v >= 0, ">= 0"),
  ("loss.entropy_coef", lambda v: v >= 0, ">= 0"),
  ("loss.mini_batches", lambda v: v >= 1, ">= 1"),
  ("loss.micro_batches", lambda v: v >= 1, ">= 1"),
  ("dapo.max_refills", lambda v: v >= 0, ">= 0"),
  ("dapo.overlong_buffer", lambda v: v >= 0, ">= 0"),
  ("dapo.overlong_penalty", lambda v: v >= 0, ">= 0"),
  ("sft.steps", lambda v: v >= 0, ">= 0"),
  ("sft.lr", lambda v: v >= 0, ">= 0 (0 = a frozen control run)"),
  ("sft.batch_size", lambda v: v >= 1, ">= 1"),
  ("sft.log_every", lambda v: v >= 1, ">= 1"),
  ("sft.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("sft.vision_lr_scale", lambda v: v >= 0, ">= 0 (0 = a frozen vision tower)"),
  ("optim.lr", lambda v: v >= 0, ">= 0 (0 = a frozen control run)"),
  ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.eps", lambda v: v > 0, "> 0"),
  ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
  ("optim.vision_lr_scale", lambda v: v >= 0, ">= 0 (0 = a frozen vision tower)"),
  ("optim.grad_clip", lambda v: v > 0, "> 0"),
  ("checkpoint.every_steps", lambda v: v >= 1, ">= 1"),
  ("checkpoint.keep", lambda v: v >= 1, ">= 1"),
  ("eval.every_steps", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
  ("eval.num_samples", lambda v: v >= 0, ">= 0 (0 = the whole split)"),
  ("eval.report_samples", lambda v: v >= 0, ">= 0"),
)


def _field(config, name: str) -> Any:
  for key in name.split("."):
    config = config[key]
  return config


def validate_config(config, *, training: bool = True) -> None:
  """Checks every enum and range of the run config (`CONFIG_CHOICES`, `CONFIG_RANGES`)
  and the settings a recipe cannot run without, before anything is read or built.

  `training=False` (evaluating a saved checkpoint) does not ask for `model.hf_dir`.

  Raises:
    ValueError: naming the field, its value and what it accepts (or how to set it).
  """
  for name, choices in CONFIG_CHOICES.items():
    value = _field(config, name)
    if value not in choices:
      shown = " | ".join(repr(c) if c == "" else c for c in choices)
      raise ValueError(f"config.{name}={value!r} is not one of: {shown}.")
  for name, accepts, rule in CONFIG_RANGES:
    value = _field(config, name)
    if not accepts(value):
      raise ValueError(f"config.{name}={value!r} is out of range: it must be {rule}.")
  if training and config.model.require_hf_dir and not config.model.hf_dir:
    raise ValueError(
      f"This recipe fine-tunes a pretrained {config.model.preset} and config.model.hf_dir is "
      "empty: pass --config.model.hf_dir=/path/to/the/HF/checkpoint (or "
      "--config.model.require_hf_dir=False to train randomly initialised weights)."
    )
  buffer, longest = config.dapo.overlong_buffer, config.rollout.max_response_length
  if buffer >= longest:  # Would penalise every response, however short.
    raise ValueError(
      f"config.dapo.overlong_buffer={buffer} must be below "
      f"config.rollout.max_response_length={longest} (the penalty ramps over the last "
      "overlong_buffer tokens)."
    )
  budget, prompt = config.rollout.max_episode_tokens, config.rollout.max_prompt_length
  if budget and budget <= prompt:  # No room for a single response token.
    raise ValueError(
      f"config.rollout.max_episode_tokens={budget} must exceed "
      f"config.rollout.max_prompt_length={prompt} (the KV cache holds the padded prompt "
      "and the response; 0 = max_prompt_length + max_response_length)."
    )
  sam2_uses = [("eval", config.eval.masks)]
  sam2_uses.append(("mask_cache", config.reward.mask_weight > 0))
  for section, used in sam2_uses:
    if used and config[section].segmenter == "sam2" and not config[section].sam2_checkpoint:
      raise ValueError(
        f"config.{section}.segmenter=sam2 needs the SAM2.1 hiera-large checkpoint: pass "
        f"--config.{section}.sam2_checkpoint=/path/to/sam2.1_hiera_large.pt (or "
        f"--config.{section}.segmenter=weight_free)."
      )


def check_config(config, mesh=None) -> None:
  """Fails before any data is built or anything compiles on an unusable config."""
  validate_config(config)
  for section in ("eval", "mask_cache"):
    path = config[section].sam2_checkpoint
    if config[section].segmenter == "sam2" and path and not os.path.isfile(path):
      raise FileNotFoundError(f"config.{section}.sam2_checkpoint={path!r} is not a file.")
  if config.model.hf_dir and not os.path.isdir(config.model.hf_dir):
    raise FileNotFoundError(f"config.model.hf_dir={config.model.hf_dir!r} is not a directory.")
  if config.data.source == "okvos" and not os.path.isdir(config.data.okvos_dir or ""):
    raise FileNotFoundError(
      f"config.data.okvos_dir={config.data.okvos_dir!r} is not a directory (data.source=okvos)."
    )
  if config.search.kb_dir and not os.path.isdir(config.search.kb_dir):
    raise FileNotFoundError(f"config.search.kb_dir={config.search.kb_dir!r} is not a directory.")
  n, p, mb = config.rollout.group_size, config.batch_size, config.loss.mini_batches
  if p % mb:
    raise ValueError(f"batch_size={p} prompts do not split into loss.mini_batches={mb}.")
  if (p * n // mb) % config.loss.micro_batches:
    raise ValueError(
      f"{p * n // mb} rows per mini-batch do not split into loss.micro_batches="
      f"{config.loss.micro_batches}."
    )
  if n < 1:
    raise ValueError(f"rollout.group_size must be >= 1, got {n}.")
  if p % jax.process_count():
    raise ValueError(f"batch_size={p} prompts do not split over {jax.process_count()} processes.")
  if config.sft.steps and config.sft.batch_size % jax.process_count():
    raise ValueError(
      f"sft.batch_size={config.sft.batch_size} does not split over {jax.process_count()} processes."
    )
  if mesh is not None:
    sharding.check_batch_divisible(
      p * n // mb,
      mesh,
      f"update batch ({p} prompts x {n} rollouts / {mb} mini-batches)",
      micro_batches=config.loss.micro_batches,
    )
    if config.sft.steps:
      sharding.check_batch_divisible(config.sft.batch_size, mesh, "warm-start batch")
