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
from segresearch_jax import sharding
from segresearch_jax.agent import rollout
from segresearch_jax.models import decoding
from segresearch_jax.rl import losses
from segresearch_jax.rl import rows as rows_lib
from segresearch_jax.rl import update as update_lib


def make_logprob_fn(model_cfg, rcfg: rollout.RolloutConfig):
  """`logprob_fn(params, rows) -> (logp [B, R], entropy [B, R])` over response tokens.

  Visual tokens are rebuilt from pixels inside, so the gradient reaches the vision
  tower; temperature and banned ids match the sampler's (their log-probs agree).
  With `rows.token_index` (see `rows.with_token_index`) the LM head runs only at those
  response positions and every other position gets 0.
  """
  temperature = rcfg.temperature if rcfg.temperature > 0 else 1.0
  cfg = dataclasses.replace(rcfg, group_size=1)

  def logprob_fn(params, rows: rows_lib.TrainingRows):
    prompts = rollout.PromptBatch(
      **{k: getattr(rows, k) for k in rows_lib.PROMPT_INPUTS}, next_pos=None
    )
    inputs = rollout.training_inputs(params, model_cfg, cfg, prompts, rows)
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


def make_update(config, model_cfg, rcfg, *, sft: bool = False):
  """(optimizer, update_fn) for GRPO or the supervised warm start; see `jit_update`.

  The warm-up counts training steps, as the official schedule (stepped once per step)
  does; a GRPO step applies `loss.mini_batches` updates, a warm-start step one
  (`update.OptimizerConfig.from_config`).
  """
  optim_cfg = update_lib.OptimizerConfig.from_config(config, sft=sft)
  schedule = optim_cfg.schedule()
  optimizer = update_lib.make_optimizer(optim_cfg)
  loss_cfg = losses.LossConfig.from_config(config.loss)
  if sft:  # Cross-entropy on the expert tokens: no KL or entropy term.
    loss_cfg = dataclasses.replace(loss_cfg, kl_coef=0.0, entropy_coef=0.0)
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


def sharded_state(params, optimizer, mesh, config) -> tuple[Any, Any]:
  """(train state born sharded, its sharding tree): optimizer moments follow the params."""
  init = lambda p: update_lib.init_state(p, optimizer)
  abstract = jax.eval_shape(init, params)
  shardings = sharding.state_shardings(
    abstract, components_lib.param_sharding(config, mesh, params)
  )
  return sharding.create_sharded(init, params, shardings=shardings), shardings
