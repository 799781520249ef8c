"""The jitted update of a run: log-probs, optimizer and schedule, sharded train state.

    optimizer, update_fn = steps.make_update(config, model_cfg, rcfg)
    state, state_sharding = steps.sharded_state(params, optimizer, mesh, config)
    update_fn = steps.jit_update(update_fn, mesh, state_sharding)
    state, metrics = update_fn(state, sharding.shard_batch(rows, mesh), rng)

The GRPO math (`rl/`) takes `logprob_fn` as an argument; this module builds it from
the policy and the rollout settings and wires the config's loss and optimizer
settings in. Shared by the trainer, the warm start, `tools/aot.py` and the benchmarks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from segresearch_jax import components as components_lib
from segresearch_jax import protocol, sharding
from segresearch_jax.agent import rollout
from segresearch_jax.models import decoding, policy
from segresearch_jax.rl import losses
from segresearch_jax.rl import rows as rows_lib
from segresearch_jax.rl import update as update_lib


def training_inputs(
  params: Any, model_cfg, rcfg: rollout.RolloutConfig, rows: rows_lib.TrainingRows, group: int = 1
) -> tuple[Any, Any, Any, Any, Any]:
  """Prompt + response of each row as one sequence for `decoding.token_logprobs`.

  Visual tokens are rebuilt from pixels (so gradients reach the vision tower): the
  shown frames, then, per observation turn in order, the image `obs_image` names (a
  keyframe's high-resolution copy or an image_search result). Each image is encoded
  once: the shown frames once per `group` consecutive rows (the rows of one prompt:
  they repeat its frames), the keyframes and search results as `rows` hold them (all
  of them as built, only those used after `rows.fit_rows`).

  Returns:
    (input_ids [B, L], positions [B, 3, L], token_valid [B, L], visual [B, Nv, D],
    deepstack [n_ds, B, Nv, D]) with L = prompt + response length of `rows`.
  """
  model = policy.Policy(model_cfg)
  b, f = rows.frame_patches.shape[:2]
  if b % group:
    raise ValueError(f"{b} rows do not form groups of {group} consecutive rows.")
  merge = model_cfg.vision.spatial_merge_size
  encode = lambda x, g: model.apply(
    {"params": params}, x, (g[0] * merge, g[1] * merge), method=policy.Policy.encode_images
  )

  # Shown frames: one row of each group. [B, F * Nf, D], [n_ds, B, F * Nf, D]
  pf = rows.frame_patches[::group]
  frame_tok, frame_ds = encode(pf.reshape(-1, *pf.shape[2:]), rcfg.frame_grid)
  d, n_ds = frame_tok.shape[-1], frame_ds.shape[0]
  frame_tok = jnp.repeat(frame_tok.reshape(b // group, -1, d), group, axis=0)
  frame_ds = jnp.repeat(frame_ds.reshape(n_ds, b // group, -1, d), group, axis=1)

  # Observation images. [B, K, Nk, D] and [B, S, Ns, D] (deepstack [n_ds, B, K|S, N, D])
  def encode_rows(patches, grid):
    k = patches.shape[1]
    tok, ds = encode(patches.reshape(b * k, *patches.shape[2:]), grid)
    return tok.reshape(b, k, -1, d), ds.reshape(n_ds, b, k, -1, d)

  key_tok, key_ds = encode_rows(rows.keyframe_patches, rcfg.keyframe_grid)
  srch_tok, srch_ds = encode_rows(rows.search_patches, rcfg.search_grid)
  nk, ns = key_tok.shape[2], srch_tok.shape[2]
  width = max(nk, ns)
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, width - x.shape[-2]), (0, 0)])
  kind = rows.obs_kind  # [B, T]
  turns = kind.shape[1]
  is_key = kind == protocol.KEYFRAME_IMAGE
  key_of = jnp.clip(jnp.where(is_key, rows.obs_image, 0), 0, key_tok.shape[1] - 1)
  srch_of = jnp.clip(jnp.where(is_key, 0, rows.obs_image), 0, srch_tok.shape[1] - 1)
  take = lambda x, index, axis: jnp.take_along_axis(
    x, index.reshape(index.shape + (1,) * (x.ndim - index.ndim)), axis=axis
  )
  # Each turn's image tokens, [B, T, W, D] (and [n_ds, B, T, W, D]).
  obs_tok = jnp.where(
    is_key[..., None, None], take(pad(key_tok), key_of, 1), take(pad(srch_tok), srch_of, 1)
  )
  obs_ds = jnp.where(
    is_key[None, ..., None, None],
    take(pad(key_ds), key_of[None], 2),
    take(pad(srch_ds), srch_of[None], 2),
  )

  # Pack each row's observation images contiguously after its frames.
  n_tok = jnp.where(is_key, nk, jnp.where(kind == protocol.SEARCH_IMAGE, ns, 0))  # [B, T]
  starts = jnp.cumsum(n_tok, axis=1) - n_tok  # [B, T]
  j = jnp.arange(turns * width)[None]  # [1, T*W] position in the packed obs sequence
  t_of_j = jnp.sum(j[:, :, None] >= starts[:, None, :], axis=-1) - 1  # [B, T*W]
  t_of_j = jnp.clip(t_of_j, 0, turns - 1)
  src = t_of_j * width + (j - jnp.take_along_axis(starts, t_of_j, axis=1))
  src = jnp.clip(src, 0, turns * width - 1)
  packed = jnp.take_along_axis(obs_tok.reshape(b, turns * width, d), src[..., None], axis=1)
  packed_ds = jnp.take_along_axis(
    obs_ds.reshape(n_ds, b, turns * width, d), src[None, ..., None], axis=2
  )
  visual = jnp.concatenate([frame_tok, packed], axis=1)
  deepstack = jnp.concatenate([frame_ds, packed_ds], axis=2)

  input_ids = jnp.concatenate([rows.prompt_ids, rows.response_ids], axis=1)
  positions = jnp.concatenate([rows.prompt_positions, rows.response_positions], axis=2)
  valid = jnp.concatenate([rows.prompt_valid, rows.response_valid], axis=1)
  return input_ids, positions, valid, visual, deepstack


def make_logprob_fn(model_cfg, rcfg: rollout.RolloutConfig, group: int = 1):
  """`logprob_fn(params, rows) -> (logp [B, R], entropy [B, R])` over response tokens.

  Visual tokens are rebuilt from pixels inside (`training_inputs`; the shown frames
  once per `group` consecutive rows), so the gradient reaches the vision tower;
  temperature and banned ids match the sampler's (their log-probs agree). With
  `rows.token_index` (see `rows.fit_rows`) the LM head runs only at those response
  positions and every other position gets 0.
  """
  temperature = rcfg.temperature if rcfg.temperature > 0 else 1.0

  def logprob_fn(params, rows: rows_lib.TrainingRows):
    inputs = training_inputs(params, model_cfg, rcfg, rows, group)
    prompt_length = rows.prompt_ids.shape[1]
    index = rows.token_index
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
    b, r = rows.response_ids.shape
    scatter = lambda x: (
      jnp.zeros((b, r), x.dtype).at[jnp.arange(b)[:, None], index].set(x, mode="drop")
    )
    return scatter(logp), scatter(entropy)

  return logprob_fn


def make_update(config, model_cfg, rcfg, *, sft: bool = False, row_devices: int | None = None):
  """(optimizer, update_fn) for GRPO or the supervised warm start; see `jit_update`.

  The warm-up counts training steps, as the official schedule (stepped once per step)
  does; a GRPO step applies `loss.mini_batches` updates, a warm-start step one
  (`update.OptimizerConfig.from_config`). `row_devices` is the data x fsdp size of
  the mesh the update runs on (None: `config.mesh` over this machine's devices); it
  decides which rows can share one encoding of their frames (`rows.shared_frame_rows`).
  """
  optim_cfg = update_lib.OptimizerConfig.from_config(config, sft=sft)
  schedule = optim_cfg.schedule()
  optimizer = update_lib.make_optimizer(optim_cfg)
  loss_cfg = losses.LossConfig.from_config(config.loss)
  if sft:  # Cross-entropy on the expert tokens: no KL or entropy term.
    loss_cfg = dataclasses.replace(loss_cfg, kl_coef=0.0, entropy_coef=0.0)
  base_loss = losses.sft_loss if sft else losses.grpo_loss
  shared = 1
  if not sft:
    if row_devices is None:
      sizes = sharding.mesh_shape(config.mesh, jax.device_count())
      row_devices = sizes["data"] * sizes["fsdp"]
    shared = rows_lib.shared_frame_rows(
      config.rollout.group_size,
      config.loss.micro_batches,
      rows=config.batch_size * config.rollout.group_size // config.loss.mini_batches,
      row_devices=row_devices,
    )
  update_fn = update_lib.make_update_fn(
    make_logprob_fn(model_cfg, rcfg, shared),
    optimizer,
    loss_cfg,
    micro_batches=config.loss.micro_batches,
    schedule=schedule,
    loss_fn=base_loss,
    freeze_vision=optim_cfg.vision_lr_scale == 0,
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


def sharded_state(params, optimizer, mesh, config) -> tuple[Any, Any]:
  """(train state born sharded, its sharding tree): optimizer moments follow the params."""
  init = lambda p: update_lib.init_state(p, optimizer)
  abstract = jax.eval_shape(init, params)
  shardings = sharding.state_shardings(
    abstract, components_lib.param_sharding(config, mesh, params)
  )
  return sharding.create_sharded(init, params, shardings=shardings), shardings
