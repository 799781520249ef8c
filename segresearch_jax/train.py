r"""Seg-ReSearch GRPO trainer.

    python -m segresearch_jax.train --config=configs/okvos.py

One step (docs/method.md §6): draw a batch of prompts -> run `group_size` episodes per prompt
in the jitted rollout (searches served by the host bridge) -> score them (docs/method.md §3.1,
plus the mask-cache term) -> group advantages -> `mini_batches` PPO-clip updates
-> log, trajectory records, checkpoint, periodic validation (greedy, held-out split).

The file reads top to bottom: setup (policy, data, search), the warm start
(supervised, on expert trajectories, for policies that start from random weights),
the GRPO step, validation, and the loop. Library code lives in the package:
rollout in `agent/`, rewards in `rewards/`, losses and the update in `rl/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from segresearch_jax import checkpoint as checkpoint_lib
from segresearch_jax import metrics as metrics_lib
from segresearch_jax import sharding
from segresearch_jax.agent import bridge as bridge_lib
from segresearch_jax.agent import episodes as episodes_lib
from segresearch_jax.agent import records as records_lib
from segresearch_jax.agent import rollout
from segresearch_jax.data import okvos as okvos_lib
from segresearch_jax.data import pipeline
from segresearch_jax.eval import reasoning as reasoning_eval
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import decoding, policy, weights
from segresearch_jax.models import tokenizer as tokenizer_lib
from segresearch_jax.rewards import mask as mask_lib
from segresearch_jax.rewards import scoring
from segresearch_jax.rl import losses
from segresearch_jax.rl import update as update_lib
from segresearch_jax.search import cache as search_cache
from segresearch_jax.search import factory as search_factory
from segresearch_jax.search import local_kb
from segresearch_jax.segmentation import video as video_lib
from segresearch_jax.tools import compare_runs

_FLAGS: dict[str, Any] = {}


def define_flags() -> None:
  """--config (only when run as a program: evaluate.py imports this module)."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", None, "Run config file.", lock_config=True
  )


# ----------------------------------------------------------------------------
# Setup: policy, data, search.
# ----------------------------------------------------------------------------


def build_policy(config, tokenizer, mesh=None) -> tuple[config_lib.ModelConfig, dict]:
  """The policy's shapes and initial parameters (from a HF directory or a preset).

  Small presets take their vocabulary and special-token ids from the run's
  tokenizer; a HF checkpoint brings its own config and weights. With a mesh the
  parameters are created (or placed) sharded by the config's partition rules.
  """
  if config.model.hf_dir:
    model_cfg, params = weights.load_hf_checkpoint(config.model.hf_dir, jnp.float32)
    if mesh is not None:
      params = jax.device_put(params, param_sharding(config, mesh, params))
    return model_cfg, params
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
  init_fn = functools.partial(policy.init_params, model_cfg)
  rng = jax.random.PRNGKey(config.seed)
  if mesh is None:
    return model_cfg, jax.jit(init_fn)(rng)
  shardings = param_sharding(config, mesh, jax.eval_shape(init_fn, rng))
  return model_cfg, sharding.create_sharded(init_fn, rng, shardings=shardings)


def param_sharding(config, mesh, abstract_params) -> Any:
  """NamedShardings of the parameters from `mesh.rules` then the default rules."""
  return sharding.param_shardings(abstract_params, sharding.rules_from_config(config.mesh), mesh)


def sharded_state(params, optimizer, mesh, config) -> tuple[Any, Any]:
  """(train state born sharded, its sharding tree): optimizer moments follow the params."""
  init = lambda p: update_lib.init_state(p, optimizer)
  abstract = jax.eval_shape(init, params)
  shardings = sharding.state_shardings(abstract, param_sharding(config, mesh, params))
  return sharding.create_sharded(init, params, shardings=shardings), shardings


def load_run_tokenizer(config):
  """`model.tokenizer_dir`, else the HF checkpoint's own tokenizer, else the embedded one.

  A real checkpoint never runs with the embedded tokenizer: its ids would be
  meaningless to the weights.
  """
  return tokenizer_lib.load_tokenizer(config.model.tokenizer_dir or config.model.hf_dir or None)


def initialize_distributed() -> None:
  """Joins a multi-process job; one code path for one host and many.

  SLURM and manual launches set SEGRESEARCH_COORDINATOR (host:port),
  SEGRESEARCH_NUM_PROCESSES and SEGRESEARCH_PROCESS_ID (`launch/slurm.py` does);
  TPU pod workers set SEGRESEARCH_DISTRIBUTED=1 and JAX finds its peers itself
  (`launch/tpu_pod.py` does). Without them this is a single-process run. CPU
  devices of several processes talk through gloo (the CPU-only test of this path).
  """
  coordinator = os.environ.get("SEGRESEARCH_COORDINATOR")
  if coordinator or os.environ.get("SEGRESEARCH_DISTRIBUTED") == "1":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["SEGRESEARCH_NUM_PROCESSES"]),
      process_id=int(os.environ["SEGRESEARCH_PROCESS_ID"]),
    )
  elif os.environ.get("SEGRESEARCH_DISTRIBUTED") == "1":
    jax.distributed.initialize()


# Every enum of the run config: field -> accepted values.
CONFIG_CHOICES: dict[str, tuple[str, ...]] = {
  "model.preset": tuple(config_lib.PRESETS),
  "model.dtype": ("float32", "bfloat16"),
  "data.source": ("synthetic", "okvos"),
  "data.on_error": okvos_lib.ON_ERROR,
  "data.benchmark": ("", *reasoning_eval.BENCHMARKS),
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
  ("search.text_top_k", lambda v: v >= 1, ">= 1"),
  ("search.image_top_k", lambda v: v >= 1, ">= 1"),
  ("search.web_top_k", lambda v: v >= 1, ">= 1"),
  ("search.timeout_s", lambda v: v > 0, "> 0"),
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
  ("sft.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("optim.lr", lambda v: v >= 0, ">= 0 (0 = a frozen control run)"),
  ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.eps", lambda v: v > 0, "> 0"),
  ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
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


def make_search_backend(config, kb_dir: str):
  """The configured backend (None when `search.backend == "none"`), checked with one query."""
  s = config.search
  if s.backend == "none":
    return None
  kb = s.kb_dir or kb_dir
  fields = {"backend": s.backend, "timeout_s": s.timeout_s, "cache_mode": s.cache_mode}
  if s.backend == "local":
    if not kb:
      raise ValueError("search.backend=local needs search.kb_dir (or the synthetic data set).")
    image_corpus = os.path.join(kb, "image_corpus.jsonl")
    # Image files are found next to the corpus (`images/`, or each row's image_path).
    fields.update(
      text_corpus=os.path.join(kb, "text_corpus.jsonl"),
      image_corpus=image_corpus if os.path.isfile(image_corpus) else None,
      method=s.method,
      dense_model=s.dense_model or None,
      dense_prefixes=s.dense_prefixes,
    )
  elif s.backend == "service":
    fields["service_url"] = s.service_url
  elif s.backend in ("serper", "ddgs"):
    fields.update(web_top_k=s.web_top_k, fetch_pages=s.fetch_pages)
    if s.summarizer_url or s.summarizer_model:
      fields.update(summarizer_url=s.summarizer_url, summarizer_model=s.summarizer_model)
  if s.cache_mode != "off":
    suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
    fields["cache_path"] = s.cache_path or os.path.join(
      config.workdir, f"search_cache{suffix}.sqlite"
    )
  backend = search_factory.make_backend(fields)
  try:  # A backend that is down fails here, not in the middle of a rollout.
    backend.text_search("health check", 1)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
      f"Search backend {s.backend!r} does not answer ({type(e).__name__}: {e}); "
      "fix config.search or run with --config.search.backend=none."
    ) from e
  return backend


def make_bridge(config, backend, tokenizer, shapes: episodes_lib.EpisodeShapes):
  return bridge_lib.SearchBridge(
    backend,
    tokenizer,
    max_obs_length=config.rollout.max_obs_length,
    text_top_k=config.search.text_top_k,
    image_top_k=config.search.image_top_k,
    keyframe_image_tokens=shapes.tokens(shapes.keyframe_size),
    search_image_tokens=shapes.tokens(shapes.search_size),
    search_image_size=shapes.search_size,
    call_timeout_s=2 * config.search.timeout_s,
    pad_id=tokenizer.pad_id,
  )


def make_dataset(
  config,
  okvos_dir,
  split,
  encoder,
  *,
  train: bool,
  batch_size: int,
  mask_cache_dir=None,
  whole: bool = False,
):
  """Batches of prepared + encoded prompts; training repeats forever, evaluation once.

  Each process reads its share of the samples (`batch_size` is per process) unless
  `whole` (evaluation, which runs on process 0 and scores a broken sample 0 instead
  of stopping at `data.max_broken_fraction`). `mask_cache_dir` attaches each
  sample's mask-IoU tables (the mask reward's input).
  """
  dataset, source = pipeline.okvos_dataset(
    okvos_dir,
    split,
    batch_size=batch_size,
    seed=config.seed,
    on_error=config.data.on_error,
    num_frames=config.data.num_frames,
    frame_size=config.data.frame_size,
    convention=encoder.model_cfg.coord_convention,
    encode_fn=encoder,
    shuffle=train,
    num_epochs=None if train else 1,
    drop_remainder=train,
    template_dir=config.data.templates or None,
    mask_cache_dir=mask_cache_dir,
    max_broken_fraction=None if whole else config.data.max_broken_fraction,
    **(dict(shard_index=0, shard_count=1) if whole else {}),
  )
  return dataset, source


def prompts_per_process(config) -> int:
  """Prompts of the global batch (`batch_size`) that each process draws and rolls out."""
  return config.batch_size // jax.process_count()


def per_row(batch: Mapping[str, Any], key: str, group_size: int) -> list[Any]:
  """A per-prompt field repeated for each of its `group_size` rows."""
  return [v for v in batch[key] for _ in range(group_size)]


# ----------------------------------------------------------------------------
# Training rows and the log-prob function.
# ----------------------------------------------------------------------------

# Every field of an update batch is row-major ([B, ...], B = prompts x group size),
# so one batch sharding splits it over ("data", "fsdp"); a prompt's inputs are
# repeated for each of its rows.
ROW_FIELDS = (
  "response_ids",
  "response_positions",
  "response_valid",
  "obs_kind",
  "obs_slot",
  "search_patches",
  "loss_mask",
)


def training_rows(
  prompts: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray], group_size: int
) -> dict[str, np.ndarray]:
  """An update batch: per-prompt inputs repeated per row, rollout outputs, M-RoPE
  positions as [B, 3, L]."""
  rows = {k: np.repeat(np.asarray(prompts[k]), group_size, axis=0) for k in PROMPT_INPUTS}
  rows["prompt_positions"] = np.repeat(
    np.moveaxis(np.asarray(prompts["prompt_positions"]), 0, 1), group_size, axis=0
  )
  for k in ROW_FIELDS:
    rows[k] = np.asarray(out[k])
  rows["response_positions"] = np.moveaxis(rows["response_positions"], 0, 1)  # [B, 3, R]
  rows["old_logprobs"] = np.asarray(out["logprobs"], np.float32)
  return rows


PROMPT_INPUTS = ("prompt_ids", "prompt_valid", "frame_patches", "keyframe_patches")


def make_logprob_fn(model_cfg, rcfg: rollout.RolloutConfig):
  """`logprob_fn(params, rows) -> (logp [B, R], entropy [B, R])` over response tokens.

  Visual tokens are rebuilt from pixels inside, so the gradient reaches the vision
  tower; temperature and banned ids match the sampler's (their log-probs agree).
  With `rows["token_index"]` (see `with_token_index`) the LM head runs only at those
  response positions and every other position gets 0.
  """
  temperature = rcfg.temperature if rcfg.temperature > 0 else 1.0
  cfg = dataclasses.replace(rcfg, group_size=1)

  def logprob_fn(params, rows):
    prompts = {k: rows[k] for k in PROMPT_INPUTS}
    prompts["prompt_positions"] = jnp.moveaxis(rows["prompt_positions"], 1, 0)
    out = {k: rows[k] for k in ROW_FIELDS}
    out["response_positions"] = jnp.moveaxis(rows["response_positions"], 1, 0)
    inputs = rollout.training_inputs(params, model_cfg, cfg, prompts, out)
    prompt_length = rows["prompt_ids"].shape[1]
    index = rows.get("token_index")
    logp, entropy = decoding.token_logprobs(
      params,
      model_cfg,
      *inputs,
      start=prompt_length,  # the response only
      index=None if index is None else prompt_length + index,
      temperature=temperature,
      banned_ids=rcfg.banned_ids,
      return_entropy=True,
    )
    if index is None:
      return logp, entropy
    # Back to [B, R]; padding entries (index R) are dropped.
    b, r = rows["response_ids"].shape
    scatter = lambda x: (
      jnp.zeros((b, r), x.dtype).at[jnp.arange(b)[:, None], index].set(x, mode="drop")
    )
    return scatter(logp), scatter(entropy)

  return logprob_fn


def token_index(loss_mask: np.ndarray, buckets: int = 4, min_width: int = 0) -> np.ndarray:
  """int32 [B, K]: each row's trained response positions (`loss_mask`), padded with R.

  K is the longest row's count rounded up to a multiple of R / `buckets` (and at
  least `min_width`), so an update compiles once per bucket, not once per batch;
  under several processes it is the largest over all of them (the rows form one
  global array).
  """
  b, r = loss_mask.shape
  step = -(-r // buckets)
  longest = sharding.process_max(loss_mask.sum(axis=1).max(initial=0))
  k = min(r, max(1, -(-longest // step), -(-min_width // step)) * step)
  index = np.full((b, k), r, np.int32)
  for row, mask in enumerate(loss_mask):
    where = np.flatnonzero(mask)
    index[row, : len(where)] = where
  return index


def with_token_index(rows: Mapping[str, np.ndarray], min_width: int = 0) -> dict[str, np.ndarray]:
  """`rows` plus `token_index`: the update's LM head then skips observation and
  padding positions, which never train (most of a search-heavy response).

  The training loop passes the widest index so far as `min_width`: the width only
  grows, so the update compiles at most once per bucket and usually once or twice.
  """
  return dict(rows, token_index=token_index(np.asarray(rows["loss_mask"]), min_width=min_width))


def schedule_settings(config, *, sft: bool = False) -> tuple[float, int, int]:
  """(lr, warmup steps, optimizer updates per step) of GRPO or the warm start.

  The warm-up counts training steps, as the official schedule (stepped once per
  step) does; a GRPO step applies `loss.mini_batches` updates, a warm-start step one.
  """
  if sft:
    return config.sft.lr, config.sft.warmup_steps, 1
  return config.optim.lr, config.optim.warmup_steps, config.loss.mini_batches


def make_update(config, model_cfg, rcfg, *, sft: bool = False):
  """(optimizer, update_fn) for GRPO or the supervised warm start; see `jit_update`."""
  o = config.optim
  lr, warmup, per_step = schedule_settings(config, sft=sft)
  schedule = update_lib.learning_rate_schedule(lr, warmup, updates_per_step=per_step)
  optimizer = update_lib.make_optimizer(
    lr, warmup, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip, updates_per_step=per_step
  )
  loss_cfg = losses.LossConfig(
    clip_low=config.loss.clip_low,
    clip_high=config.loss.clip_high,
    dual_clip=config.loss.dual_clip,
    log_ratio_clamp=config.loss.log_ratio_clamp,
    kl_coef=0.0 if sft else config.loss.kl_coef,
    kl_estimator=config.loss.kl_estimator,
    entropy_coef=0.0 if sft else config.loss.entropy_coef,
    aggregation=config.loss.aggregation,
  )
  base_loss = losses.sft_loss if sft else losses.grpo_loss
  update_fn = update_lib.make_update_fn(
    make_logprob_fn(model_cfg, rcfg),
    optimizer,
    loss_cfg,
    micro_batches=config.loss.micro_batches,
    schedule=schedule,
    loss_fn=base_loss,
  )
  return optimizer, update_fn


def jit_update(update_fn, mesh, state_sharding):
  """The update under jit: state donated and laid out by `state_sharding`, batch rows
  split over ("data", "fsdp"), RNG and metrics replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    update_fn,
    in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )


def split_mini_batches(rows: Mapping[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
  """`count` consecutive slices of whole groups (batch_size % count == 0 is checked)."""
  size = len(rows["prompt_ids"]) // count
  return [{k: v[i * size : (i + 1) * size] for k, v in rows.items()} for i in range(count)]


# ----------------------------------------------------------------------------
# Warm start: supervised on expert trajectories.
# ----------------------------------------------------------------------------


def expert_rows(config, dataset, runner: episodes_lib.Runner, model_cfg, shapes) -> dict:
  """Expert episodes of every training sample, as training rows with group size 1.

  Each sample's reference trajectory (`episodes.expert_turns`) goes through the
  real bridge, so observations are exactly what the rollout would show.
  """
  host_fn = rollout.bridge_host_fn(runner.bridge, shapes.image_cfg, shapes.search_size)
  cfg = dataclasses.replace(runner.cfg, group_size=1)
  rows, skipped = [], 0
  for batch in dataset:
    for i in range(len(batch["id"])):
      sample = {k: batch[k][i] for k in batch}
      runner.bridge.set_shown_frames([episodes_lib.shown_frames(batch, 1)[i]])
      ep = episodes_lib.expert_episode(
        episodes_lib.expert_turns(sample),
        host_fn,
        runner.tokenizer,
        model_cfg,
        cfg,
        shapes.search_patch_shape,
        int(sample["next_pos"]),
      )
      if ep is None:
        skipped += 1
        continue
      prompt = {k: np.asarray(batch[k][i : i + 1]) for k in episodes_lib.PROMPT_FIELDS}
      prompt["prompt_positions"] = np.moveaxis(prompt["prompt_positions"], 1, 0)
      rows.append(training_rows(prompt, ep, 1))
  runner.bridge.pop_records()
  if not rows:
    raise RuntimeError("No expert episode fits the rollout limits; raise rollout.max_* lengths.")
  if skipped:
    print(f"warm start: {skipped} expert episodes did not fit the length limits and were skipped")
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def warm_start(config, params, data: dict, model_cfg, rcfg, mesh, writer) -> Any:
  """`config.sft.steps` supervised updates on random mini-batches of expert rows."""
  optimizer, update_fn = make_update(config, model_cfg, rcfg, sft=True)
  state, state_sharding = sharded_state(params, optimizer, mesh, config)
  update_fn = jit_update(update_fn, mesh, state_sharding)
  rng = np.random.default_rng(config.seed)
  n = len(data["prompt_ids"])  # this process's expert rows
  size = config.sft.batch_size // jax.process_count()
  if jax.process_count() > 1 and n < size:  # Every process must bring the same row count.
    raise ValueError(
      f"Process {jax.process_index()} has {n} expert episodes, fewer than its share "
      f"({size}) of sft.batch_size={config.sft.batch_size}."
    )
  size = min(size, n)
  data = dict(data, advantages=np.ones(data["loss_mask"].shape[:1], np.float32))
  data = with_token_index(data)  # one width for every batch: one compilation
  writer.start(0)
  for step in range(1, config.sft.steps + 1):
    idx = rng.choice(n, size, replace=False)
    batch = sharding.shard_batch({k: v[idx] for k, v in data.items()}, mesh)
    state, m = update_fn(state, batch, jax.random.PRNGKey(step))
    if step % config.log_every == 0 or step == config.sft.steps:
      m = jax.device_get(m)
      writer.write(
        step,
        m,
        phase="sft",
        console=f"sft {step}/{config.sft.steps} | loss {float(m['loss']):.3f} | "
        f"lr {float(m['lr']):.2e} | grad norm {float(m['grad_norm']):.2f}",
      )
  return state.params


# ----------------------------------------------------------------------------
# Rewards for a rollout batch.
# ----------------------------------------------------------------------------


class Scorer:
  """Host parse + the jitted numeric half (`rewards.scoring`) for one group size.

  With `mask=True` (training with `reward.mask_weight > 0`) the batch must carry the
  mask-cache tables (`mask_point_iou`, `mask_box_iou`) and the mask term is added.
  """

  def __init__(self, config, group_size: int, convention: str, *, mask: bool = False):
    cfg = dataclasses.replace(scoring.score_config(config), group_size=group_size)
    self.group_size = group_size
    self.convention = convention
    self.resized = (config.data.frame_size, config.data.frame_size)  # as the GT conversion
    self.mask = mask and cfg.mask_weight > 0
    self.parse = scoring.Parser(cfg.reward)
    self.score_fn = scoring.make_score_fn(cfg)

  def __call__(self, batch, eps: episodes_lib.Episodes) -> dict[str, np.ndarray]:
    n = self.group_size
    gts = per_row(batch, "ground_truth", n)
    parsed = self.parse(eps.responses, gts, per_row(batch, "steps", n))
    mask_inputs = None
    if self.mask:
      mask_inputs = mask_lib.parse_mask_prompts(
        eps.responses,
        gts,
        np.repeat(np.asarray(batch["frame_numbers"]), n, axis=0),
        self.convention,
        self.resized,
      )
      mask_inputs["point_iou"] = np.repeat(np.asarray(batch["mask_point_iou"]), n, axis=0)
      mask_inputs["box_iou"] = np.repeat(np.asarray(batch["mask_box_iou"]), n, axis=0)
    scores = self.score_fn(parsed, eps.out["response_length"], eps.out["stop_reason"], mask_inputs)
    return {k: np.asarray(v) for k, v in jax.device_get(scores).items()}


def episode_metrics(eps: episodes_lib.Episodes, scores: Mapping[str, np.ndarray]) -> dict:
  """Means of the reward terms, searches, lengths and stop reasons of a batch."""
  out = eps.out
  m = {f"reward/{k}": float(np.mean(v)) for k, v in scores.items() if v.dtype.kind == "f"}
  m["search/per_trajectory"] = float(np.mean(scores["num_search"]))
  calls = [c for row in eps.tool_calls for c in row]
  m["search/errors"] = float(np.mean([c.error is not None for c in calls])) if calls else 0.0
  m["response_length"] = float(np.mean(out["response_length"]))
  m["generated_tokens"] = float(np.mean(np.sum(out["loss_mask"], axis=1)))
  m["turns"] = float(np.mean(out["num_turns"]))
  for i, name in enumerate(rollout.STOP_REASONS):
    m[f"stop/{name}"] = float(np.mean(out["stop_reason"] == i))
  return m


def write_records(directory, step, tokenizer, batch, eps, scores, group_size) -> None:
  """Trajectory records of one step (`agent.records`), rewards included."""
  samples = [
    {"id": i, "ability": a, "question": q}
    for i, a, q in zip(
      per_row(batch, "id", group_size),
      per_row(batch, "ability", group_size),
      per_row(batch, "question", group_size),
    )
  ]
  rewards = [
    {k: float(v[r]) for k, v in scores.items() if v.dtype.kind == "f"} for r in range(len(samples))
  ]
  recs = records_lib.episode_records(tokenizer, eps.out, samples, eps.tool_calls, rewards)
  process = jax.process_index() if jax.process_count() > 1 else None
  records_lib.write_step(directory, step, recs, process=process)


# ----------------------------------------------------------------------------
# The GRPO step.
# ----------------------------------------------------------------------------


def rollout_and_score(config, batch, runner, scorer, params, rng, attempt: int = 0):
  """(episodes, scores) of one prompt batch; `attempt` picks the sampling streams, so
  two calls with the same batch, rng and attempt draw alike (the frozen control)."""
  p = prompts_per_process(config)
  eps = runner(
    params, batch, jax.random.fold_in(rng, attempt), prompt_index=pipeline.global_positions(p)
  )
  return eps, scorer(batch, eps)


def collect_rollouts(config, first_batch, data_iter, runner, scorer, params, rng):
  """This process's episodes for one step; with DAPO dynamic sampling, extra batches
  until enough groups have reward variance (at most `dapo.max_refills` extra)."""
  n, p = config.rollout.group_size, prompts_per_process(config)
  drawn = []
  for attempt in range(1 + (config.dapo.max_refills if config.dapo.filter_groups else 0)):
    batch = first_batch if attempt == 0 else next(data_iter)
    drawn.append((batch, *rollout_and_score(config, batch, runner, scorer, params, rng, attempt)))
    useful = sum(int(np.sum(~s["zero_variance"])) // n for _, _, s in drawn)
    if not config.dapo.filter_groups or useful >= p:
      break
  return drawn


def initial_params(ckpt, state, state_sharding, start: int) -> Any | None:
  """The warm-start parameters (checkpoint step 0): a copy of the state's at step 0,
  else restored from the checkpoint; None when step 0 is no longer kept."""
  if start == 0:
    return jax.tree.map(jnp.copy, state.params)
  if 0 not in ckpt.all_steps():
    return None
  abstract = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
    state.params,
    state_sharding.params,
  )
  return checkpoint_lib.restore_params(ckpt.directory, 0, abstract)


def frozen_control(config, batch, runner, scorer, params, rng) -> dict[str, float]:
  """`control/*` reward means of the step's first prompt batch rolled out with the
  frozen warm start and the same sampling streams as the policy's rollout, so the
  per-step difference to `reward/*` cancels which prompts were drawn."""
  _, scores = rollout_and_score(config, batch, runner, scorer, params, rng)
  return {f"control/{k}": float(np.mean(v)) for k, v in scores.items() if v.dtype.kind == "f"}


def assemble_rows(config, drawn) -> tuple[dict, np.ndarray]:
  """Training rows of exactly `batch_size` groups from the drawn rollouts.

  With DAPO dynamic sampling, groups with reward variance come first and any
  zero-variance group that still has to fill the batch is masked out of the loss
  (static shapes; the loss's token count excludes it, as if dropped). With
  overlong masking, truncated trajectories are masked out too.

  Returns:
    (rows, bool [groups] whether each kept group trains), this process's share.
  """
  n, p = config.rollout.group_size, prompts_per_process(config)
  parts = []
  for batch, eps, scores in drawn:
    rows = training_rows(episodes_lib.rollout_batch(batch), eps.out, n)
    rows["advantages"] = scores["advantages"].astype(np.float32)
    if config.dapo.overlong_mask:
      # Not in place: the mask can be a read-only view of a device array.
      rows["loss_mask"] = rows["loss_mask"] & ~scores["truncated"].astype(bool)[:, None]
    parts.append((rows, ~scores["zero_variance"].reshape(-1, n)[:, 0]))
  rows = {k: np.concatenate([r[k] for r, _ in parts]) for k in parts[0][0]}
  trains = np.concatenate([t for _, t in parts])  # [groups]
  if config.dapo.filter_groups:
    order = np.argsort(~trains, kind="stable")[:p]  # useful groups first
    trains = trains[order]
  else:
    order, trains = np.arange(p), np.ones(p, bool)
  take = (order[:, None] * n + np.arange(n)).reshape(-1)  # the rows of those groups
  rows = {k: v[take] for k, v in rows.items()}
  rows["loss_mask"] = rows["loss_mask"] & np.repeat(trains, n)[:, None]
  return rows, trains


def grpo_step(config, state, rows, update_fn, rng, mesh, ref=None) -> tuple[Any, dict]:
  """`loss.mini_batches` updates over the rows; metrics averaged over them."""
  if ref is not None:  # KL to the frozen reference policy.
    ref_params, ref_fn = ref
    rows = dict(rows)
    rows["ref_logprobs"] = np.concatenate(
      [
        sharding.local_rows(ref_fn(ref_params, sharding.shard_batch(mb, mesh)))
        for mb in split_mini_batches(rows, config.loss.mini_batches)
      ]
    )
  metrics = []
  for i, mb in enumerate(split_mini_batches(rows, config.loss.mini_batches)):
    state, m = update_fn(state, sharding.shard_batch(mb, mesh), jax.random.fold_in(rng, i))
    metrics.append(m)
  metrics = jax.device_get(metrics)
  out = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
  skipped = sum(float(m["skipped"]) for m in metrics)
  if skipped == len(metrics):
    raise FloatingPointError(
      f"Every update of this step had a non-finite gradient norm ({metrics[0]['grad_norm']})."
    )
  return state, out


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def build_components(config, tokenizer, model_cfg) -> dict[str, Any]:
  """Data, search, bridge, rollout runners and scorers of a run (shared with evaluate)."""
  shapes = episodes_lib.shapes_from_config(config, model_cfg)
  encoder = episodes_lib.PromptEncoder(tokenizer, model_cfg, shapes)
  okvos_dir, kb_dir = pipeline.resolve_data(config.data, config.workdir, config.seed)
  backend = make_search_backend(config, kb_dir)
  bridge = make_bridge(config, backend, tokenizer, shapes)
  eval_bridge = bridge
  if eval_search_config(config) is not config:
    eval_backend = make_search_backend(eval_search_config(config), kb_dir)
    eval_bridge = make_bridge(config, eval_backend, tokenizer, shapes)
  mask_cache_dir = None
  if config.reward.mask_weight > 0:  # The mask reward reads precomputed IoU tables.
    from segresearch_jax.tools import build_mask_cache

    mask_cache_dir = build_mask_cache.build(config, config.data.train_split)
  rcfg = episodes_lib.rollout_config(config, model_cfg, shapes, tokenizer)
  eval_rcfg = episodes_lib.rollout_config(
    config, model_cfg, shapes, tokenizer, group_size=1, temperature=0.0
  )
  return dict(
    model_cfg=model_cfg,
    shapes=shapes,
    encoder=encoder,
    okvos_dir=okvos_dir,
    kb_dir=kb_dir,
    bridge=bridge,
    rcfg=rcfg,
    mask_cache_dir=mask_cache_dir,
    runner=episodes_lib.Runner(model_cfg, rcfg, shapes, tokenizer, bridge),
    eval_runner=episodes_lib.Runner(model_cfg, eval_rcfg, shapes, tokenizer, eval_bridge),
    scorer=Scorer(config, config.rollout.group_size, model_cfg.coord_convention, mask=True),
    eval_scorer=Scorer(config, 1, model_cfg.coord_convention),
    # (dataset, source): the source names the samples the pipeline skipped.
    eval_dataset=lambda: make_dataset(
      config,
      okvos_dir,
      config.data.eval_split,
      encoder,
      train=False,
      batch_size=config.batch_size,
      whole=True,
    ),
  )


def eval_search_config(config):
  """The config evaluation builds its search backend from: `config` itself when
  `eval.search` is "" or the training backend, else a copy with `search.backend`
  replaced (the other `search` settings kept)."""
  if config.eval.search in ("", config.search.backend):
    return config
  copy = config.copy_and_resolve_references()
  copy.search.backend = config.eval.search
  return copy


def train(config) -> dict:
  """Runs the configured job; returns the summary it also writes to `workdir/summary.json`."""
  from segresearch_jax import evaluate  # evaluate imports this module.

  if config.dry_run:  # Abstract arrays only: the plan of the configured mesh.
    from segresearch_jax.tools import plan as plan_tool

    text = plan_tool.run_plan(config)
    print(text)
    return {"plan": text}
  mesh = sharding.make_mesh(config.mesh)
  check_config(config, mesh)
  t_start = time.time()
  # Several processes: each rolls out its share of the prompts on its own devices,
  # updates run over the global mesh, process 0 logs and evaluates.
  main = jax.process_index() == 0
  log = functools.partial(print, flush=True) if main else lambda *a, **k: None
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  # 1. Policy, data, search.
  with sharding.main_process_first("tokenizer"):  # The embedded tokenizer is cached on disk.
    tokenizer = load_run_tokenizer(config)
  model_cfg, params = build_policy(config, tokenizer, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(
    f"policy {model_cfg.family} ({config.model.hf_dir or config.model.preset}): "
    f"{n_params / 1e6:.2f}M parameters, vocab {model_cfg.text.vocab_size}; mesh "
    f"{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)"
    + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
  )
  with sharding.main_process_first("components"):  # Synthetic data and mask cache files.
    c = build_components(config, tokenizer, model_cfg)
  n, rcfg, runner = config.rollout.group_size, c["rcfg"], c["runner"]
  train_ds, train_source = make_dataset(
    config,
    c["okvos_dir"],
    config.data.train_split,
    c["encoder"],
    train=True,
    batch_size=prompts_per_process(config),
    mask_cache_dir=c["mask_cache_dir"],
  )
  log(
    f"data: {len(train_source)} {config.data.train_split} samples in {c['okvos_dir']}; "
    f"search: {config.search.backend} over {config.search.kb_dir or c['kb_dir'] or '-'}"
  )
  data_iter = iter(train_ds)
  optimizer, update_fn = make_update(config, model_cfg, rcfg)
  writer = metrics_lib.MetricsWriter(workdir, config.total_steps)
  ckpt = checkpoint_lib.Checkpointer(
    workdir / "checkpoints", keep=config.checkpoint.keep, save_every=config.checkpoint.every_steps
  )
  metadata = checkpoint_lib.make_metadata(model_cfg, config, tokenizer)
  rng = jax.random.PRNGKey(config.seed)

  # 2. Resume from the latest checkpoint, or warm-start and save step 0.
  latest = ckpt.latest_step()
  if latest is None:
    if config.sft.steps > 0:
      t0 = time.time()
      expert_ds, _ = make_dataset(
        config, c["okvos_dir"], config.data.train_split, c["encoder"], train=False, batch_size=1
      )
      data = expert_rows(config, expert_ds, runner, model_cfg, c["shapes"])
      log(
        f"warm start: {len(data['prompt_ids'])} expert episodes "
        f"({time.time() - t0:.1f}s), {config.sft.steps} supervised steps"
      )
      params = warm_start(config, params, data, model_cfg, rcfg, mesh, writer)
    state, state_sharding = sharded_state(params, optimizer, mesh, config)
    ckpt.save(0, state, rng, data_iter, metadata, force=True)
    start = 0
  else:
    state, state_sharding = sharded_state(params, optimizer, mesh, config)
    abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sharding
    )
    del state
    start, state, rng, _ = ckpt.restore_latest(abstract, data_iter, log=log)
    writer.truncate_after(start)
    log(f"resumed from step {start} in {ckpt.directory}")
  params = None  # The train state owns the parameters from here on.
  update_fn = jit_update(update_fn, mesh, state_sharding)
  # The warm start (step 0): the KL reference and the frozen control policy.
  initial = None
  if config.loss.kl_coef > 0 or config.eval.frozen_control:
    initial = initial_params(ckpt, state, state_sharding, start)
    if initial is None:
      where = f"step 0 is no longer in {ckpt.directory}"
      log(f"{where}: the KL reference and the frozen control start from step {start}")
      initial = jax.tree.map(jnp.copy, state.params)
  ref = None
  if config.loss.kl_coef > 0:
    # Rows out as they came in: `sharding.local_rows` reads this process's share back.
    ref_fn = jax.jit(make_logprob_fn(model_cfg, rcfg), out_shardings=sharding.batch_sharding(mesh))
    ref = (initial, lambda p, mb: ref_fn(p, mb)[0])
  control_params = sharding.local_copy(initial) if config.eval.frozen_control else None

  # 3. GRPO steps.
  writer.start(start)
  head_width = 0  # the widest `token_index` so far (see `with_token_index`)
  for step in range(start + 1, config.total_steps + 1):
    t0 = time.time()
    step_rng = jax.random.fold_in(rng, step)
    drawn = collect_rollouts(
      config,
      next(data_iter),
      data_iter,
      runner,
      c["scorer"],
      sharding.local_copy(state.params),
      step_rng,
    )
    t_rollout = time.time() - t0
    rows, trains = assemble_rows(config, drawn)
    rows = with_token_index(rows, min_width=head_width)
    head_width = rows["token_index"].shape[1]
    state, m = grpo_step(config, state, rows, update_fn, step_rng, mesh, ref)
    batch, eps, scores = drawn[0]
    local = episode_metrics(eps, scores)
    local.update({"dapo/rollout_batches": len(drawn), "dapo/groups_trained": np.mean(trains)})
    if control_params is not None:
      local.update(frozen_control(config, batch, runner, c["scorer"], control_params, step_rng))
    m.update(sharding.process_mean(local))
    m.update({"time/step_s": time.time() - t0, "time/rollout_s": t_rollout})
    write_records(workdir / "trajectories", step, tokenizer, batch, eps, scores, n)
    if step % config.log_every == 0 or step == config.total_steps:
      writer.write(
        step,
        m,
        console=(
          f"step {step}/{config.total_steps} | reward {m['reward/score']:.3f} "
          + (f"(frozen {m['control/score']:.3f}) " if "control/score" in m else "")
          + f"(outcome {sum(m['reward/' + k] for k in evaluate.OUTCOME_TERMS):.2f}, "
          f"process {m['reward/process_score']:.2f}) | search/traj "
          f"{m['search/per_trajectory']:.2f} | len {m['response_length']:.0f} | "
          f"loss {m['loss']:+.4f} | clip {m['clip_fraction']:.3f} | "
          f"{m['time/step_s']:.1f}s/step | ETA {writer.eta(step)}"
        ),
      )
    ckpt.save(step, state, rng, data_iter, metadata, force=step == config.total_steps)
    if (
      config.eval.every_steps and step % config.eval.every_steps == 0 and step < config.total_steps
    ):
      params = sharding.local_copy(state.params)
      if main:
        dataset, source = c["eval_dataset"]()
        val, _ = evaluate.greedy_episodes(
          config, params, dataset, c["eval_runner"], c["eval_scorer"], source=source
        )
        writer.write(step, val, phase="eval", console=f"eval @ {step}: {_short(val)}")
      sharding.barrier(f"eval {step}")
  ckpt.close()  # Collective: before process 0 goes on alone.

  # 4. Final evaluation on the held-out split, with and without search (process 0).
  params = sharding.local_copy(state.params)
  if not main:
    return {}
  summary = {"steps": config.total_steps, "parameters": int(n_params)}
  final = config.total_steps
  with_search = evaluate.evaluate(config, params, c, workdir / "eval", masks=config.eval.masks)
  without = evaluate.evaluate(
    config, params, c, workdir / "eval_no_search", search=False, masks=config.eval.masks
  )
  writer.write(final, with_search, phase="eval")
  writer.write(final, without, phase="eval_no_search")
  print(
    f"evaluation on {config.data.eval_split} ({with_search['samples']} samples, greedy, "
    f"segmenter {config.eval.segmenter}):"
  )
  print(evaluate.format_comparison(with_search, without), flush=True)
  for failure in with_search["failures"]:
    print(f"failed (scored 0): {failure['id']}: {failure['error']}", flush=True)
  train_rows = writer.read("train")
  if train_rows:
    summary["reward_first_steps"] = float(np.mean([r["reward/score"] for r in train_rows[:5]]))
    summary["reward_last_steps"] = float(np.mean([r["reward/score"] for r in train_rows[-5:]]))
    paired = [r for r in train_rows if "control/score" in r]
    if len(paired) > 1:
      gain = paired_gain(paired)
      summary["reward_minus_frozen"] = gain
      text = ", ".join(f"{k} {mean:+.3f} +- {se:.3f}" for k, (mean, se) in gain.items())
      print(f"reward - frozen warm start on the same prompts (mean +- se): {text}", flush=True)
    plot_rewards(train_rows, workdir / "reward_curve.png", writer.read("eval"))
  summary.update(
    eval_with_search=with_search,
    eval_without_search=without,
    wall_time_s=time.time() - t_start,
  )
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  writer.close()
  print(f"done in {metrics_lib.format_duration(time.time() - t_start)}; outputs in {workdir}")
  return summary


def _short(m: Mapping[str, float]) -> str:
  return ", ".join(
    f"{k} {m[k]:.3f}" for k in ("score", "outcome", "val/reward", "search/per_trajectory") if k in m
  )


def paired_gain(rows: list[dict]) -> dict[str, tuple[float, float]]:
  """(mean, standard error) of `reward/score - control/score` over all logged steps
  (at least 2) and, from 4 steps on, over their second half ("steps A-B" keys)."""
  steps = np.array([r["step"] for r in rows])
  diff = np.array([r["reward/score"] - r["control/score"] for r in rows], float)
  starts = (0, len(diff) // 2) if len(diff) >= 4 else (0,)
  return {f"steps {steps[lo]}-{steps[-1]}": compare_runs.mean_se(diff[lo:]) for lo in starts}


def plot_rewards(
  rows: list[dict], path: pathlib.Path, eval_rows: list[dict] | None = None, window: int = 5
) -> None:
  """Mean reward over GRPO steps: per step, its running mean, the outcome / process
  parts, and the held-out greedy score of each evaluation (`eval_rows`) if any.

  With a few prompts per step, which prompts were drawn moves the per-step mean more
  than the policy does; the running mean over `window` steps shows the trend.
  """
  import matplotlib

  from segresearch_jax.evaluate import OUTCOME_TERMS

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = np.array([r["step"] for r in rows])
  score = np.array([r["reward/score"] for r in rows], float)
  control = np.array([r.get("control/score", np.nan) for r in rows], float)
  paired = bool(np.isfinite(control).all())
  if paired:
    fig, (ax, dax) = plt.subplots(
      2, 1, figsize=(7, 4), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
  else:
    fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, score, label="reward (score)", lw=1.2, color="C0")
  if paired:
    ax.plot(steps, control, label="frozen warm start, same prompts", lw=1.2, color="0.55")
  if len(score) >= window:
    running = np.convolve(score, np.ones(window) / window, mode="valid")
    ax.plot(
      steps[window - 1 :], running, label=f"reward, mean of {window} steps", lw=2.5, color="#0b2f6b"
    )
  ax.plot(
    steps,
    [sum(r[f"reward/{k}"] for k in OUTCOME_TERMS) for r in rows],
    label="outcome terms",
    color="C1",
  )
  ax.plot(steps, [r["reward/process_score"] for r in rows], label="process term", color="C2")
  held_out = [r for r in eval_rows or () if "score" in r]
  if held_out:
    ax.plot(
      [r["step"] for r in held_out],
      [r["score"] for r in held_out],
      "s--",
      color="C3",
      label="held-out score (greedy)",
    )
  ax.set_ylabel("mean over rollouts")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7 if paired else 8)
  if paired:  # The prompt draw cancels in the per-step difference.
    diff = score - control
    dax.axhline(0.0, color="0.4", lw=0.8)
    dax.bar(steps, diff, color="C0", alpha=0.35, label="reward - frozen, per step")
    mean_so_far = np.cumsum(diff) / np.arange(1, len(diff) + 1)
    dax.plot(steps, mean_so_far, color="#0b2f6b", lw=2, label="mean so far")
    dax.set_ylabel("policy - frozen")
    dax.grid(alpha=0.3)
    dax.legend(fontsize=7)
    ax = dax
  ax.set_xlabel("GRPO step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def enable_compilation_cache(config) -> None:
  """Persists compiled programs under `config.compilation_cache_dir` (keyed by the HLO)."""
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def quiet_logging() -> None:
  """absl at WARNING unless --verbosity is given (Orbax logs every file it renames)."""
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("bm25s").setLevel(logging.WARNING)


def main(argv: list[str]) -> None:
  del argv
  config = _FLAGS["config"].value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/okvos.py")
  quiet_logging()
  initialize_distributed()
  enable_compilation_cache(config)
  train(config)


if __name__ == "__main__":
  define_flags()
  app.run(main)
