"""Prefill, cached greedy decoding and per-token log-probs for the policy.

These are the model-level building blocks the rollout and the GRPO loss use:
`prefill` fills a donated KV cache with a (left-padded) prompt, `decode_step`
appends one token per row, and `token_logprobs` returns log p(token) along a
sequence without materialising the [B, L, V] logits at once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from segresearch_jax.models.config import ModelConfig
from segresearch_jax.models.policy import Cache, Policy, init_cache

Array = jax.Array


def prefill(
  params: Any,
  config: ModelConfig,
  cache: Cache,
  input_ids: Array,
  positions: Array,
  token_valid: Array,
  visual: Array | None = None,
  deepstack: Array | None = None,
  *,
  logits_at: Array | None = None,
) -> tuple[Array, Cache]:
  """Appends a chunk to the cache.

  Args:
    logits_at: optional [B] chunk index per row. The LM head then runs on that one
      position per row and the logits are [B, V]; over a whole long prompt it is
      the most expensive matmul of the prefill (vocab x hidden per token).

  Returns:
    (logits [B, T, V] or [B, V], the new cache).
  """
  model = Policy(config)
  args = ({"params": params}, input_ids, positions, token_valid, visual, deepstack, cache)
  if logits_at is None:
    return model.apply(*args)
  hidden, cache = model.apply(*args, return_hidden=True)
  last = jnp.take_along_axis(hidden, logits_at[:, None, None], axis=1)[:, 0]
  return model.apply({"params": params}, last, method=Policy.logits), cache


def decode_step(
  params: Any, config: ModelConfig, cache: Cache, tokens: Array, next_pos: Array
) -> tuple[Array, Cache]:
  """One token per row at M-RoPE position `next_pos` (the same on all three axes).

  Args:
    tokens: [B] the last sampled tokens.
    next_pos: [B] their positions (index + rope_delta).

  Returns:
    (logits [B, V], new cache).
  """
  positions = jnp.broadcast_to(next_pos[None, :, None], (3, tokens.shape[0], 1))
  valid = jnp.ones((tokens.shape[0], 1), bool)
  logits, cache = prefill(params, config, cache, tokens[:, None], positions, valid)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_length"))
def greedy_generate(
  params: Any,
  config: ModelConfig,
  input_ids: Array,
  positions: Array,
  token_valid: Array,
  next_pos: Array,
  visual: Array | None,
  deepstack: Array | None,
  *,
  max_new_tokens: int,
  cache_length: int,
  eos_id: int = -1,
) -> Array:
  """Greedy decoding of a left-padded batch with a KV cache.

  Returns:
    [B, max_new_tokens] tokens; after a row emits `eos_id` it repeats it.
  """
  b = input_ids.shape[0]
  cache = init_cache(config, b, cache_length, jnp.float32)
  logits, cache = prefill(
    params, config, cache, input_ids, positions, token_valid, visual, deepstack
  )
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    cache, token, pos, done = carry
    logits, cache = decode_step(params, config, cache, token, pos)
    nxt = jnp.where(done, token, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return (cache, nxt, pos + 1, done | (nxt == eos_id)), nxt

  init = (cache, first, next_pos.astype(jnp.int32), first == eos_id)
  _, rest = jax.lax.scan(step, init, None, length=max_new_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def token_logprobs(
  params: Any,
  config: ModelConfig,
  input_ids: Array,
  positions: Array,
  token_valid: Array,
  visual: Array | None = None,
  deepstack: Array | None = None,
  *,
  chunk_size: int = 256,
  temperature: float = 1.0,
  banned_ids: tuple[int, ...] = (),
  return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
  """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1; position 0 gets 0.

  The LM head and softmax run over sequence chunks under `jax.checkpoint`, so
  neither the forward nor the backward pass holds the full [B, L, V] logits.
  `temperature` and `banned_ids` must match the sampler's (see `rollout.RolloutConfig`).

  Returns:
    [B, L] log-probs (and [B, L] entropies of the predicting distribution if asked).
  """
  model = Policy(config)
  hidden, _ = model.apply(
    {"params": params}, input_ids, positions, token_valid, visual, deepstack, return_hidden=True
  )
  b, length, d = hidden.shape
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
  pad = (-length) % chunk_size
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = hidden.shape[1] // chunk_size
  hidden = hidden.reshape(b, n, chunk_size, d).swapaxes(0, 1)  # [n, B, c, D]
  targets = targets.reshape(b, n, chunk_size).swapaxes(0, 1)  # [n, B, c]

  @jax.checkpoint
  def chunk(h, tgt):
    logits = model.apply({"params": params}, h, method=Policy.logits).astype(jnp.float32)
    if banned_ids:
      logits = logits.at[..., list(banned_ids)].set(-1e30)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    picked = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return picked, entropy

  picked, entropy = jax.lax.map(lambda xs: chunk(*xs), (hidden, targets))
  picked = picked.swapaxes(0, 1).reshape(b, -1)[:, :length]
  entropy = entropy.swapaxes(0, 1).reshape(b, -1)[:, :length]
  # Shift so that index t holds the log-prob of token t given its prefix.
  picked = jnp.concatenate([jnp.zeros((b, 1), picked.dtype), picked[:, :-1]], axis=1)
  entropy = jnp.concatenate([jnp.zeros((b, 1), entropy.dtype), entropy[:, :-1]], axis=1)
  return (picked, entropy) if return_entropy else picked
