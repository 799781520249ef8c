"""Prefill, cached greedy decoding and per-token log-probs for the policy.

These are the model-level building blocks the rollout and the GRPO loss use:
`prefill_prompt` starts a KV cache from a (left-padded) prompt, `prefill` appends
a chunk to a cache, `decode_step` appends one token per row (`greedy_decode` loops
it, `greedy_generate` does prompt and loop in one program), and `token_logprobs`
returns log p(token) along a sequence without materialising the [B, L, V] logits
at once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from segresearch_jax.models.config import ModelConfig
from segresearch_jax.models.policy import Cache, Policy

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
  args = (input_ids, positions, token_valid, visual, deepstack, cache)
  return _chunk_logits(params, config, args, logits_at)


def _chunk_logits(
  params: Any, config: ModelConfig, args: tuple, logits_at: Array | None, **kwargs: Any
) -> tuple[Array, Cache]:
  """`Policy` on a chunk; with `logits_at`, the LM head on one position per row only."""
  model = Policy(config)
  if logits_at is None:
    return model.apply({"params": params}, *args, **kwargs)
  hidden, cache = model.apply({"params": params}, *args, return_hidden=True, **kwargs)
  last = jnp.take_along_axis(hidden, logits_at[:, None, None], axis=1)[:, 0]
  return model.apply({"params": params}, last, method=Policy.logits), cache


def prefill_prompt(
  params: Any,
  config: ModelConfig,
  cache_length: int,
  input_ids: Array,
  positions: Array,
  token_valid: Array,
  visual: Array | None = None,
  deepstack: Array | None = None,
  *,
  logits_at: Array | None = None,
) -> tuple[Array, Cache]:
  """A new cache of `cache_length` slots holding a prompt, and the prompt's logits.

  Equal to `prefill` into `init_cache(config, B, cache_length)`, but the prompt
  attends causally to itself instead of to every (still empty) slot of the cache.

  Args:
    logits_at: as in `prefill`.

  Returns:
    (logits [B, T, V] or [B, V], the new cache).
  """
  args = (input_ids, positions, token_valid, visual, deepstack)
  return _chunk_logits(params, config, args, logits_at, new_cache_length=cache_length)


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
  positions = jnp.broadcast_to(next_pos[:, None, None], (tokens.shape[0], 3, 1))
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
  # Left-padded: the last position is real in every row, and only its logits are needed.
  last = jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1, jnp.int32)
  logits, cache = prefill_prompt(
    params,
    config,
    cache_length,
    input_ids,
    positions,
    token_valid,
    visual,
    deepstack,
    logits_at=last,
  )
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  rest = greedy_decode(
    params, config, cache, first, next_pos, steps=max_new_tokens - 1, eos_id=eos_id
  )
  return jnp.concatenate([first[:, None], rest], axis=1)


def greedy_decode(
  params: Any,
  config: ModelConfig,
  cache: Cache,
  first: Array,
  next_pos: Array,
  *,
  steps: int,
  eos_id: int = -1,
) -> Array:
  """The decode loop of `greedy_generate`: `steps` greedy tokens after `first`.

  Args:
    cache: the cache holding the prompt (e.g. from `prefill_prompt`).
    first: [B] the token sampled from the prompt's last logits (not yet in the cache).
    next_pos: [B] its M-RoPE position.

  Returns:
    [B, steps] tokens; after a row emits `eos_id` it repeats it.
  """

  def step(carry, _):
    cache, token, pos, done = carry
    logits, cache = decode_step(params, config, cache, token, pos)
    nxt = jnp.where(done, token, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return (cache, nxt, pos + 1, done | (nxt == eos_id)), nxt

  init = (cache, first.astype(jnp.int32), next_pos.astype(jnp.int32), first == eos_id)
  _, rest = jax.lax.scan(step, init, None, length=steps)
  return rest.T


def token_logprobs(
  params: Any,
  config: ModelConfig,
  input_ids: Array,
  positions: Array,
  token_valid: Array,
  visual: Array | None = None,
  deepstack: Array | None = None,
  *,
  start: int = 0,
  index: Array | None = None,
  chunk_size: int = 256,
  temperature: float = 1.0,
  banned_ids: tuple[int, ...] = (),
  return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
  """log p(input_ids[:, t] | input_ids[:, :t]) for t >= start; position 0 gets 0.

  The LM head and softmax run over sequence chunks and the backward recomputes each
  chunk's logits, so neither pass holds the full [B, L, V] logits, and
  only over the positions asked for: `start` (e.g. the response after a prompt) or
  `index` (e.g. only the generated tokens of a response that also holds tool
  observations, which GRPO never trains on).
  `temperature` and `banned_ids` must match the sampler's (see `rollout.RolloutConfig`).

  Args:
    index: int [B, K] or None: the target positions, each in [1, L) (entries
      outside it are clipped there: mask them out). Overrides `start`.

  Returns:
    [B, L - start] log-probs of tokens start..L-1, or [B, K] of the tokens at
    `index` (and the entropies of the distributions that predict them if asked).
  """
  model = Policy(config)
  hidden, _ = model.apply(
    {"params": params}, input_ids, positions, token_valid, visual, deepstack, return_hidden=True
  )
  b, length, d = hidden.shape
  if index is not None:
    index = jnp.clip(index, 1, length - 1)
    hidden = jnp.take_along_axis(hidden, (index - 1)[..., None], axis=1)  # [B, K, D]
    targets = jnp.take_along_axis(input_ids, index, axis=1)
    count = index.shape[1]
  else:
    if not 0 <= start < length:
      raise ValueError(f"start={start} is outside a sequence of {length} tokens.")
    first = max(start, 1)  # Token 0 has no prefix.
    hidden = hidden[:, first - 1 : length - 1]  # The hidden state before each target.
    targets = input_ids[:, first:]
    count = length - first
  pad = (-count) % chunk_size if count > chunk_size else 0
  size = min(chunk_size, count)
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = hidden.shape[1] // size
  hidden = hidden.reshape(b, n, size, d).swapaxes(0, 1)  # [n, B, c, D]
  targets = targets.reshape(b, n, size).swapaxes(0, 1)  # [n, B, c]

  head = _head_matrix(params, config)
  chunk = lambda h, tgt: _head_logprobs(h, head, tgt, temperature, tuple(banned_ids))
  picked, entropy = jax.lax.map(lambda xs: chunk(*xs), (hidden, targets))
  picked = picked.swapaxes(0, 1).reshape(b, -1)[:, :count]
  entropy = entropy.swapaxes(0, 1).reshape(b, -1)[:, :count]
  if index is None and start == 0:
    picked = jnp.concatenate([jnp.zeros((b, 1), picked.dtype), picked], axis=1)
    entropy = jnp.concatenate([jnp.zeros((b, 1), entropy.dtype), entropy], axis=1)
  return (picked, entropy) if return_entropy else picked


def _head_matrix(params: Any, config: ModelConfig) -> Array:
  """The LM head as a [D, V] matrix (`Policy.logits`): the tied embedding's transpose
  or the untied `lm_head` kernel."""
  if config.text.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def _head_forward(h, head, temperature, banned_ids):
  """(logits / temperature - row max, log normaliser) of one chunk, h [B, c, D]."""
  # A bf16 model multiplies in bf16 (fp32 master weights cast) and accumulates in fp32.
  logits = jnp.einsum("bcd,dv->bcv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
  if banned_ids:
    logits = logits.at[..., list(banned_ids)].set(-1e30)
  shifted = logits / temperature
  shifted = shifted - jnp.max(shifted, axis=-1, keepdims=True)
  return shifted, jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_logprobs(h, head, targets, temperature, banned_ids):
  """(log p(target), entropy) [B, c] of one chunk: h [B, c, D], head [D, V].

  The [B, c, V] logits live only inside the chunk: the backward recomputes them (as
  `jax.checkpoint` would) and writes the head's gradient as h^T @ d logits, a plain
  [D, B c] x [B c, V] product; autodiff's form transposes the [B c, V] logit
  gradient first, the largest copy of a CPU training step.
  """
  return _head_logprobs_fwd(h, head, targets, temperature, banned_ids)[0]


def _head_logprobs_fwd(h, head, targets, temperature, banned_ids):
  shifted, log_z = _head_forward(h, head, temperature, banned_ids)
  logp = shifted - log_z
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return (picked, entropy), (h, head, targets, entropy)


def _head_logprobs_bwd(temperature, banned_ids, residuals, cotangents):
  h, head, targets, entropy = residuals
  d_picked, d_entropy = (c[..., None] for c in cotangents)
  shifted, log_z = _head_forward(h, head, temperature, banned_ids)
  logp = shifted - log_z
  p = jnp.exp(logp)
  # d picked / d x = onehot - p;  d entropy / d x = -p (log p + entropy); x = logits / T.
  hit = jnp.arange(logp.shape[-1]) == targets[..., None]
  d_x = jnp.where(hit, d_picked, 0.0) - p * (d_picked + d_entropy * (logp + entropy[..., None]))
  if banned_ids:  # their logits were overwritten: no gradient reaches the head there
    keep = jnp.ones(logp.shape[-1], bool).at[jnp.asarray(banned_ids)].set(False)
    d_x = jnp.where(keep, d_x, 0.0)
  d_logits = d_x / temperature
  d_h = jnp.einsum("bcv,dv->bcd", d_logits, head.astype(jnp.float32)).astype(h.dtype)
  d_head = jnp.einsum("bcd,bcv->dv", h.astype(jnp.float32), d_logits).astype(head.dtype)
  return d_h, d_head, None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)
