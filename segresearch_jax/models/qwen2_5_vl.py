"""Qwen2.5-VL vision tower: RMSNorm blocks, gated SiLU MLP, windowed attention.

Attention is restricted to windows of `window_size` pixels (8x8 patches for the
released models) except in `fullatt_block_indexes`. transformers permutes the
patches so that each window is contiguous and runs variable-length attention; with
static shapes we gather the patches of each window into a fixed-size slot block
(padding masked), attend inside each block, and scatter the results back to the
processor's patch order, so the rest of the tower never sees a permutation.
Window membership follows HF's rule: windows tile the merged grid from the top-left
corner, the last row/column of windows is cut short by the image edge.

The language model is shared with Qwen3-VL (`policy.py`, with q/k/v bias, no q/k
norm and blocked M-RoPE set in the config).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax.models import layers
from segresearch_jax.models.config import VisionConfig

Array = jax.Array


@functools.lru_cache(maxsize=32)
def vision_grid_constants(vision: VisionConfig, grid_h: int, grid_w: int) -> dict[str, np.ndarray]:
  """Rotary tables and the window layout for one patch grid (host side).

  Returns cos/sin [P, head_dim], `window_index` [n_windows, slots] (patch index in
  merge-block order, -1 = padding slot) and `window_inverse` [P] (flat slot of each
  patch), so that `x[window_index]` groups windows and `y.reshape(-1)[inverse]` undoes it.
  """
  m = vision.spatial_merge_size
  rows, cols = layers.merge_block_coords(grid_h, grid_w, m)
  window = vision.window_size // m // vision.patch_size  # in merged tokens
  if window < 1:
    raise ValueError(f"window_size {vision.window_size} is smaller than one merged token.")
  windows_per_row = -(-(grid_w // m) // window)
  window_id = (rows // m // window) * windows_per_row + (cols // m // window)
  n_windows = int(window_id.max()) + 1
  slots = window * window * m * m
  index = np.full((n_windows, slots), -1, np.int64)
  inverse = np.zeros(len(window_id), np.int64)
  fill = np.zeros(n_windows, np.int64)
  for p, w in enumerate(window_id):  # patches keep their relative order inside a window
    index[w, fill[w]] = p
    inverse[p] = w * slots + fill[w]
    fill[w] += 1
  cos, sin = layers.vision_rope_tables(rows, cols, vision.head_dim, vision.rope_theta)
  return dict(cos=cos, sin=sin, window_index=index, window_inverse=inverse)


class VisionBlock(nn.Module):
  """One block; `grid_hw` is the patch grid of the images (for window attention).

  `full` (a bool, or under the tower's scan a traced bool: then both attentions are
  compiled and `lax.cond` runs one) picks full attention over window attention.
  """

  config: VisionConfig
  dtype: Any
  attention: str = "xla_blocked"  # see `layers.self_attention`
  grid_hw: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, full: Any = True) -> Array:
    cfg = self.config
    n, p, d = x.shape  # [images, patches, width]
    h = layers.RMSNorm(1e-6, self.dtype, name="norm1")(x)
    qkv = layers.dense(3 * d, "qkv", bias=True, dtype=self.dtype)(h)
    qkv = qkv.reshape(n, p, 3, cfg.num_heads, cfg.head_dim)
    q = layers.apply_rotary(qkv[:, :, 0], cos, sin)
    k = layers.apply_rotary(qkv[:, :, 1], cos, sin)
    v = qkv[:, :, 2]
    full_fn = functools.partial(_full_attention, cfg, self.attention)
    if self.grid_hw is None or full is True:
      attn = full_fn(q, k, v)
    else:
      window_fn = functools.partial(_window_attention, cfg, self.attention, tuple(self.grid_hw))
      if full is False:
        attn = window_fn(q, k, v)
      else:
        attn = jax.lax.cond(full, full_fn, window_fn, q, k, v)
    attn = attn.reshape(n, p, d)
    x = x + layers.dense(d, "proj", bias=True, dtype=self.dtype)(attn)
    h = layers.RMSNorm(1e-6, self.dtype, name="norm2")(x)
    return x + layers.SwiGLU(cfg.intermediate_size, bias=True, dtype=self.dtype, name="mlp")(h)


def _full_attention(cfg: VisionConfig, attention: str, q: Array, k: Array, v: Array) -> Array:
  """Every patch of an image attends to every patch of it. [N, P, H, hd]"""
  if layers.resolve_attention(attention) == "xla_blocked":
    return layers.attention(q, k, v, None, cfg.head_dim**-0.5)
  return layers.self_attention(
    q, k, v, cfg.head_dim**-0.5, causal=False, key_valid=None, implementation=attention
  )


def _window_attention(
  cfg: VisionConfig, attention: str, grid_hw: tuple[int, int], q: Array, k: Array, v: Array
) -> Array:
  """Attention inside each window of `grid_hw` (host-side layout constants). [N, P, H, hd]"""
  const = vision_grid_constants(cfg, *grid_hw)
  index, inverse = const["window_index"], const["window_inverse"]  # [W, S] (-1 pad), [P]
  n = q.shape[0]
  w, slots = index.shape
  # Windows become the batch axis; padding slots are masked keys.
  group = lambda t: t[:, np.maximum(index, 0)].reshape(n * w, slots, *t.shape[2:])
  key_valid = jnp.asarray(np.broadcast_to(index >= 0, (n, w, slots)).reshape(n * w, slots))
  if layers.resolve_attention(attention) == "xla_blocked":
    attn = layers.grouped_attention(
      layers.heads_first(group(q), cfg.num_heads),
      layers.keys_last(group(k)),
      group(v).transpose(0, 2, 1, 3),
      cfg.head_dim**-0.5,
      key_valid=key_valid,
    )
    attn = layers.heads_last(attn)  # [n * w, slots, heads, head_dim]
  else:
    attn = layers.self_attention(
      group(q),
      group(k),
      group(v),
      cfg.head_dim**-0.5,
      causal=False,
      key_valid=key_valid,
      implementation=attention,
    )
  return attn.reshape(n, w * slots, *attn.shape[2:])[:, inverse]


def _scanned_block(block: VisionBlock, x, full, cos, sin):
  """One step of the scanned tower; `full` is this block's attention kind."""
  return block(x, cos, sin, full), None


class VisionTower(nn.Module):
  """Patches `[N, P, C*T*p*p]` of N same-size images -> merged tokens (no DeepStack).

  `remat` and `attention` as in `ModelConfig` (per block; the parameters are the same).
  With `scan` the blocks are one module `blocks` whose parameters carry a leading
  block axis, run under one `lax.scan` (`weights.stack_layers` converts); each step
  picks its attention (full or windows) with `lax.cond`.
  """

  config: VisionConfig
  dtype: Any
  remat: str = "none"
  attention: str = "xla_blocked"
  scan: bool = False

  @nn.compact
  def __call__(self, patches: Array, grid_hw: tuple[int, int]) -> tuple[Array, Array]:
    cfg = self.config
    const = vision_grid_constants(cfg, *grid_hw)
    n, p, _ = patches.shape
    x = layers.dense(cfg.hidden_size, "patch_embed", bias=False, dtype=self.dtype)(
      patches.astype(self.dtype)
    )
    cos, sin = jnp.asarray(const["cos"]), jnp.asarray(const["sin"])
    grid = tuple(grid_hw)
    if self.scan:
      full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)  # [depth]
      block = layers.rematerialized(VisionBlock, self.remat, scanned=True)
      scan = nn.scan(
        _scanned_block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.depth,
      )
      x, _ = scan(block(cfg, self.dtype, self.attention, grid, name="blocks"), x, full, cos, sin)
    else:
      block = layers.rematerialized(VisionBlock, self.remat, static_argnums=(4,))
      for i in range(cfg.depth):
        full = bool(i in cfg.fullatt_block_indexes)
        x = block(cfg, self.dtype, self.attention, grid, name=f"blocks_{i}")(x, cos, sin, full)
    merged = PatchMerger(cfg, self.dtype, name="merger")(x)
    return merged, jnp.zeros((0,) + merged.shape, merged.dtype)


class PatchMerger(nn.Module):
  """RMSNorm -> group 2x2 neighbours -> Linear -> exact GELU -> Linear (HF `mlp.0`, `mlp.2`)."""

  config: VisionConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, p, _ = x.shape
    unit = self.config.spatial_merge_size**2
    x = layers.RMSNorm(1e-6, self.dtype, name="ln_q")(x).reshape(n, p // unit, -1)
    x = nn.gelu(
      layers.dense(x.shape[-1], "mlp_0", bias=True, dtype=self.dtype)(x), approximate=False
    )
    return layers.dense(self.config.out_hidden_size, "mlp_2", bias=True, dtype=self.dtype)(x)
