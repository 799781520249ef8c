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
  config: VisionConfig
  dtype: Any
  attention: str = "xla_blocked"  # see `layers.self_attention`

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, grid_hw: tuple[int, int] | None) -> Array:
    """`grid_hw` is the patch grid for window attention, None for full attention
    (static: the window layout is host-side constants)."""
    cfg = self.config
    windows = None
    if grid_hw is not None:
      const = vision_grid_constants(cfg, *grid_hw)
      windows = (const["window_index"], const["window_inverse"])
    n, p, d = x.shape  # [images, patches, width]
    h = layers.RMSNorm(1e-6, self.dtype, name="norm1")(x)
    qkv = layers.dense(3 * d, "qkv", bias=True, dtype=self.dtype)(h)
    qkv = qkv.reshape(n, p, 3, cfg.num_heads, cfg.head_dim)
    q = layers.apply_rotary(qkv[:, :, 0], cos, sin)
    k = layers.apply_rotary(qkv[:, :, 1], cos, sin)
    v = qkv[:, :, 2]
    fused = layers.resolve_attention(self.attention) != "xla_blocked"
    if windows is None and not fused:
      attn = layers.attention(q, k, v, None, cfg.head_dim**-0.5)
    elif windows is None:
      attn = layers.self_attention(
        q, k, v, cfg.head_dim**-0.5, causal=False, key_valid=None, implementation=self.attention
      )
    elif fused:
      index, inverse = windows
      w, slots = index.shape
      group = lambda t: t[:, np.maximum(index, 0)].reshape(n * w, slots, *t.shape[2:])
      key_valid = jnp.asarray(np.broadcast_to(index >= 0, (n, w, slots)).reshape(n * w, slots))
      attn = layers.self_attention(
        group(q),
        group(k),
        group(v),
        cfg.head_dim**-0.5,
        causal=False,
        key_valid=key_valid,
        implementation=self.attention,
      )
      attn = attn.reshape(n, w * slots, *attn.shape[2:])[:, inverse]
    else:
      index, inverse = windows  # [W, S] patch per slot (-1 pad), [P] slot per patch
      w, slots = index.shape
      # Windows become the batch axis; padding slots are masked keys.
      group = lambda t: t[:, np.maximum(index, 0)].reshape(n * w, slots, *t.shape[2:])
      key_valid = jnp.asarray(np.broadcast_to(index >= 0, (n, w, slots)).reshape(n * w, slots))
      attn = layers.grouped_attention(
        layers.heads_first(group(q), cfg.num_heads),
        layers.keys_last(group(k)),
        group(v).transpose(0, 2, 1, 3),
        cfg.head_dim**-0.5,
        key_valid=key_valid,
      )
      attn = layers.heads_last(attn)  # [n * w, slots, heads, head_dim]
      attn = attn.reshape(n, w * slots, *attn.shape[2:])[:, inverse]
    attn = attn.reshape(n, p, d)
    x = x + layers.dense(d, "proj", bias=True, dtype=self.dtype)(attn)
    h = layers.RMSNorm(1e-6, self.dtype, name="norm2")(x)
    return x + layers.SwiGLU(cfg.intermediate_size, bias=True, dtype=self.dtype, name="mlp")(h)


class VisionTower(nn.Module):
  """Patches `[N, P, C*T*p*p]` of N same-size images -> merged tokens (no DeepStack).

  `remat` and `attention` as in `ModelConfig` (per block; the parameters are the same).
  """

  config: VisionConfig
  dtype: Any
  remat: str = "none"
  attention: str = "xla_blocked"

  @nn.compact
  def __call__(self, patches: Array, grid_hw: tuple[int, int]) -> tuple[Array, Array]:
    cfg = self.config
    const = vision_grid_constants(cfg, *grid_hw)
    n, p, _ = patches.shape
    x = layers.dense(cfg.hidden_size, "patch_embed", bias=False, dtype=self.dtype)(
      patches.astype(self.dtype)
    )
    cos, sin = jnp.asarray(const["cos"]), jnp.asarray(const["sin"])
    block = layers.rematerialized(VisionBlock, self.remat, static_argnums=(4,))
    for i in range(cfg.depth):
      full = i in cfg.fullatt_block_indexes
      x = block(cfg, self.dtype, self.attention, name=f"blocks_{i}")(
        x, cos, sin, None if full else tuple(grid_hw)
      )
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
