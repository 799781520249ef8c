"""Layers shared by the Qwen-VL families: norms, rotary helpers, attention, MLPs.

Parameter names follow the HF checkpoints (`q_proj`, `gate_proj`, ...) so weight
conversion is a rename plus a transpose. Numerics follow transformers where it
matters for parity: norms and softmax in fp32, rotary tables in fp32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class RMSNorm(nn.Module):
  """RMS norm computed in fp32, scaled after casting back (as transformers does)."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return weight.astype(self.dtype) * x32.astype(self.dtype)


def layer_norm(name: str, *, eps: float, dtype: jnp.dtype) -> nn.LayerNorm:
  """LayerNorm with two-pass variance and fp32 statistics, as torch computes it."""
  return nn.LayerNorm(
    epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name
  )


def dense(features: int, name: str, *, bias: bool, dtype: jnp.dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def rotate_half(x: Array) -> Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates `x [..., T, H, D]` by tables `[..., T, D]` in fp32; returns x's dtype."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def mrope_axis_of_frequency(
  head_dim: int, section: tuple[int, int, int], interleaved: bool
) -> np.ndarray:
  """Which position axis (0=T, 1=H, 2=W) drives each of the head_dim/2 frequencies.

  Qwen3-VL interleaves the axes (T H W T H W ... then T for the tail); Qwen2.5-VL
  uses contiguous blocks of `section` sizes.
  """
  half = head_dim // 2
  if sum(section) != half:
    raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {half}.")
  axis = np.zeros(half, np.int32)
  if interleaved:
    for dim in (1, 2):
      axis[dim : section[dim] * 3 : 3] = dim
  else:
    axis[section[0] : section[0] + section[1]] = 1
    axis[section[0] + section[1] :] = 2
  return axis


def mrope_tables(
  positions: Array, head_dim: int, theta: float, section: tuple[int, int, int], interleaved: bool
) -> tuple[Array, Array]:
  """cos/sin tables `[B, T, head_dim]` for M-RoPE positions `[3, B, T]`."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  axis = mrope_axis_of_frequency(head_dim, section, interleaved)
  pos = positions.astype(jnp.float32)[axis]  # [half, B, T]: each frequency's own axis.
  freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, T, half]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_rope_tables(rows: np.ndarray, cols: np.ndarray, head_dim: int, theta: float):
  """2-D vision rotary tables `[N, head_dim]` for patch (row, col) coordinates (numpy)."""
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
  freqs = np.concatenate(
    [rows[:, None].astype(np.float32) * inv_freq, cols[:, None].astype(np.float32) * inv_freq],
    axis=-1,
  )
  emb = np.concatenate([freqs, freqs], axis=-1)
  return np.cos(emb), np.sin(emb)


def attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float) -> Array:
  """Grouped-query attention with an fp32 softmax.

  Args:
    q: [B, T, Hq, D] queries.
    k: [B, S, Hkv, D] keys; Hq must be a multiple of Hkv.
    v: [B, S, Hkv, D] values.
    mask: bool [B, T, S] (True = attend) or None.
    scale: logit scale, usually D**-0.5.

  Returns:
    [B, T, Hq, D] in q's dtype.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, hq // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, hq, d)


class SwiGLU(nn.Module):
  """down(act(gate(x)) * up(x)); Qwen LMs use SiLU, Qwen2.5-VL's vision MLP too."""

  intermediate_size: int
  bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gate = dense(self.intermediate_size, "gate_proj", bias=self.bias, dtype=self.dtype)(x)
    up = dense(self.intermediate_size, "up_proj", bias=self.bias, dtype=self.dtype)(x)
    return dense(x.shape[-1], "down_proj", bias=self.bias, dtype=self.dtype)(nn.silu(gate) * up)


def merge_block_coords(grid_h: int, grid_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Patch (row, col) in the processor's 2x2 merge-block order (numpy, host side)."""
  if grid_h % merge or grid_w % merge:
    raise ValueError(f"Patch grid {grid_h}x{grid_w} is not divisible by merge size {merge}.")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  block = (grid_h // merge, merge, grid_w // merge, merge)
  return (
    rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
    cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
  )
