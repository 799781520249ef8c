"""Multi-turn agent episodes in one compiled program (docs/method.md §1).

`make_rollout_fn` returns a jitted function that, for a batch of prompts x group
size, prefills each prompt (frames + text) once and copies its KV cache to the rows of
its group, then runs a `lax.while_loop` of decode steps. The cache holds
`RolloutConfig.cache_length` slots a row (the token budget
`rollout.max_episode_tokens`, in the model's compute dtype): an episode that reaches
it stops with `max_length`. Every step samples one token per active row; a row whose turn ends on an
action (`</search>` or `</keyframe>`) waits, and once any row waits, ONE
`io_callback` to the host serves every waiting row (search, keyframe lookup,
observation formatting and tokenisation happen there). The observation tokens are
written to the response (masked out of the loss) and prefilled into the KV cache at
each row's own offset, with the keyframe's high-resolution features (encoded once
per prompt for every shown frame) or the image_search result's features placed at
its `<|image_pad|>` tokens and M-RoPE positions continued as for a new image.

The output (a `RolloutOutput`) is what GRPO needs: response tokens, loss mask, the
sampler's log-probs, M-RoPE positions, the images each observation inserted, stop
reasons. `steps.training_inputs` turns training rows built from it into the arguments
of `decoding.token_logprobs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from segresearch_jax import protocol, sharding
from segresearch_jax.models import decoding, policy
from segresearch_jax.models.config import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static shapes and sampling settings of one compiled rollout program.

  No field has a default: the settings come from `config.rollout` (`from_config`), the
  token ids and image grids from the run's tokenizer and image shapes.
  """

  group_size: int
  max_turns: int
  max_response_length: int
  max_action_length: int
  max_obs_length: int
  temperature: float  # 0 = greedy.
  top_p: float
  top_k: int
  im_end_id: int
  # Merged-token grids (h, w) of the three image kinds (shown frames, keyframe, search image).
  frame_grid: tuple[int, int]
  keyframe_grid: tuple[int, int]
  search_grid: tuple[int, int]
  # Never sampled (e.g. <|image_pad|>, <|vision_start|>): a generated image token would
  # be taken for an image position. `decoding.token_logprobs` must ban the same ids.
  banned_ids: tuple[int, ...]
  # Rows prefilled together when observations arrive: the waiting rows are packed into
  # chunks of this many (rounded down to a divisor of the batch), so that an observation
  # for one row does not run the prefill on every row. 0 = a sixteenth of the batch
  # (on CPU, the embedded default's 32 rows: 1 or 2 rows per chunk are fastest, 4 are
  # 1.2x slower; at 16 rows, prefilling every row was 3x slower than 1-row chunks).
  observe_rows: int
  # KV-cache slots of one episode (padded prompt + response); an episode that reaches
  # it stops with `max_length`. 0 = the prompt's width + max_response_length.
  max_episode_tokens: int
  # Continuous batching: the episodes of a rollout run on this many slots (rows of the
  # decode loop); a slot whose episode ends takes the next pending one, so finished
  # episodes stop costing decode work. 0 = one slot per episode.
  slots: int

  @classmethod
  def from_config(
    cls,
    config: Any,
    shapes: Any,
    tokenizer: Any,
    *,
    group_size: int | None = None,
    temperature: float | None = None,
  ) -> RolloutConfig:
    """The settings of `config.rollout` for a run's image shapes (`episodes.EpisodeShapes`)
    and tokenizer; evaluation overrides the group size (1) and temperature (0, greedy)."""
    r = config.rollout
    return cls(
      group_size=r.group_size if group_size is None else group_size,
      max_turns=r.max_turns,
      max_response_length=r.max_response_length,
      max_action_length=r.max_action_length,
      max_obs_length=r.max_obs_length,
      temperature=r.temperature if temperature is None else temperature,
      top_p=r.top_p,
      top_k=r.top_k,
      im_end_id=tokenizer.im_end_id,
      frame_grid=shapes.merged_grid(shapes.frame_size),
      keyframe_grid=shapes.merged_grid(shapes.keyframe_size),
      search_grid=shapes.merged_grid(shapes.search_size),
      banned_ids=(tokenizer.image_pad_id, tokenizer.vision_start_id, tokenizer.vision_end_id),
      observe_rows=r.observe_rows,
      max_episode_tokens=r.max_episode_tokens,
      slots=r.slots,
    )

  def cache_length(self, prompt_length: int) -> int:
    """KV-cache slots per row for prompts padded to `prompt_length` tokens.

    Raises:
      ValueError: when the budget leaves no room for a response token.
    """
    slots = self.max_episode_tokens or prompt_length + self.max_response_length
    if slots <= prompt_length:
      raise ValueError(
        f"rollout.max_episode_tokens={self.max_episode_tokens} leaves no room for a "
        f"response after a {prompt_length}-token prompt; raise it above {prompt_length}."
      )
    return slots

  def slot_count(self, episodes: int) -> int:
    """Decode slots for a rollout of `episodes` episodes."""
    return min(self.slots or episodes, episodes)

  def observe_chunk(self, batch: int) -> int:
    """Rows per observation prefill for a rollout batch of `batch` rows."""
    want = self.observe_rows or max(1, batch // 16)
    return max(d for d in range(1, min(want, batch) + 1) if batch % d == 0)


def stop_patterns(tokenizer: Any, stop_strings: Sequence[str], max_len: int = 8) -> np.ndarray:
  """Token sequences that end a turn, right-aligned in a [K, max_len] array (-1 = any).

  A stop string can tokenise differently after different characters, so the
  patterns are the shortest token suffixes that decode to text ending with the
  string, collected over a few preceding contexts.
  """
  patterns = set()
  for s in stop_strings:
    for prefix in ("", " ", "\n", "  ", ". ", "} ", "]", "0 ", "a"):
      ids = tokenizer.encode(prefix + s)
      for k in range(1, len(ids) + 1):
        if tokenizer.decode(ids[-k:]).endswith(s):
          patterns.add(tuple(ids[-k:]))
          break
  width = max(max(map(len, patterns)), 1)
  if width > max_len:
    raise ValueError(f"A stop string needs {width} tokens; raise max_len above {max_len}.")
  out = np.full((len(patterns), width), -1, np.int32)
  for i, p in enumerate(sorted(patterns)):
    out[i, width - len(p) :] = p
  return out


def sample_tokens(
  logits: Array,
  rng: Array,
  cfg: RolloutConfig,
  row_ids: Array | None = None,
  row_keys: Array | None = None,
) -> Array:
  """Temperature / top-k / top-p sampling, greedy when temperature is 0. [B, V] -> [B].

  `row_ids` [B] and `row_keys` [B, key] (see `sample_categorical`) key each row's
  draw by its identity.
  """
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / cfg.temperature
  neg = jnp.finfo(jnp.float32).min
  if cfg.top_k > 0:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = jnp.cumsum(probs, axis=-1) - probs < cfg.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return sample_categorical(rng, logits, row_ids, row_keys)


# Vocabulary block of the two-level inverse-CDF sampler.
_SAMPLE_BLOCK = 256


def sample_categorical(
  rng: Array, logits: Array, row_ids: Array | None = None, row_keys: Array | None = None
) -> Array:
  """One draw per row from softmax(logits) by inverse-CDF sampling. [B, V] -> int32 [B].

  With `row_ids` [B], row r's uniform comes from `fold_in(rng, row_ids[r])`: a row's
  draw then depends on its id, not on the batch it runs in (a host running its share
  of a global batch draws what one host running all of it would). `row_keys` [B, key]
  replace `rng` per row (`fold_in(row_keys[r], row_ids[r])`): a row's draw then also
  does not depend on the step it is drawn at (continuous batching).

  The distribution of `jax.random.categorical` with one uniform per row instead of
  a Gumbel variate per vocabulary entry: on CPU, hashing B x V random bits every
  decode step costs more than the rest of the sampling. The cumulative sums run in
  two levels (blocks of the vocabulary, then inside the chosen block) so that fp32
  rounding stays at the level of one block sum. Tokens of zero probability (masked
  to the most negative float) are never drawn.
  """
  b, v = logits.shape
  size = min(_SAMPLE_BLOCK, v)
  pad = (-v) % size
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], max is 1
  weights = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, -1, size)  # [B, nb, size]
  block_cum = jnp.cumsum(jnp.sum(weights, axis=-1), axis=-1)  # [B, nb]
  if row_keys is not None:
    draw = lambda k, i: jax.random.uniform(jax.random.fold_in(k, i))
    uniform = jax.vmap(draw)(row_keys, row_ids)
  elif row_ids is None:
    uniform = jax.random.uniform(rng, (b,), jnp.float32)
  else:
    uniform = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(row_ids)
  target = uniform * block_cum[:, -1]
  # The drawn token is the first one whose cumulative weight exceeds `target`.
  block = _first_above(block_cum, target)  # [B]
  before = jnp.where(block > 0, _take(block_cum, block - 1), 0.0)
  in_block = jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0]  # [B, size]
  index = _first_above(jnp.cumsum(in_block, axis=-1), target - before)
  return (block * size + index).astype(jnp.int32)


def _first_above(cum: Array, target: Array) -> Array:
  """Index of the first entry of each row of `cum` [B, N] above `target` [B].

  If rounding puts `target` at or past the row total, the last entry with positive
  weight is returned, never a zero-weight one.
  """
  n = cum.shape[-1]
  first = jnp.sum(cum <= target[:, None], axis=-1).astype(jnp.int32)
  grows = jnp.diff(cum, axis=-1, prepend=0.0) > 0
  last_positive = jnp.max(jnp.where(grows, jnp.arange(n), 0), axis=-1).astype(jnp.int32)
  return jnp.minimum(first, last_positive)


def _take(x: Array, index: Array) -> Array:
  return jnp.take_along_axis(x, index[:, None], axis=1)[:, 0]


def _write_rows(buffer: Array, values: Array, starts: Array, axis: int = 0) -> Array:
  """buffer[b, starts[b] : starts[b] + n] = values[b] for every row (per-row offsets)."""
  return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, axis=axis))(
    buffer, values, starts
  )


def _read_rows(buffer: Array, starts: Array, size: int) -> Array:
  return jax.vmap(lambda c, s: jax.lax.dynamic_slice_in_dim(c, s, size, axis=0))(buffer, starts)


def observation_positions(
  obs_tokens: Array, obs_len: Array, start: Array, grid_h: Array, grid_w: Array, image_token_id: int
) -> tuple[Array, Array]:
  """M-RoPE positions [B, 3, O] for observation chunks holding at most one image each.

  Text continues the running index; the k-th image token gets
  (cur, cur + k // w, cur + k % w) and the index after the image jumps by max(h, w).

  Returns:
    (positions, next free position per row).
  """
  o = obs_tokens.shape[1]
  idx = jnp.arange(o)[None, :]
  real = idx < obs_len[:, None]
  is_img = (obs_tokens == image_token_id) & real
  img_before = jnp.cumsum(is_img, axis=1) - is_img  # image tokens strictly before i
  n_img = jnp.sum(is_img, axis=1, keepdims=True)
  jump = jnp.where(n_img > 0, jnp.maximum(grid_h, grid_w)[:, None], 0)
  text_before = idx - img_before
  after_image = (img_before == n_img) & (n_img > 0)
  t_pos = start[:, None] + text_before + jnp.where(after_image, jump, 0)
  cur = start[:, None] + text_before  # for an image token: text tokens before the image
  w = grid_w[:, None]
  h_pos = jnp.where(is_img, cur + img_before // w, t_pos)
  w_pos = jnp.where(is_img, cur + img_before % w, t_pos)
  t_pos = jnp.where(is_img, cur, t_pos)
  n_text = jnp.sum(real & ~is_img, axis=1)
  next_pos = start + n_text + jump[:, 0]
  return jnp.stack([t_pos, h_pos, w_pos], axis=1).astype(jnp.int32), next_pos.astype(jnp.int32)


@flax.struct.dataclass
class PromptBatch:
  """The per-prompt inputs of a rollout, one row per PROMPT (the rollout repeats each
  for its `group_size` rows); the pipeline's batches hold these fields and more.

  M-RoPE positions are [rows, 3, length] here and everywhere outside the model's
  rotary tables (`models.layers.mrope_tables`).
  """

  prompt_ids: Array  # [P, Lp] int32, left padded
  prompt_valid: Array  # [P, Lp] bool
  prompt_positions: Array  # [P, 3, Lp] int32 (T, H, W axes; 0 at padding)
  next_pos: Array | None  # [P] int32, the first response token's position; None in training
  frame_patches: Array  # [P, F, Pf, pd] float32, the shown frames
  keyframe_patches: Array  # [P, F, Pk, pd] float32, their high-resolution copies
  # [P] int32, each prompt's position in the global batch: row g of prompt p samples
  # from the stream of row `prompt_index[p] * n + g`; None = 0..P-1.
  prompt_index: Array | None = None
  # [B, K] int32 tokens to emit instead of sampling (-1 = sample); tests script a
  # policy with it without changing its log-probs. None = sample every token.
  forced_tokens: Array | None = None

  @classmethod
  def from_batch(cls, batch: Any) -> PromptBatch:
    """The rollout's fields of a pipeline batch (a mapping of numpy arrays)."""
    return cls(
      prompt_ids=np.asarray(batch["prompt_ids"]),
      prompt_valid=np.asarray(batch["prompt_valid"]),
      prompt_positions=np.asarray(batch["prompt_positions"]),
      next_pos=np.asarray(batch["next_pos"]),
      frame_patches=np.asarray(batch["frame_patches"]),
      keyframe_patches=np.asarray(batch["keyframe_patches"]),
    )


@flax.struct.dataclass
class RolloutOutput:
  """What a rollout returns, one row per TRAJECTORY (B = prompts x group size, a
  prompt's rows consecutive); device arrays from the rollout, numpy on the host
  (`episodes.Runner`, `episodes.expert_episode`). R = max_response_length, T =
  max_turns.
  """

  response_ids: Array  # [B, R] int32, actions and observations; 0 past the length
  response_positions: Array  # [B, 3, R] int32 M-RoPE positions (T, H, W axes)
  response_valid: Array  # [B, R] bool, inside the response
  loss_mask: Array  # [B, R] bool, generated (trained) tokens; observations are False
  logprobs: Array  # [B, R] float32, the sampler's log-probs; 0 past the length
  response_length: Array  # [B] int32
  stop_reason: Array  # [B] int32, an index into `protocol.STOP_REASONS`
  num_turns: Array  # [B] int32, observation turns taken
  obs_kind: Array  # [B, T] int32 per turn: NO_IMAGE, KEYFRAME_IMAGE or SEARCH_IMAGE
  obs_slot: Array  # [B, T] int32 per turn, the shown frame a keyframe picked
  search_patches: Array  # [B, T, Ps, pd] float32, each turn's image_search result
  # [] int32 decode-loop iterations (each computes one token per slot); None when
  # not from the rollout program.
  decode_steps: Array | None = None


HostFn = Callable[..., tuple[np.ndarray, ...]]


def bridge_host_fn(bridge: Any, image_cfg: Any, search_size: int) -> HostFn:
  """Adapts a `bridge.SearchBridge` to the rollout's host function.

  Rows are the bridge's row ids, so call `bridge.set_shown_frames` with one entry
  per ROW (prompts repeated `group_size` times) before each rollout. image_search
  pixels are cut into patches here, on the host, with the policy's processor.
  """
  from segresearch_jax.models import processor

  def host_fn(pending, actions, act_len):
    out = bridge.observe(pending, actions, act_len, np.arange(len(pending)))
    b = len(pending)
    patches = None
    for r in np.flatnonzero(np.asarray(out.image_kind) == protocol.SEARCH_IMAGE):
      p, _ = processor.preprocess_image(out.image_pixels[r], image_cfg, (search_size, search_size))
      if patches is None:
        patches = np.zeros((b, *p.shape), np.float32)
      patches[r] = p
    if patches is None:
      side = search_size // image_cfg.patch_size
      patch_dim = 3 * image_cfg.temporal_patch_size * image_cfg.patch_size**2
      patches = np.zeros((b, side * side, patch_dim), np.float32)
    return out.obs_tokens, out.obs_lengths, out.image_kind, out.image_slot, patches

  return host_fn


def make_rollout_fn(
  model_cfg: ModelConfig,
  cfg: RolloutConfig,
  stop_token_patterns: np.ndarray,
  host_fn: HostFn,
  search_patch_shape: tuple[int, int],
  mesh: jax.sharding.Mesh | None = None,
) -> Callable[..., RolloutOutput]:
  """Builds the jitted episode runner.

  Args:
    model_cfg: the policy.
    cfg: static rollout settings.
    stop_token_patterns: `stop_patterns(...)` for `</search>` and `</keyframe>`.
    host_fn: called through `io_callback` with (pending bool[B], action_tokens
      int32[B, A], action_len int32[B]); returns (obs_tokens int32[B, O], obs_len
      int32[B], image_kind int32[B], image_slot int32[B], search_patches
      float32[B, Ps, patch_dim]). Rows not pending are ignored. It must not raise:
      failures are observations.
    search_patch_shape: (Ps, patch_dim) of one image_search result.
    mesh: this process's rollout mesh (`sharding.rollout_mesh`) and the parameters
      laid out on it (`sharding.rollout_params`): the rows (and their KV cache) go
      over its data x fsdp devices, the KV heads over `tensor` (where they divide).
      The prompts' vision encoding and prefill run replicated over the row devices
      (once per prompt, not per row). None = wherever the parameters are.

  Returns:
    `rollout(params, batch, rng) -> RolloutOutput` with `batch` a `PromptBatch` (rows
    are repeated `group_size` times inside).
  """
  model = policy.Policy(model_cfg)
  n = cfg.group_size
  resp_len_max, obs_max, act_max, turns = (
    cfg.max_response_length,
    cfg.max_obs_length,
    cfg.max_action_length,
    cfg.max_turns,
  )
  # The response buffers (not the cache) leave room for a whole chunk written at the
  # last position; a few int32 per token, where the cache is sized by the budget.
  buf_len = resp_len_max + max(obs_max, act_max) + 1
  patterns = jnp.asarray(stop_token_patterns)
  pat_width = patterns.shape[1]
  image_id = model_cfg.image_token_id

  def encode(params, patches):  # [N, P, pd] -> tokens [N, Nv, D], deepstack [n_ds, N, Nv, D]
    return model.apply(
      {"params": params}, patches, _grid_of(patches.shape[1]), method=policy.Policy.encode_images
    )

  merge = model_cfg.vision.spatial_merge_size
  patch_grids = {
    g[0] * g[1] * merge * merge: (g[0] * merge, g[1] * merge)
    for g in (cfg.frame_grid, cfg.keyframe_grid, cfg.search_grid)
  }

  def _grid_of(num_patches: int) -> tuple[int, int]:
    return patch_grids[num_patches]

  def row_layout(tree):
    """Rows over the mesh's data x fsdp devices, KV heads over `tensor` (each where
    it divides); a no-op without a mesh."""
    if mesh is None:
      return tree
    sizes = dict(mesh.shape)
    rows = sizes["data"] * sizes["fsdp"]
    heads = model_cfg.text.num_kv_heads % sizes["tensor"] == 0 and sizes["tensor"] > 1

    def put(x):
      spec = [sharding.BATCH_AXES if x.shape[0] % rows == 0 else None]
      if x.ndim == 4 and heads:  # k [B, Hkv, D, S] and v [B, Hkv, S, D]
        spec.append("tensor")
      named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
      return jax.lax.with_sharding_constraint(x, named)

    return jax.tree.map(put, tree)

  def rollout(params, batch, rng):
    prompts, f = batch.frame_patches.shape[:2]
    b = prompts * n
    rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis)

    # 1. Visual features once per prompt: shown frames and their high-res copies.
    pf = batch.frame_patches
    frame_tok, frame_ds = encode(params, pf.reshape(prompts * f, *pf.shape[2:]))
    frame_tok = frame_tok.reshape(prompts, -1, frame_tok.shape[-1])
    frame_ds = frame_ds.reshape(frame_ds.shape[0], prompts, -1, frame_ds.shape[-1])
    pk = batch.keyframe_patches
    key_tok, key_ds = encode(params, pk.reshape(prompts * f, *pk.shape[2:]))
    nk = key_tok.shape[1]
    key_tok = key_tok.reshape(prompts, f, nk, -1)
    key_ds = key_ds.reshape(key_ds.shape[0], prompts, f, nk, -1)

    # 2. Prefill each prompt once and copy its cache to the rows of its group.
    lp = batch.prompt_ids.shape[1]
    cache_len = cfg.cache_length(lp)
    # Tokens a response may hold: the budget after the (padded) prompt, at most
    # max_response_length. Every cache write of a live row stays below `cache_len`.
    resp_limit = min(resp_len_max, cache_len - lp)
    logits, cache = decoding.prefill_prompt(
      params,
      model_cfg,
      cache_len,
      batch.prompt_ids,
      batch.prompt_positions,
      batch.prompt_valid,
      frame_tok,
      frame_ds,
      logits_at=jnp.full((prompts,), lp - 1, jnp.int32),  # left-padded: the last token is real
    )
    prompt_logits, prompt_cache = logits, cache
    # Slot k starts with episode k (episode e is row e % n of prompt e // n).
    m = cfg.slot_count(b)
    harvest = m < b  # episodes outnumber slots: finished slots take the next ones
    first = jnp.arange(m) // n
    logits = row_layout(prompt_logits[first])
    cache = row_layout(jax.tree.map(lambda x: x[first], prompt_cache))  # batch-major
    forced = batch.forced_tokens
    if forced is None:
      forced = jnp.full((b, 1), -1, jnp.int32)
    prompt_index = batch.prompt_index
    if prompt_index is None:
      prompt_index = jnp.arange(prompts, dtype=jnp.int32)
    row_ids = (rep(prompt_index) * n + jnp.arange(b) % n).astype(jnp.int32)  # [B] streams
    start_pos = rep(batch.next_pos).astype(jnp.int32)  # [B]

    # The key of an episode's t-th draw is the t-th of one split chain (then folded with
    # its stream): the same draw whichever step or slot the episode runs at.
    def chain(key, _):
      key, draw = jax.random.split(key)
      return key, draw

    _, step_keys = jax.lax.scan(chain, rng, None, length=buf_len)  # [buf_len, key]

    def trim(key, v):
      """A per-slot buffer cut to the response length of the output."""
      if key in ("tokens", "loss_mask", "logprobs"):
        return v[:, :resp_len_max]
      return v[:, :, :resp_len_max] if key == "positions" else v

    def fresh(rows):
      """Per-slot episode state at the start of an episode."""
      return dict(
        tokens=jnp.zeros((rows, buf_len), jnp.int32),
        positions=jnp.zeros((rows, 3, buf_len), jnp.int32),
        loss_mask=jnp.zeros((rows, buf_len), bool),
        logprobs=jnp.zeros((rows, buf_len), jnp.float32),
        length=jnp.zeros((rows,), jnp.int32),
        generated=jnp.zeros((rows,), jnp.int32),
        turn_start=jnp.zeros((rows,), jnp.int32),
        turns=jnp.zeros((rows,), jnp.int32),
        stop_reason=jnp.full((rows,), protocol.MAX_LENGTH, jnp.int32),
        obs_kind=jnp.zeros((rows, turns), jnp.int32),
        obs_slot=jnp.full((rows, turns), -1, jnp.int32),
        search_patches=jnp.zeros((rows, turns, *search_patch_shape), jnp.float32),
      )

    state = dict(
      fresh(m),
      cache=cache,
      logits=logits,
      next_pos=start_pos[:m],
      active=jnp.ones((m,), bool),
      episode=jnp.arange(m, dtype=jnp.int32),  # [M] the episode each slot runs; -1 none
      queued=jnp.asarray(m, jnp.int32),  # the next episode to start
      step=jnp.zeros((), jnp.int32),
    )
    if harvest:  # finished episodes, per episode (copied out of their slots)
      state["done"] = {k: trim(k, v) for k, v in fresh(b).items()}

    def body(s):
      episode = jnp.clip(s["episode"], 0, b - 1)  # [M]
      active = s["active"]
      logits = s["logits"]
      if cfg.banned_ids:
        logits = logits.at[:, list(cfg.banned_ids)].set(-1e30)
      # 3. Sample one token per active row; its log-prob is the policy's own.
      gen = s["generated"]
      keys = step_keys[jnp.clip(gen, 0, buf_len - 1)]
      token = sample_tokens(logits, rng, cfg, row_ids[episode], keys)
      scripted = jnp.take_along_axis(
        forced[episode], jnp.clip(gen, 0, forced.shape[1] - 1)[:, None], axis=1
      )[:, 0]
      token = jnp.where((gen < forced.shape[1]) & (scripted >= 0), scripted, token)
      temp = cfg.temperature if cfg.temperature > 0 else 1.0
      # log_softmax at the drawn token only (the trainer's log-prob, without a [B, V] output).
      scaled = logits.astype(jnp.float32) / temp
      top = jnp.max(scaled, axis=-1)
      log_norm = top + jnp.log(jnp.sum(jnp.exp(scaled - top[:, None]), axis=-1))
      logp = _take(scaled, token) - log_norm
      length = s["length"]
      pos3 = jnp.broadcast_to(s["next_pos"][:, None, None], (m, 3, 1))
      upd = lambda buf, v: jnp.where(active[:, None], _write_rows(buf, v[:, None], length), buf)
      tokens = upd(s["tokens"], token)
      loss_mask = upd(s["loss_mask"], jnp.ones((m,), bool))
      logprobs = upd(s["logprobs"], logp)
      positions = jnp.where(
        active[:, None, None], _write_rows(s["positions"], pos3, length, axis=1), s["positions"]
      )
      length = length + active
      gen = gen + active
      next_pos = s["next_pos"] + active

      # 4. Put the token in the cache (all active rows, including those that just stopped).
      logits, cache = model.apply(
        {"params": params}, token[:, None], pos3, active[:, None], cache=s["cache"]
      )
      logits = logits[:, 0]

      # 5. Turn ends: end of turn token, a stop string, or the per-turn / total length.
      window = _read_rows(
        jnp.pad(tokens, ((0, 0), (pat_width, 0)), constant_values=-2), length, pat_width
      )  # [B, W]: the last W tokens
      matched = jnp.any(
        jnp.all((patterns[None] == window[:, None]) | (patterns[None] < 0), axis=-1), axis=-1
      )
      is_end = token == cfg.im_end_id
      turn_len = length - s["turn_start"]
      action = active & ~is_end & (matched | (turn_len >= act_max))
      too_long = length >= resp_limit
      can_call = s["turns"] < turns
      finished = active & is_end
      stop_reason = s["stop_reason"]
      stop_reason = jnp.where(
        finished, jnp.where(length == 1, protocol.EMPTY, protocol.FINISHED), stop_reason
      )
      stop_reason = jnp.where(active & ~is_end & too_long, protocol.MAX_LENGTH, stop_reason)
      last_turn = action & ~too_long & ~can_call
      stop_reason = jnp.where(
        last_turn, jnp.where(matched, protocol.MAX_TURNS, protocol.MAX_LENGTH), stop_reason
      )
      pending = action & ~too_long & can_call
      active = active & ~finished & ~too_long & ~last_turn

      s = dict(
        s,
        tokens=tokens,
        loss_mask=loss_mask,
        logprobs=logprobs,
        positions=positions,
        length=length,
        generated=gen,
        next_pos=next_pos,
        logits=logits,
        cache=cache,
        stop_reason=stop_reason,
        active=active,
        step=s["step"] + 1,
      )
      s = jax.lax.cond(jnp.any(pending), lambda s: observe(s, pending), lambda s: s, s)
      if harvest:
        s = jax.lax.cond(jnp.any(~s["active"] & (s["episode"] >= 0)), refill, lambda s: s, s)
      return dict(s, cache=row_layout(s["cache"]), logits=row_layout(s["logits"]))

    def store(s, rows):
      """Copies the episodes of slots `rows` [M] out to their episode rows."""
      to = jnp.where(rows, s["episode"], b)  # b: out of range, dropped
      return {k: v.at[to].set(trim(k, s[k]), mode="drop") for k, v in s["done"].items()}

    def refill(s):
      # 9. Finished slots hand their episode over and take the next pending ones: the
      # prompt's cache and logits copied in one slot at a time, the rest reset.
      ended = ~s["active"] & (s["episode"] >= 0)
      done = store(s, ended)
      nxt = s["queued"] + jnp.cumsum(ended) - 1  # [M] the episode each ended slot takes
      take = ended & (nxt < b)
      order = jnp.argsort(~take, stable=True).astype(jnp.int32)  # taking slots first

      def copy_one(carry):
        i, cache, logits = carry
        slot = order[i]
        prompt = nxt[slot] // n
        row = lambda c, pc: jax.lax.dynamic_update_index_in_dim(
          c, jax.lax.dynamic_index_in_dim(pc, prompt, 0), slot, 0
        )
        return i + 1, jax.tree.map(row, cache, prompt_cache), row(logits, prompt_logits)

      count = jnp.sum(take.astype(jnp.int32))
      _, cache, logits = jax.lax.while_loop(
        lambda c: c[0] < count, copy_one, (jnp.zeros((), jnp.int32), s["cache"], s["logits"])
      )
      new = fresh(m)
      reset = {
        k: jnp.where(take.reshape((m,) + (1,) * (new[k].ndim - 1)), new[k], s[k]) for k in new
      }
      episode = jnp.where(ended, jnp.where(take, nxt, -1), s["episode"])
      return dict(
        s,
        **reset,
        done=done,
        cache=cache,
        logits=logits,
        episode=episode,
        queued=s["queued"] + count,
        active=s["active"] | take,
        next_pos=jnp.where(take, start_pos[jnp.clip(nxt, 0, b - 1)], s["next_pos"]),
      )

    def observe(s, pending):
      # 6. One host call serves every waiting row.
      actions = _read_rows(s["tokens"], s["turn_start"], act_max)
      act_len = s["length"] - s["turn_start"]
      shapes = (
        jax.ShapeDtypeStruct((b, obs_max), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b, *search_patch_shape), jnp.float32),
      )
      episode = jnp.clip(s["episode"], 0, b - 1)
      if harvest:  # the host's rows are episodes (its per-row frames and records)
        to = jnp.where(s["episode"] >= 0, s["episode"], b)
        scatter = lambda z, v: z.at[to].set(v, mode="drop")
        host_args = (
          scatter(jnp.zeros((b,), bool), pending),
          scatter(jnp.zeros((b, act_max), actions.dtype), actions),
          scatter(jnp.zeros((b,), act_len.dtype), act_len),
        )
      else:
        host_args = (pending, actions, act_len)
      obs, obs_len, kind, slot, search = io_callback(host_fn, shapes, *host_args, ordered=False)
      if harvest:
        obs, obs_len, kind, slot, search = (x[episode] for x in (obs, obs_len, kind, slot, search))
      obs_len = jnp.clip(obs_len, 0, obs_max)
      # An observation that does not fit ends the episode at max_length instead.
      fits = s["length"] + obs_len < resp_limit
      stop_reason = jnp.where(pending & ~fits, protocol.MAX_LENGTH, s["stop_reason"])
      active = s["active"] & ~(pending & ~fits)
      pending = pending & fits
      kind = jnp.where(pending, kind, protocol.NO_IMAGE)

      # 7. Visual features of the observation image, padded to one width.
      slot_c = jnp.clip(slot, 0, key_tok.shape[1] - 1)
      prompt_of_row = episode // n
      kf = key_tok[prompt_of_row, slot_c]  # [M, Nk, D]
      kf_ds = key_ds[:, prompt_of_row, slot_c]  # [n_ds, M, Nk, D]
      ns = cfg.search_grid[0] * cfg.search_grid[1]
      width = max(nk, ns)

      def encode_search(_):
        return encode(params, search)

      d = kf.shape[-1]
      zeros = (jnp.zeros((m, ns, d), kf.dtype), jnp.zeros((kf_ds.shape[0], m, ns, d), kf.dtype))
      sr, sr_ds = jax.lax.cond(
        jnp.any(kind == protocol.SEARCH_IMAGE), encode_search, lambda _: zeros, None
      )
      pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, width - x.shape[-2]), (0, 0)])
      is_key = (kind == protocol.KEYFRAME_IMAGE)[:, None, None]
      visual = jnp.where(is_key, pad(kf), pad(sr))
      deepstack = jnp.where(is_key[None], pad(kf_ds), pad(sr_ds))
      gh = jnp.where(kind == protocol.KEYFRAME_IMAGE, cfg.keyframe_grid[0], cfg.search_grid[0])
      gw = jnp.where(kind == protocol.KEYFRAME_IMAGE, cfg.keyframe_grid[1], cfg.search_grid[1])
      pos, next_pos = observation_positions(obs, obs_len, s["next_pos"], gh, gw, image_id)

      # 8. Prefill the observation into the cache and the response (masked out of the loss).
      valid = (jnp.arange(obs_max)[None] < obs_len[:, None]) & pending[:, None]
      last = jnp.clip(obs_len - 1, 0, obs_max - 1)
      new_logits, cache = _prefill_rows(
        params,
        model_cfg,
        s["cache"],
        s["logits"],
        pending,
        cfg.observe_chunk(m),
        (obs, pos, valid, visual, deepstack, last),
      )
      keep = pending[:, None]
      length = s["length"]
      tokens = jnp.where(
        keep, _write_rows(s["tokens"], jnp.where(valid, obs, 0), length), s["tokens"]
      )
      positions = jnp.where(
        keep[:, :, None], _write_rows(s["positions"], pos, length, axis=1), s["positions"]
      )
      turn = jnp.clip(s["turns"], 0, turns - 1)
      hit = pending[:, None] & (jnp.arange(turns)[None] == turn[:, None])
      new_length = jnp.where(pending, length + obs_len, length)
      return dict(
        s,
        cache=cache,
        logits=new_logits,
        tokens=tokens,
        positions=positions,
        length=new_length,
        next_pos=jnp.where(pending, next_pos, s["next_pos"]),
        turn_start=jnp.where(pending, new_length, s["turn_start"]),
        turns=s["turns"] + pending,
        active=active,
        stop_reason=stop_reason,
        obs_kind=jnp.where(hit, kind[:, None], s["obs_kind"]),
        obs_slot=jnp.where(hit, slot[:, None], s["obs_slot"]),
        search_patches=jnp.where(
          (hit & (kind == protocol.SEARCH_IMAGE)[:, None])[:, :, None, None],
          search[:, None],
          s["search_patches"],
        ),
      )

    # A safety bound: an episode takes at most buf_len steps, a slot runs at most
    # b - m + 1 episodes.
    max_steps = buf_len * (b - m + 1)
    s = jax.lax.while_loop(lambda s: jnp.any(s["active"]) & (s["step"] < max_steps), body, state)
    if harvest:
      out = store(s, s["episode"] >= 0)  # slots the step bound stopped
    else:
      out = {k: trim(k, s[k]) for k in fresh(1)}
    r = resp_len_max
    in_resp = jnp.arange(r)[None] < out["length"][:, None]
    return RolloutOutput(
      response_ids=jnp.where(in_resp, out["tokens"], 0),
      response_positions=out["positions"],
      response_valid=in_resp,
      loss_mask=out["loss_mask"] & in_resp,
      logprobs=jnp.where(in_resp, out["logprobs"], 0.0),
      response_length=out["length"],
      stop_reason=out["stop_reason"],
      num_turns=out["turns"],
      obs_kind=out["obs_kind"],
      obs_slot=out["obs_slot"],
      search_patches=out["search_patches"],
      decode_steps=s["step"],
    )

  if mesh is None:
    return jax.jit(rollout)
  jitted = jax.jit(rollout)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def run(params, batch, rng):
    # The prompt batch is small next to the cache: every row device gets all of it.
    return jitted(params, jax.device_put(batch, replicated), jax.device_put(rng, replicated))

  run.lower = jitted.lower  # ahead-of-time compilation (`tools.aot`)
  return run


def _prefill_rows(
  params: Any,
  model_cfg: ModelConfig,
  cache: policy.Cache,
  logits: Array,
  pending: Array,
  chunk: int,
  inputs: tuple[Array, ...],
) -> tuple[Array, policy.Cache]:
  """`decoding.prefill` of the `pending` rows only, `chunk` rows at a time.

  Observations arrive for a row or two at a time, so the waiting rows are packed
  (gathered with their cache rows) into chunks of `chunk` rows, prefilled, and
  scattered back: the cost follows the rows that wait, not the batch. Rows of the
  last chunk that do not wait run with no valid token, as in a full-batch prefill.

  Args:
    logits: [B, V] the rows' current next-token logits (kept where not pending).
    chunk: rows per prefill; a divisor of B.
    inputs: (ids [B, T], positions [B, 3, T], valid [B, T], visual [B, Nv, D],
      deepstack [n_ds, B, Nv, D], logits_at [B]) of `decoding.prefill`.

  Returns:
    (logits [B, V], cache) after the prefill.
  """
  ids, pos, valid, visual, deepstack, last = inputs
  b = ids.shape[0]
  if chunk >= b:
    new_logits, cache = decoding.prefill(
      params, model_cfg, cache, ids, pos, valid, visual, deepstack, logits_at=last
    )
    return jnp.where(pending[:, None], new_logits, logits), cache
  order = jnp.argsort(~pending, stable=True).astype(jnp.int32)  # waiting rows first
  count = jnp.sum(pending.astype(jnp.int32))

  def body(carry):
    i, cache, logits = carry
    rows = jax.lax.dynamic_slice_in_dim(order, i * chunk, chunk)
    take = lambda x, axis=0: jnp.take(x, rows, axis=axis)
    part = jax.tree.map(take, cache)  # every cache entry is batch-major
    out, part = decoding.prefill(
      params,
      model_cfg,
      part,
      take(ids),
      take(pos),
      take(valid),
      take(visual),
      take(deepstack, 1),
      logits_at=take(last),
    )
    cache = jax.tree.map(lambda full, p: full.at[rows].set(p), cache, part)
    out = jnp.where(take(pending)[:, None], out.astype(logits.dtype), take(logits))
    return i + 1, cache, logits.at[rows].set(out)

  _, cache, logits = jax.lax.while_loop(
    lambda c: c[0] * chunk < count, body, (jnp.zeros((), jnp.int32), cache, logits)
  )
  return logits, cache
