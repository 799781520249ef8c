"""Qwen3-VL vision tower: learned position table, 2-D rope, LayerNorm blocks, DeepStack.

The language model is shared with Qwen2.5-VL and lives in `policy.py`.
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


# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def vision_grid_constants(vision: VisionConfig, grid_h: int, grid_w: int) -> dict[str, np.ndarray]:
  """Per-patch constants for a (grid_h, grid_w) patch grid, in 2x2 merge-block order.

  Returns the bilinear (align_corners) taps into the learned position table, their
  weights, and the 2-D rotary tables. Computed once on the host per grid.
  """
  rows, cols = layers.merge_block_coords(grid_h, grid_w, vision.spatial_merge_size)

  side = int(round(vision.num_position_embeddings**0.5))
  if side * side != vision.num_position_embeddings:
    raise ValueError("num_position_embeddings must be a perfect square.")

  def taps(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    src = index.astype(np.float32) * (side - 1) / max(size - 1, 1)
    lo = np.floor(src)
    idx = np.clip(lo[:, None].astype(np.int64) + np.arange(2), 0, side - 1)
    w = np.clip(1.0 - np.abs(src[:, None] - lo[:, None] - np.arange(2)), 0.0, None)
    return idx, w.astype(np.float32)

  h_idx, h_w = taps(rows, grid_h)
  w_idx, w_w = taps(cols, grid_w)
  pos_index = (h_idx[:, :, None] * side + w_idx[:, None, :]).reshape(-1, 4)
  pos_weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
  cos, sin = layers.vision_rope_tables(rows, cols, vision.head_dim, vision.rope_theta)
  return dict(pos_index=pos_index, pos_weight=pos_weight, cos=cos, sin=sin)


class VisionBlock(nn.Module):
  config: VisionConfig
  dtype: Any
  attention: str = "xla_blocked"  # see `layers.self_attention`

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
    cfg = self.config
    n, p, d = x.shape  # [images, patches, width]
    h = layers.layer_norm("norm1", eps=cfg.layer_norm_eps, dtype=self.dtype)(x)
    qkv = layers.dense(3 * d, "qkv", bias=True, dtype=self.dtype)(h)
    qkv = qkv.reshape(n, p, 3, cfg.num_heads, cfg.head_dim)
    q = layers.apply_rotary(qkv[:, :, 0], cos, sin)
    k = layers.apply_rotary(qkv[:, :, 1], cos, sin)
    # Each image is its own attention segment: images are the batch axis.
    if layers.resolve_attention(self.attention) == "xla_blocked":
      attn = layers.attention(q, k, qkv[:, :, 2], None, cfg.head_dim**-0.5)
    else:
      attn = layers.self_attention(
        q,
        k,
        qkv[:, :, 2],
        cfg.head_dim**-0.5,
        causal=False,
        key_valid=None,
        implementation=self.attention,
      )
    attn = attn.reshape(n, p, d)
    x = x + layers.dense(d, "proj", bias=True, dtype=self.dtype)(attn)
    h = layers.layer_norm("norm2", eps=cfg.layer_norm_eps, dtype=self.dtype)(x)
    h = layers.dense(cfg.intermediate_size, "linear_fc1", bias=True, dtype=self.dtype)(h)
    h = nn.gelu(h, approximate=True)
    return x + layers.dense(d, "linear_fc2", bias=True, dtype=self.dtype)(h)


class PatchMerger(nn.Module):
  """norm -> group 2x2 neighbours -> Linear -> exact GELU -> Linear."""

  config: VisionConfig
  postshuffle_norm: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    n, p, d = x.shape
    unit = cfg.spatial_merge_size**2
    width = d * unit
    norm = layers.layer_norm("norm", eps=cfg.layer_norm_eps, dtype=self.dtype)
    x = norm(x.reshape(n, p // unit, width)) if self.postshuffle_norm else norm(x)
    x = x.reshape(n, p // unit, width)
    x = layers.dense(width, "linear_fc1", bias=True, dtype=self.dtype)(x)
    x = nn.gelu(x, approximate=False)
    return layers.dense(cfg.out_hidden_size, "linear_fc2", bias=True, dtype=self.dtype)(x)


def _tapped_block(block: VisionBlock, carry, tap, cos, sin):
  """One step of the scanned tower: carry (hidden, DeepStack taps); the block's output
  is written to tap slot `tap` (the last, unused slot for blocks that are not tapped).
  The write is linear, so the backward pass keeps no copy of the taps per block."""
  x, taps = carry
  x = block(x, cos, sin)
  return (x, jax.lax.dynamic_update_index_in_dim(taps, x, tap, 0)), None


class VisionTower(nn.Module):
  """Patches `[N, P, C*T*p*p]` of N same-size images -> merged tokens + DeepStack features.

  `remat` and `attention` as in `ModelConfig` (per block; the parameters are the same).
  With `scan` the blocks are one module `blocks` whose parameters carry a leading
  block axis, run under one `lax.scan` (`weights.stack_layers` converts).
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
    x = layers.dense(cfg.hidden_size, "patch_embed", bias=True, dtype=self.dtype)(
      patches.astype(self.dtype)
    )
    table = self.param(
      "pos_embed",
      nn.initializers.normal(0.02),
      (cfg.num_position_embeddings, cfg.hidden_size),
      jnp.float32,
    )
    pos = jnp.einsum("pk,pkd->pd", const["pos_weight"], table[const["pos_index"]])
    x = x + pos.astype(x.dtype)
    cos, sin = jnp.asarray(const["cos"]), jnp.asarray(const["sin"])
    deepstack = []
    block = layers.rematerialized(VisionBlock, self.remat, scanned=self.scan)
    taps = cfg.deepstack_visual_indexes
    if self.scan:
      tap_of = np.full(cfg.depth, len(taps), np.int32)  # [depth] tap slot of each block
      tap_of[list(taps)] = np.arange(len(taps))
      scan = nn.scan(
        _tapped_block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.depth,
      )
      tapped = jnp.zeros((len(taps) + 1, *x.shape), x.dtype)  # [taps + 1, N, P, D]
      (x, tapped), _ = scan(
        block(cfg, self.dtype, self.attention, name="blocks"),
        (x, tapped),
        jnp.asarray(tap_of),
        cos,
        sin,
      )
      features = [tapped[j] for j in range(len(taps))]
    else:
      features = [None] * len(taps)
      for i in range(cfg.depth):
        x = block(cfg, self.dtype, self.attention, name=f"blocks_{i}")(x, cos, sin)
        if i in taps:
          features[taps.index(i)] = x
    for j, tap in enumerate(features):
      deepstack.append(PatchMerger(cfg, True, self.dtype, name=f"deepstack_merger_{j}")(tap))
    merged = PatchMerger(cfg, False, self.dtype, name="merger")(x)
    if deepstack:
      return merged, jnp.stack(deepstack)
    return merged, jnp.zeros((0,) + merged.shape, merged.dtype)
