"""What a decode step of the policy could cost on this machine, for the decode benchmarks.

Three yardsticks for one step of `batch` rows over a KV cache of `cache_len` slots:

- `read_bandwidth`: bytes/s of a jitted sum; the language model's weights plus the KV
  cache over it is the memory floor of a step.
- `matmul_rate`: FLOP/s of one [batch, hidden] x [hidden, intermediate] matmul.
- `dots_alone_s`: the step's matrix products alone (q/k/v/o, the MLP, attention's
  two products against a full cache, the LM head), chained layer after layer and
  jitted, with none of the norms, rotary, softmax, masks, cache writes or sampling.
  It is what XLA's own kernels take for the products a decode step cannot skip:
  a step can only beat it by computing fewer products or faster ones.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from segresearch_jax.models.config import ModelConfig


def _best_s(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def read_bandwidth() -> float:
  """Bytes/s of a jitted sum over 256 MB: what a decode step does with weights and cache.

  (An elementwise copy would also count the page faults of a fresh 256 MB output,
  which a decode step does not pay, and put the floor too high.)
  """
  x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
  return x.nbytes / _best_s(jax.jit(jnp.sum), x, repeats=5)


def matmul_rate(m: int, k: int, n: int) -> float:
  """FLOP/s of a jitted fp32 [m, k] x [k, n] matmul, the shape of a decode step's MLP."""
  a, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
  return 2 * m * k * n / _best_s(jax.jit(jnp.matmul), a, w, repeats=20)


def text_bytes(params: Any) -> int:
  """Bytes of the language model's parameters (all but the vision tower)."""
  return sum(
    x.nbytes for key, tree in params.items() if key != "visual" for x in jax.tree.leaves(tree)
  )


def kv_bytes(config: ModelConfig, batch: int, cache_len: int) -> int:
  """Bytes of an fp32 KV cache (keys and values of every layer)."""
  t = config.text
  return 2 * t.num_layers * batch * cache_len * t.num_kv_heads * t.head_dim * 4


def dots_alone_s(params: Any, config: ModelConfig, batch: int, cache_len: int) -> float:
  """Seconds of a decode step's matrix products alone (see the module docstring).

  Same weights as the step (the real parameter arrays, one set per layer, so they
  come from memory as in the step) and a cache of the same size per layer, in the
  layout `layers.grouped_attention` reads. Best of 5.
  """
  t = config.text
  b, hkv, d = batch, t.num_kv_heads, t.head_dim
  g = t.num_heads // hkv
  units = b * hkv
  weights = [
    {
      name: params[f"layers_{i}"][name]["kernel"]
      for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    | {
      name: params[f"layers_{i}"]["mlp"][name]["kernel"]
      for name in ("gate_proj", "up_proj", "down_proj")
    }
    for i in range(t.num_layers)
  ]
  if t.tie_word_embeddings:
    head, head_dims = params["embed_tokens"]["embedding"], ((1,), (1,))  # x @ E^T
  else:
    head, head_dims = params["lm_head"]["kernel"], ((1,), (0,))
  keys = [jnp.full((units, d, cache_len), 1e-2, jnp.float32) for _ in range(t.num_layers)]
  values = [jnp.full((units, cache_len, d), 1e-2, jnp.float32) for _ in range(t.num_layers)]

  def step(x, weights, keys, values, head):
    for w, k_cache, v_cache in zip(weights, keys, values):
      q, k, v = x @ w["q_proj"], x @ w["k_proj"], x @ w["v_proj"]
      logits = jnp.einsum("ugd,uds->ugs", q.reshape(units, g, d), k_cache)
      attn = jnp.einsum("ugs,usd->ugd", logits, v_cache).reshape(b, -1)
      # k and v feed the chain so that their products are not dropped.
      x = x + (attn + jnp.tile(k + v, (1, g))) @ w["o_proj"]
      x = x + ((x @ w["gate_proj"]) * (x @ w["up_proj"])) @ w["down_proj"]
    return jax.lax.dot_general(x, head, (head_dims, ((), ())))

  x = jnp.full((b, t.hidden_size), 1e-3, jnp.float32)
  return _best_s(jax.jit(step), x, weights, keys, values, head, repeats=5)
