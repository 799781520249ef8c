"""The Qwen-VL policy in Flax: a vision tower, the M-RoPE language model, a KV cache.

Both families share this module: the language model differs only by flags
(q/k/v bias, q/k norm, interleaved or blocked M-RoPE), the vision towers live in
`qwen3_vl.py` and `qwen2_5_vl.py`.

Static shapes throughout: one call of the vision tower encodes images of one grid
(the protocol's frames share a size), and the language model runs on chunks of
tokens `[B, T]` appended to a fixed-size KV cache at per-row offsets. The same
chunk call serves the prompt prefill, each decode step and the prefill of an
observation in the middle of an episode; a prompt can also start a new cache
(`new_cache_length`), attending causally to itself only.

Parameter names mirror the HF checkpoint (see `weights.py`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax.models import layers, qwen2_5_vl, qwen3_vl
from segresearch_jax.models.config import ModelConfig, TextConfig

Array = jax.Array
Cache = dict[str, Array]

# ----------------------------------------------------------------------------
# Language model.
# ----------------------------------------------------------------------------


class DecoderLayer(nn.Module):
  config: TextConfig
  dtype: Any
  attention: str = "xla_blocked"  # `layers.self_attention` for a stand-alone chunk

  @nn.compact
  def __call__(
    self,
    x: Array,
    cos: Array,
    sin: Array,
    attend: dict[str, Array],
    kv: tuple[Array, Array] | None,
    write_slots: Array | None,
  ) -> tuple[Array, tuple[Array, Array]]:
    """One block. Without `kv` the chunk attends causally to itself; with it, the
    chunk's keys are written at `write_slots` and it attends to the whole cache.

    Returns the new hidden states and this chunk's (k [B, Hkv, D, T], v [B, Hkv, T, D])
    (no cache) or the updated cache (k [B, Hkv, D, S], v [B, Hkv, S, D]).
    """
    cfg = self.config
    b, t, _ = x.shape
    h = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
    q, k, v = (
      layers.dense(heads * cfg.head_dim, name, bias=cfg.qkv_bias, dtype=self.dtype)(h).reshape(
        b, t, heads, cfg.head_dim
      )
      for name, heads in (
        ("q_proj", cfg.num_heads),
        ("k_proj", cfg.num_kv_heads),
        ("v_proj", cfg.num_kv_heads),
      )
    )
    if cfg.qk_norm:
      q = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
      k = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    fused = kv is None and layers.resolve_attention(self.attention) != "xla_blocked"
    if fused:  # [B, T, Hq, D] from a fused kernel (splash, cuDNN)
      attn = layers.self_attention(
        q,
        k,
        v,
        cfg.head_dim**-0.5,
        causal=True,
        key_valid=attend["key_valid"],
        implementation=self.attention,
      )
    q = layers.heads_first(q, cfg.num_kv_heads)  # [B, Hkv, G, T, D]
    k, v = layers.keys_last(k), v.transpose(0, 2, 1, 3)  # [B, Hkv, D, T], [B, Hkv, T, D]
    if fused:
      kv = (k, v)
      attn = attn.reshape(b, t, -1).astype(x.dtype)
    elif kv is None:
      kv = (k, v)
      attn = layers.grouped_attention(q, k, v, cfg.head_dim**-0.5, causal=True, **attend)
      attn = layers.heads_last(attn).reshape(b, t, -1).astype(x.dtype)
    else:
      # Append this chunk at each row's own offset in the cache. The cache is in the
      # layout attention reads, so no step copies or transposes it.
      kv = (write_cache(kv[0], k, write_slots, 2), write_cache(kv[1], v, write_slots, 1))
      k, v = kv[0].astype(self.dtype), kv[1].astype(self.dtype)
      attn = layers.grouped_attention(q, k, v, cfg.head_dim**-0.5, **attend)
      attn = layers.heads_last(attn).reshape(b, t, -1).astype(x.dtype)
    x = x + layers.dense(cfg.hidden_size, "o_proj", bias=False, dtype=self.dtype)(attn)
    h = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
    return x + layers.SwiGLU(cfg.intermediate_size, dtype=self.dtype, name="mlp")(h), kv


def write_cache(cache: Array, chunk: Array, starts: Array, axis: int) -> Array:
  """cache[b, ..., starts[b] + i, ...] = chunk[b, ..., i, ...] along `axis` (of a row).

  A one-token chunk (a decode step) is a dynamic slice update: a live row always has
  a free slot. A longer chunk (an observation padded to its maximum length) may run
  past the end of a cache sized by a token budget, not by the worst case: its slots
  past the end hold only padding (the rollout admits an observation only if its real
  tokens fit) and are dropped, where a dynamic slice would shift the whole chunk back
  over earlier keys.

  Args:
    cache: [B, ...] one cache array (k, v or valid), in its own dtype.
    chunk: [B, ...] the chunk, the same shape but T along `axis + 1`.
    starts: [B] int32 first slot per row.
    axis: the slot axis within a row.
  """
  chunk = chunk.astype(cache.dtype)
  t = chunk.shape[axis + 1]
  if t == 1:
    put = lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, axis=axis)
  else:
    index = (slice(None),) * axis
    put = lambda c, u, s: c.at[(*index, s + jnp.arange(t))].set(u, mode="drop")
  return jax.vmap(put)(cache, chunk, starts)


def scatter_visual(input_ids: Array, image_token_id: int, visual: Array) -> tuple[Array, Array]:
  """Places row-wise visual tokens at `<|image_pad|>` positions (static shapes).

  Args:
    input_ids: [B, T] token ids.
    image_token_id: the `<|image_pad|>` id.
    visual: [..., B, Nv, D] visual tokens, in order of appearance per row.

  Returns:
    ([..., B, T, D] features, zero off the image positions; bool [B, T] image mask).
  """
  is_image = input_ids == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, visual.shape[-2] - 1)  # [B, T]
  index = jnp.broadcast_to(index[..., None], visual.shape[:-3] + index.shape + (1,))
  gathered = jnp.take_along_axis(visual, index, axis=-2)
  return jnp.where(is_image[..., None], gathered, 0).astype(visual.dtype), is_image


def _scan_layer(layer: DecoderLayer, carry, kv, cos, sin, attend, write_slots, deepstack):
  """One step of the scanned decoder: carry (hidden, layer index), kv this layer's
  cache (or None); DeepStack feature i is added after layer i as in the loop."""
  x, i = carry
  x, kv = layer(x, cos, sin, attend, kv, write_slots)
  if deepstack is not None:
    n = deepstack.shape[0]
    add = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(i, n - 1), keepdims=False)
    x = x + jnp.where(i < n, add.astype(x.dtype), jnp.zeros((), x.dtype))
  return (x, i + 1), kv


class Policy(nn.Module):
  """The policy. Methods: `encode_images`, `__call__` (a chunk), `logits`.

  Computes in `dtype` when given, else in the config's `dtype`; parameters are fp32.
  With `config.scan_layers` the decoder layers are one module `layers` and the
  vision blocks one module `visual/blocks`, whose parameters carry a leading layer
  (block) axis (`weights.stack_layers` converts).
  """

  config: ModelConfig
  dtype: Any = None

  @property
  def compute_dtype(self) -> Any:
    return self.config.compute_dtype if self.dtype is None else jnp.dtype(self.dtype)

  def setup(self):
    cfg = self.config
    dtype = self.compute_dtype
    towers = {"qwen3_vl": qwen3_vl.VisionTower, "qwen2_5_vl": qwen2_5_vl.VisionTower}
    if cfg.family not in towers:
      raise ValueError(f"Unknown model family {cfg.family!r}; expected one of {sorted(towers)}.")
    self.visual = towers[cfg.family](cfg.vision, dtype, cfg.remat, cfg.attention, cfg.scan_layers)
    self.embed_tokens = nn.Embed(
      cfg.text.vocab_size,
      cfg.text.hidden_size,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=nn.initializers.normal(0.02),
    )
    layer = layers.rematerialized(DecoderLayer, cfg.remat, scanned=cfg.scan_layers)
    if cfg.scan_layers:
      self.decoder_layers = layer(cfg.text, dtype, cfg.attention, name="layers")
    else:
      self.decoder_layers = [
        layer(cfg.text, dtype, cfg.attention, name=f"layers_{i}")
        for i in range(cfg.text.num_layers)
      ]
    self.norm = layers.RMSNorm(cfg.text.rms_norm_eps, dtype)
    if not cfg.text.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.text.vocab_size, "lm_head", bias=False, dtype=dtype)

  def encode_images(self, patches: Array, grid_hw: tuple[int, int]) -> tuple[Array, Array]:
    """[N, P, patch_dim] -> ([N, P/4, D] tokens, [n_deepstack, N, P/4, D]; n may be 0)."""
    return self.visual(patches, grid_hw)

  def logits(self, hidden: Array) -> Array:
    if self.config.text.tie_word_embeddings:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(
    self,
    input_ids: Array,
    positions: Array,
    token_valid: Array,
    visual: Array | None = None,
    deepstack: Array | None = None,
    cache: Cache | None = None,
    return_hidden: bool = False,
    new_cache_length: int | None = None,
  ) -> tuple[Array, Cache | None]:
    """Runs one chunk of tokens.

    Args:
      input_ids: [B, T].
      positions: [B, 3, T] M-RoPE positions (T, H, W axes).
      token_valid: bool [B, T]; padding is False (left or right padding both work).
      visual: [B, Nv, D] this chunk's visual tokens in order, or None.
      deepstack: [n_deepstack, B, Nv, D] matching DeepStack features, or None.
      cache: None for a stand-alone causal forward, else the KV cache to append to.
      return_hidden: return final hidden states [B, T, D] instead of logits.
      new_cache_length: with `cache=None`, also return a new cache of this length
        holding the chunk (what `init_cache` + appending the chunk gives, but the
        chunk attends only to itself: no work on the empty slots).

    Returns:
      (logits [B, T, V] or hidden [B, T, D], the updated or new cache, or None).
    """
    cfg = self.config.text
    b, t = input_ids.shape
    if cache is not None and new_cache_length is not None:
      raise ValueError("Pass either a cache to append to or new_cache_length, not both.")
    if new_cache_length is not None and new_cache_length < t:
      raise ValueError(f"new_cache_length {new_cache_length} is shorter than the chunk ({t}).")
    x = self.embed_tokens(input_ids)
    ds_features = None
    if visual is not None:
      features, is_image = scatter_visual(input_ids, self.config.image_token_id, visual)
      x = jnp.where(is_image[..., None], features.astype(x.dtype), x)
      if deepstack is not None and deepstack.shape[0]:
        ds_features, _ = scatter_visual(input_ids, self.config.image_token_id, deepstack)
    cos, sin = layers.mrope_tables(
      positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved
    )

    # Next write goes right after the last real token of this chunk.
    last = jnp.max(jnp.where(token_valid, jnp.arange(t) + 1, 0), axis=1).astype(jnp.int32)
    if cache is None:
      attend = {"key_valid": token_valid}
      write_slots = None
    else:
      write_slots = cache["end"]  # [B]
      valid = write_cache(cache["valid"], token_valid, write_slots, 0)  # [B, S]
      # Query t of row b sits at slot end_b + t and sees the valid slots up to it;
      # no row has a key past the longest row's end.
      end = write_slots + last.astype(write_slots.dtype)
      attend = {
        "key_valid": valid,
        "query_slot": write_slots[:, None] + jnp.arange(t),
        "key_extent": jnp.max(write_slots) + t,
      }
      new_cache = {"valid": valid, "end": end}

    if self.config.scan_layers:
      # The cache is one array per layer (see `init_cache`); the scan reads and
      # writes it stacked.
      kv = None if cache is None else (jnp.stack(cache["k"]), jnp.stack(cache["v"]))
      scan = nn.scan(
        _scan_layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * 5,
        length=cfg.num_layers,
      )
      (x, _), (stacked_k, stacked_v) = scan(
        self.decoder_layers,
        (x, jnp.zeros((), jnp.int32)),
        kv,
        cos,
        sin,
        attend,
        write_slots,
        ds_features,
      )
      new_k, new_v = list(stacked_k), list(stacked_v)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.decoder_layers):
        kv = None if cache is None else (cache["k"][i], cache["v"][i])
        x, kv = layer(x, cos, sin, attend, kv, write_slots)
        new_k.append(kv[0])
        new_v.append(kv[1])
        if ds_features is not None and i < ds_features.shape[0]:
          x = x + ds_features[i].astype(x.dtype)
    x = self.norm(x)
    out = x if return_hidden else self.logits(x)
    if cache is None:
      if new_cache_length is None:
        return out, None
      grow = new_cache_length - t
      dtype = self.compute_dtype  # the cache holds keys in the dtype they are computed in
      new_cache = {
        "k": tuple(jnp.pad(k.astype(dtype), ((0, 0),) * 3 + ((0, grow),)) for k in new_k),
        "v": tuple(jnp.pad(v.astype(dtype), ((0, 0),) * 2 + ((0, grow), (0, 0))) for v in new_v),
        "valid": jnp.pad(token_valid, ((0, 0), (0, grow))),
        "end": last,
      }
      return out, new_cache
    new_cache.update(k=tuple(new_k), v=tuple(new_v))
    return out, new_cache


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = None) -> Cache:
  """An empty KV cache for `batch` rows of up to `length` tokens.

  Per layer, k is [batch, num_kv_heads, head_dim, length] (keys transposed, see
  `layers.grouped_attention`) and v is [batch, num_kv_heads, length, head_dim], in
  `dtype` (default: the model's compute dtype, bf16 under `model.dtype=bfloat16`:
  the keys are computed in it, so a wider cache only costs memory).
  """
  dtype = config.compute_dtype if dtype is None else dtype
  t = config.text
  k_shape = (batch, t.num_kv_heads, t.head_dim, length)
  v_shape = (batch, t.num_kv_heads, length, t.head_dim)
  # One array per layer (not one stacked array): each step updates them in place,
  # where restacking would copy the whole cache every decode step.
  return {
    "k": tuple(jnp.zeros(k_shape, dtype) for _ in range(t.num_layers)),
    "v": tuple(jnp.zeros(v_shape, dtype) for _ in range(t.num_layers)),
    "valid": jnp.zeros((batch, length), bool),
    "end": jnp.zeros((batch,), jnp.int32),
  }


def init_params(config: ModelConfig, rng: Array, grid_hw: tuple[int, int] = (4, 4)) -> Any:
  """Initial parameters (fp32 whatever the compute dtype; stacked decoder layers with
  `config.scan_layers`); pass through `jax.eval_shape` for shapes without memory."""
  model = Policy(config)
  patches = jnp.zeros((1, grid_hw[0] * grid_hw[1], config.vision.patch_dim), jnp.float32)

  def init_all(module: Policy):
    visual, deepstack = module.encode_images(patches, grid_hw)
    ids = jnp.full((1, visual.shape[1]), config.image_token_id, jnp.int32)
    pos = jnp.zeros((1, 3, ids.shape[1]), jnp.int32)
    return module(ids, pos, jnp.ones(ids.shape, bool), visual, deepstack)

  return nn.init(init_all, model)(rng)["params"]


# ----------------------------------------------------------------------------
# M-RoPE positions (host side, numpy).
# ----------------------------------------------------------------------------


def mrope_positions(
  input_ids: np.ndarray, image_grids: list[tuple[int, int]], image_token_id: int, start: int = 0
) -> tuple[np.ndarray, int]:
  """3-D positions for one row of real tokens (docs/method.md §5).

  Text tokens get T = H = W = running index. An image with merged grid (h, w) gets
  T = cur, H = cur + row, W = cur + col, then cur += max(h, w).

  Args:
    input_ids: [L] token ids, no padding.
    image_grids: merged (h, w) of each image, in order of appearance.
    image_token_id: the `<|image_pad|>` id.
    start: position of the first token (the running index after earlier chunks).

  Returns:
    ([3, L] int32 positions, the next free position).
  """
  ids = np.asarray(input_ids)
  out = np.zeros((3, len(ids)), np.int32)
  cur, i, grids = start, 0, list(image_grids)
  while i < len(ids):
    if ids[i] == image_token_id:
      if not grids:
        raise ValueError("More <|image_pad|> runs than image grids were given.")
      h, w = grids.pop(0)
      n = h * w
      if i + n > len(ids) or not np.all(ids[i : i + n] == image_token_id):
        raise ValueError(f"An image of {h}x{w} merged tokens needs {n} consecutive pads at {i}.")
      rows, cols = np.divmod(np.arange(n), w)
      out[:, i : i + n] = np.stack([np.full(n, cur), cur + rows, cur + cols])
      cur += max(h, w)
      i += n
    else:
      out[:, i] = cur
      cur += 1
      i += 1
  if grids:
    raise ValueError(f"{len(grids)} image grids were given but have no <|image_pad|> tokens.")
  return out, cur


def rope_index(
  input_ids: np.ndarray,
  attention_mask: np.ndarray,
  image_grids: list[list[tuple[int, int]]],
  image_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Batched `mrope_positions` for a (left- or right-) padded batch.

  Returns:
    positions [B, 3, L] (0 at padding) and the next free position per row [B].
  """
  b, length = input_ids.shape
  positions = np.zeros((b, 3, length), np.int32)
  next_pos = np.zeros((b,), np.int32)
  for r in range(b):
    keep = np.asarray(attention_mask[r], bool)
    pos, next_pos[r] = mrope_positions(input_ids[r][keep], image_grids[r], image_token_id)
    positions[r][:, keep] = pos
  return positions, next_pos
