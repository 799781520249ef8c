"""Blocked grouped attention, the prompt-started KV cache and the inverse-CDF sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segresearch_jax.agent import rollout
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import decoding, layers, policy


def _reference(q, k, v, allowed, scale):
  """Plain attention in sequence-major layout: q [B,T,Hq,D], k/v [B,S,Hkv,D], allowed [B,T,S]."""
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) * scale
  logits = np.where(allowed[:, None], logits, np.finfo(np.float32).min)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


def _grouped_jnp(q, k, v, scale, **kw):
  out = layers.grouped_attention(
    layers.heads_first(q, k.shape[2]), layers.keys_last(k), v.transpose(0, 2, 1, 3), scale, **kw
  )
  return layers.heads_last(out)


def _grouped(q, k, v, scale, **kw):
  return np.asarray(_grouped_jnp(q, k, v, scale, **kw))


def _qkv(b, t, s, hq=4, hkv=2, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return (
    rng.standard_normal((b, t, hq, d)).astype(np.float32),
    rng.standard_normal((b, s, hkv, d)).astype(np.float32),
    rng.standard_normal((b, s, hkv, d)).astype(np.float32),
  )


@pytest.fixture(params=["one_op", "loop"])
def path(request, monkeypatch):
  """Both ways of running the units: one batched op, and the CPU loop (small budget)."""
  if request.param == "loop":
    monkeypatch.setattr(layers, "_CPU_UNIT_LOGITS", 64)
    monkeypatch.setattr(layers, "_CAUSAL_BLOCK", 5)  # several blocks, one cut short
  return request.param


def test_causal_blocks_with_left_padding_match_reference(path):
  q, k, v = _qkv(2, 13, 13)
  valid = np.ones((2, 13), bool)
  valid[1, :4] = False  # left padding
  allowed = np.tril(np.ones((13, 13), bool))[None] & valid[:, None, :]
  out = _grouped(q, k, v, 0.3, key_valid=jnp.asarray(valid), causal=True)
  ref = _reference(q, k, v, allowed, 0.3)
  # Padding queries see no key; only real positions are compared.
  np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5)
  assert np.isfinite(out).all()


def test_query_slots_over_a_cache_match_reference(path):
  q, k, v = _qkv(3, 4, 11, seed=1)
  key_valid = np.random.default_rng(2).random((3, 11)) < 0.7
  key_valid[:, 0] = True
  start = np.array([0, 3, 6])
  slot = start[:, None] + np.arange(4)
  allowed = key_valid[:, None, :] & (np.arange(11)[None, None] <= slot[:, :, None])
  out = _grouped(q, k, v, 0.5, key_valid=jnp.asarray(key_valid), query_slot=jnp.asarray(slot))
  np.testing.assert_allclose(out, _reference(q, k, v, allowed, 0.5), atol=1e-5)


def test_key_extent_reads_only_the_prefix_that_holds_the_keys(path, monkeypatch):
  monkeypatch.setattr(layers, "_EXTENT_MIN", 1)
  monkeypatch.setattr(layers, "_EXTENT_ALIGN", 1)
  assert layers._extent_sizes(11) == (3, 6, 9, 11)
  q, k, v = _qkv(3, 2, 11, seed=3)
  ends = np.array([2, 5, 7])  # row b's keys fill slots < ends[b]
  key_valid = np.arange(11)[None] < ends[:, None]
  slot = ends[:, None] - 2 + np.arange(2)
  allowed = key_valid[:, None, :] & (np.arange(11)[None, None] <= slot[:, :, None])
  expected = _reference(q, k, v, allowed, 0.5)
  # NaNs past slot 9: whole-cache attention multiplies them by zero probabilities and
  # returns NaN; attention over the 9-slot prefix never reads them.
  k_nan, v_nan = k.copy(), v.copy()
  k_nan[:, 9:], v_nan[:, 9:] = np.nan, np.nan
  rows = dict(key_valid=jnp.asarray(key_valid), query_slot=jnp.asarray(slot))
  fn = jax.jit(lambda q, k, v, e: _grouped_jnp(q, k, v, 0.5, key_extent=e, **rows))
  for extent, kk, vv in ((7, k_nan, v_nan), (9, k_nan, v_nan), (11, k, v)):
    out = np.asarray(fn(q, kk, vv, jnp.asarray(extent, jnp.int32)))
    np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=f"extent {extent}")
  whole = _grouped(q, k_nan, v_nan, 0.5, **rows)
  assert np.isnan(whole).any()


def test_explicit_mask_and_public_attention_match_reference(path):
  q, k, v = _qkv(2, 6, 9, seed=3)
  mask = np.random.default_rng(4).random((2, 6, 9)) < 0.6
  mask[..., 0] = True
  ref = _reference(q, k, v, mask, 0.2)
  np.testing.assert_allclose(_grouped(q, k, v, 0.2, mask=jnp.asarray(mask)), ref, atol=1e-5)
  out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_loop_and_one_op_have_the_same_gradients(monkeypatch):
  q, k, v = (jnp.asarray(x) for x in _qkv(2, 12, 12, seed=5))
  valid = jnp.ones((2, 12), bool).at[0, :3].set(False)

  def loss(q, k, v):
    out = _grouped_jax(q, k, v, key_valid=valid, causal=True)
    return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) ** 2)

  batched = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  monkeypatch.setattr(layers, "_CPU_UNIT_LOGITS", 64)
  monkeypatch.setattr(layers, "_CAUSAL_BLOCK", 5)
  looped = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(batched, looped):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _reference_jnp(q, k, v, allowed, scale):
  """`_reference` in jnp (for autodiff)."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  logits = jnp.where(allowed[:, None], logits, np.finfo(np.float32).min)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("padded", [False, True])
def test_causal_gradients_match_autodiff_of_the_reference(path, padded):
  """The causal path's own backward (recomputed probabilities, no transposed
  [G, n, S] products) against autodiff of plain attention."""
  q, k, v = (jnp.asarray(x) for x in _qkv(2, 13, 13, seed=7))
  valid = np.ones((2, 13), bool)
  if padded:
    valid[1, :4] = False
  allowed = jnp.asarray(np.tril(np.ones((13, 13), bool))[None] & valid[:, None, :])
  weights = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape), jnp.float32)
  weights = weights * valid[:, :, None, None]  # padding queries' outputs are never used
  key_valid = jnp.asarray(valid) if padded else None

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  ours = jax.jit(
    jax.grad(loss(lambda *a: _grouped_jax(*a, key_valid=key_valid, causal=True)), (0, 1, 2))
  )(q, k, v)
  ref = jax.grad(loss(lambda *a: _reference_jnp(*a, allowed, 0.4)), (0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)
  # bf16 inputs: gradients come back in bf16, close to the fp32 ones.
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  low = jax.grad(
    lambda q, k, v: jnp.sum(
      _grouped_jax(q, k, v, key_valid=key_valid, causal=True).astype(jnp.float32) * weights
    ),
    (0, 1, 2),
  )(*bf16)
  for name, a, b in zip("qkv", low, ref):
    assert a.dtype == jnp.bfloat16, name
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=0.03 * scale)


def _grouped_jax(q, k, v, **kw):
  out = layers.grouped_attention(
    layers.heads_first(q, k.shape[2]), layers.keys_last(k), v.transpose(0, 2, 1, 3), 0.4, **kw
  )
  return layers.heads_last(out)


def test_mismatched_shapes_are_a_clear_error():
  q, k, v = (jnp.asarray(x) for x in _qkv(1, 4, 4))
  with pytest.raises(ValueError, match="do not match"):
    layers.grouped_attention(layers.heads_first(q, 2), k, v.transpose(0, 2, 1, 3), 1.0)
  with pytest.raises(ValueError, match="as many keys as queries"):
    kt, vt = layers.keys_last(k)[:, :, :, :3], v.transpose(0, 2, 1, 3)[:, :, :3]
    layers.grouped_attention(layers.heads_first(q, 2), kt, vt, 1.0, causal=True)
  with pytest.raises(ValueError, match="multiple"):
    layers.attention(q[:, :, :3], k, v, None, 1.0)


def test_prefill_prompt_equals_prefill_into_an_empty_cache():
  cfg = config_lib.get_preset("tiny")
  params = policy.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(10, 400, (2, 9)).astype(np.int32)
  valid = np.ones((2, 9), bool)
  valid[1, :3] = False  # left padding
  pos, next_pos = policy.rope_index(ids, valid, [[], []], cfg.image_token_id)
  args = (jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(valid))
  ref_logits, ref = decoding.prefill(params, cfg, policy.init_cache(cfg, 2, 14), *args)
  logits, cache = decoding.prefill_prompt(params, cfg, 14, *args)
  np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref_logits)[valid], atol=1e-5)
  assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, ref)
  np.testing.assert_array_equal(np.asarray(cache["valid"]), np.asarray(ref["valid"]))
  np.testing.assert_array_equal(np.asarray(cache["end"]), [9, 9])
  # Valid slots hold the same keys and values (padding slots are never attended to).
  slots = np.asarray(ref["valid"])  # [B, S]
  for a, b in zip(cache["k"], ref["k"]):  # [B, Hkv, D, S]
    np.testing.assert_allclose(
      np.asarray(a).transpose(0, 3, 1, 2)[slots],
      np.asarray(b).transpose(0, 3, 1, 2)[slots],
      atol=1e-5,
    )
  for a, b in zip(cache["v"], ref["v"]):  # [B, Hkv, S, D]
    np.testing.assert_allclose(
      np.asarray(a).transpose(0, 2, 1, 3)[slots],
      np.asarray(b).transpose(0, 2, 1, 3)[slots],
      atol=1e-5,
    )
  # Decoding goes on from either cache alike.
  step = lambda c: decoding.decode_step(
    params, cfg, c, jnp.asarray([5, 6]), jnp.asarray(next_pos, jnp.int32)
  )[0]
  np.testing.assert_allclose(np.asarray(step(cache)), np.asarray(step(ref)), atol=1e-5)
  with pytest.raises(ValueError, match="shorter than the chunk"):
    decoding.prefill_prompt(params, cfg, 5, *args)


def test_inverse_cdf_sampler_follows_the_distribution():
  probs = np.array([[0.5, 0.0, 0.2, 0.3] + [0.0] * 600])
  # Zero probability as the samplers mask it: the most negative float.
  logits = jnp.asarray(np.log(np.maximum(probs, 1e-45)), jnp.float32)
  logits = jnp.where(probs > 0, logits, jnp.finfo(jnp.float32).min)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: rollout.sample_categorical(k, logits)[0])(keys))
  counts = np.bincount(draws, minlength=604)
  assert counts[[1] + list(range(4, 604))].sum() == 0  # zero probability: never drawn
  # Within 4 standard deviations of the expected counts.
  for token, p in ((0, 0.5), (2, 0.2), (3, 0.3)):
    assert abs(counts[token] - 4000 * p) < 4 * np.sqrt(4000 * p * (1 - p))


def test_inverse_cdf_sampler_never_draws_past_the_last_positive_weight():
  # A target at the very top of the cumulative sum must land on a real token.
  cum = jnp.asarray([[1.0, 2.0, 2.0, 2.0]])
  assert int(rollout._first_above(cum, jnp.asarray([2.0]))[0]) == 1
  assert int(rollout._first_above(cum, jnp.asarray([0.5]))[0]) == 0
