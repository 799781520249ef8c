"""The rollout at paper scale: bf16 KV cache, a token budget, prompt prefix sharing."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rollout_config
from test_agent_rollout import (
  BANNED,
  CFG,
  FRAME_GRID,
  IM_END,
  KEY_END,
  KEY_GRID,
  OBS_MAX,
  PATTERNS,
  PD,
  SEARCH_END,
  SEARCH_GRID,
  TEXT_OBS,
  host_fn,
)

from configs import okvos as okvos_config
from segresearch_jax import config_checks, protocol
from segresearch_jax.agent import rollout
from segresearch_jax.models import decoding, policy

PROMPT = [60, CFG.vision_start_token_id] + [CFG.image_token_id] * 4 + [CFG.vision_end_token_id]
PROMPT = PROMPT + [61, CFG.vision_start_token_id] + [CFG.image_token_id] * 4
PROMPT = PROMPT + [CFG.vision_end_token_id, 70, 71, 72]
LP = len(PROMPT)


def _rollout(group_size, **overrides):
  rcfg = rollout_config(
    group_size=group_size,
    max_turns=3,
    max_response_length=64,
    max_action_length=16,
    max_obs_length=OBS_MAX,
    im_end_id=IM_END,
    frame_grid=FRAME_GRID,
    keyframe_grid=KEY_GRID,
    search_grid=SEARCH_GRID,
    banned_ids=BANNED,
    **overrides,
  )
  return rcfg, rollout.make_rollout_fn(CFG, rcfg, PATTERNS, host_fn, (4, PD))


def _batch(prompts, scripts=None, seed=0):
  """`prompts` rows with the same text and different frames; scripted tokens per ROW."""
  rng = np.random.default_rng(seed)
  ids = np.array([PROMPT] * prompts)
  mask = np.ones_like(ids)
  pos, next_pos = policy.rope_index(ids, mask, [[FRAME_GRID] * 2] * prompts, CFG.image_token_id)
  batch = rollout.PromptBatch(
    prompt_ids=jnp.asarray(ids, jnp.int32),
    prompt_valid=jnp.asarray(mask, bool),
    prompt_positions=jnp.asarray(pos),
    next_pos=jnp.asarray(next_pos),
    frame_patches=jnp.asarray(rng.standard_normal((prompts, 2, 16, PD)), jnp.float32),
    keyframe_patches=jnp.asarray(rng.standard_normal((prompts, 2, 36, PD)), jnp.float32),
  )
  if scripts is not None:
    forced = np.full((len(scripts), max(map(len, scripts))), -1, np.int32)
    for i, s in enumerate(scripts):
      forced[i, : len(s)] = s
    batch = batch.replace(forced_tokens=jnp.asarray(forced))
  return batch


def _repeat(batch, n):
  """Each prompt repeated `n` times as prompts of their own (no sharing)."""
  rep = lambda x: None if x is None else jnp.repeat(x, n, axis=0)
  fields = ("prompt_ids", "prompt_valid", "prompt_positions", "next_pos")
  fields += ("frame_patches", "keyframe_patches")
  return batch.replace(**{f: rep(getattr(batch, f)) for f in fields})


PARAMS = policy.init_params(CFG, jax.random.PRNGKey(0))
KEYS = ("response_ids", "response_positions", "loss_mask", "stop_reason", "num_turns", "obs_kind")


def _assert_same_episodes(a, b):
  for key in KEYS:
    np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_cache_takes_the_compute_dtype():
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  assert policy.init_cache(bf16, 2, 8)["k"][0].dtype == jnp.bfloat16
  assert policy.init_cache(CFG, 2, 8)["v"][0].dtype == jnp.float32
  ids = jnp.asarray([[5, 6, 7]], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(3)[None, None], (1, 3, 3))
  valid = jnp.ones((1, 3), bool)
  params = policy.init_params(bf16, jax.random.PRNGKey(0))
  _, cache = decoding.prefill_prompt(params, bf16, 8, ids, pos, valid)
  assert {c.dtype for c in cache["k"] + cache["v"]} == {jnp.dtype(jnp.bfloat16)}
  logits, cache = decoding.decode_step(params, bf16, cache, ids[:, 0], jnp.asarray([3]))
  assert cache["k"][0].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))


def test_a_chunk_running_past_the_cache_end_keeps_the_earlier_keys():
  # 5 tokens, then a chunk of 6 slots with 2 real tokens written at slot 5 of an
  # 8-slot cache: its padding runs past the end and must not shift over slots 0-4.
  ids = jnp.asarray([[5, 6, 7, 8, 9]], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(5)[None, None], (1, 3, 5))
  _, cache = decoding.prefill_prompt(PARAMS, CFG, 8, ids, pos, jnp.ones((1, 5), bool))
  nxt = jnp.asarray([[11, 12]], jnp.int32)
  nxt_pos = jnp.broadcast_to(5 + jnp.arange(2)[None, None], (1, 3, 2))
  exact, exact_cache = decoding.prefill(PARAMS, CFG, cache, nxt, nxt_pos, jnp.ones((1, 2), bool))
  padded = jnp.pad(nxt, ((0, 0), (0, 4)))
  padded_pos = jnp.pad(nxt_pos, ((0, 0), (0, 0), (0, 4)))
  valid = jnp.arange(6)[None] < 2
  out, out_cache = decoding.prefill(PARAMS, CFG, cache, padded, padded_pos, valid)
  np.testing.assert_allclose(out[:, :2], exact, atol=1e-5)
  assert int(out_cache["end"][0]) == 7
  for a, b in zip(out_cache["k"], exact_cache["k"], strict=True):
    np.testing.assert_allclose(a[..., :7], b[..., :7], atol=1e-6)  # slot 7: padding
  np.testing.assert_array_equal(out_cache["valid"], exact_cache["valid"])


def test_token_budget_stops_the_episode_at_max_length():
  # Row 0 finishes early; row 1 never ends a turn by itself (cut at max_action_length,
  # observed, and so on) and runs into the budget of 30 response slots.
  scripts = [[10, *SEARCH_END, 11, IM_END], [10] * 70]
  batch = _batch(1, scripts)
  _, free_fn = _rollout(2)
  rcfg, fn = _rollout(2, max_episode_tokens=LP + 30)
  assert rcfg.cache_length(LP) == LP + 30
  free = jax.device_get(free_fn(PARAMS, batch, jax.random.PRNGKey(1)))
  out = jax.device_get(fn(PARAMS, batch, jax.random.PRNGKey(1)))
  assert int(free.response_length[1]) > 30
  assert [protocol.STOP_REASONS[int(r)] for r in out.stop_reason] == ["finished", "max_length"]
  assert int(out.response_length[1]) == 30
  # What fits in the budget is the same episode as with the default cache.
  assert int(out.response_length[0]) == 1 + len(SEARCH_END) + len(TEXT_OBS) + 2
  n = int(out.response_length[0])
  np.testing.assert_array_equal(out.response_ids[0, :n], free.response_ids[0, :n])
  np.testing.assert_allclose(out.logprobs[0], free.logprobs[0], atol=1e-5)
  np.testing.assert_array_equal(out.response_ids[1, :30], free.response_ids[1, :30])


def test_a_budget_without_room_for_a_response_is_refused():
  rcfg, _ = _rollout(1, max_episode_tokens=LP)
  try:
    rcfg.cache_length(LP)
  except ValueError as e:
    assert "max_episode_tokens" in str(e)
  else:
    raise AssertionError("a budget of the prompt alone was accepted")


def test_prefix_sharing_gives_the_episodes_of_one_prefill_per_row():
  # 2 prompts x 4 sampled episodes (a scripted search and keyframe first, then free
  # sampling) against the same 8 rows as prompts of their own, each prefilled by
  # itself; prompt_index makes both runs draw from the same row streams.
  scripts = [[10, *SEARCH_END, 12, *KEY_END], [11, *KEY_END], [], [13]] * 2
  grouped = _batch(2, scripts)
  _, fn = _rollout(4)
  _, single_fn = _rollout(1)
  shared = jax.device_get(fn(PARAMS, grouped, jax.random.PRNGKey(3)))
  alone = _repeat(grouped, 4).replace(prompt_index=jnp.arange(8, dtype=jnp.int32))
  alone = jax.device_get(single_fn(PARAMS, alone, jax.random.PRNGKey(3)))
  assert int(shared.num_turns.sum()) >= 4 and int(shared.loss_mask.sum()) > 40
  _assert_same_episodes(shared, alone)


MESH_CHILD = """
import jax, numpy as np
from segresearch_jax import sharding
from segresearch_jax.models import policy
import test_rollout_scale as t

mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
rules = sharding.normalize_rules(sharding.DEFAULT_RULES)
params = jax.device_put(t.PARAMS, sharding.param_shardings(t.PARAMS, rules, mesh))
local = sharding.rollout_mesh(mesh)
assert dict(local.shape) == {"data": 1, "fsdp": 4, "tensor": 2}, local.shape
placed = sharding.rollout_params(params, local)
for leaf, trained in zip(jax.tree.leaves(placed), jax.tree.leaves(params)):
  assert leaf.sharding.mesh == local and len(leaf.devices()) == 8
  assert not {"data", "fsdp"} & set(jax.tree.leaves(tuple(leaf.sharding.spec)))
  assert tuple(leaf.sharding.spec) == tuple(
    sharding.rollout_spec(trained.sharding.spec)), (leaf.sharding, trained.sharding)
  np.testing.assert_array_equal(np.asarray(leaf), np.asarray(trained))
split = [x for x in jax.tree.leaves(placed) if "tensor" in jax.tree.leaves(tuple(x.sharding.spec))]
assert len(split) >= 4, len(split)
scripts = [[10, *t.SEARCH_END, 12, *t.KEY_END], [11, *t.KEY_END], [], [13]] * 2
batch = t._batch(2, scripts)
rcfg, fn = t._rollout(4)
import segresearch_jax.agent.rollout as rollout
sharded_fn = rollout.make_rollout_fn(t.CFG, rcfg, t.PATTERNS, t.host_fn, (4, t.PD), mesh=local)
one = jax.device_get(fn(t.PARAMS, batch, jax.random.PRNGKey(3)))
out = sharded_fn(placed, batch, jax.random.PRNGKey(3))
assert len(out.response_ids.devices()) == 8
t._assert_same_episodes(jax.device_get(out), one)
# Evaluation's rollout (greedy, one episode a prompt) on the same devices.
greedy, greedy_fn = t._rollout(1, temperature=0.0)
batch = t._batch(8, scripts)
sharded_greedy = rollout.make_rollout_fn(
  t.CFG, greedy, t.PATTERNS, t.host_fn, (4, t.PD), mesh=local)
one_greedy = jax.device_get(greedy_fn(t.PARAMS, batch, jax.random.PRNGKey(0)))
t._assert_same_episodes(
  jax.device_get(sharded_greedy(placed, batch, jax.random.PRNGKey(0))), one_greedy)
print("OK", int(one.num_turns.sum()), int(one.loss_mask.sum()))
"""


@pytest.mark.slow
def test_rollout_over_eight_devices_equals_one_device():
  # Parameters in the training layout over data 2 x fsdp 2 x tensor 2, regathered on
  # device for the rollout (tensor splits kept); rows over 4 devices, KV heads over 2;
  # the training rollout and evaluation's greedy one.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = os.pathsep.join(
    [str(pathlib.Path(__file__).parent), env.get("PYTHONPATH", "")]
  )
  done = subprocess.run(
    [sys.executable, "-c", MESH_CHILD], env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-4000:]
  assert done.stdout.startswith("OK")


def _row_host_fn(pending, actions, act_len):
  """`host_fn`, but a search's observation names the host row it was asked for."""
  obs, obs_len, kind, slot, patches = host_fn(pending, actions, act_len)
  for r in np.flatnonzero(pending & (kind == 0)):
    obs[r, 0] = 200 + r
  return obs, obs_len, kind, slot, patches


def test_continuous_batching_gives_the_episodes_of_one_slot_per_episode():
  # 8 episodes of mixed lengths (scripted starts, then free sampling) on 3 slots: a
  # slot whose episode ends takes the next. Same episodes, host rows and streams as 8
  # slots, with fewer slot-steps computed.
  scripts = [[IM_END], [10, *SEARCH_END, 12, *KEY_END], [11, IM_END], [], [13, *SEARCH_END]]
  scripts += [[IM_END], [14, 15, *SEARCH_END], [16]]
  batch = _batch(2, scripts).replace(prompt_index=jnp.asarray([3, 1], jnp.int32))
  outs = {}
  for slots in (0, 3):
    rcfg = rollout_config(
      group_size=4,
      max_turns=3,
      max_response_length=48,
      max_action_length=16,
      max_obs_length=OBS_MAX,
      im_end_id=IM_END,
      frame_grid=FRAME_GRID,
      keyframe_grid=KEY_GRID,
      search_grid=SEARCH_GRID,
      banned_ids=BANNED,
      slots=slots,
    )
    fn = rollout.make_rollout_fn(CFG, rcfg, PATTERNS, _row_host_fn, (4, PD))
    outs[slots] = jax.device_get(fn(PARAMS, batch, jax.random.PRNGKey(7)))
  full, slotted = outs[0], outs[3]
  lengths = np.asarray(full.response_length)
  assert lengths.min() <= 2 and lengths.max() >= 20, lengths  # mixed lengths
  ids = np.asarray(full.response_ids)
  assert 200 + 1 in ids[1] and 200 + 4 in ids[4]  # the host's row is the episode
  _assert_same_episodes(slotted, full)
  np.testing.assert_array_equal(slotted.search_patches, full.search_patches)
  # One slot per episode: the loop runs until the longest episode's last draw.
  assert int(full.decode_steps) == np.asarray(full.loss_mask).sum(1).max()
  assert 3 * int(slotted.decode_steps) < 8 * int(full.decode_steps)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("max_episode_tokens", 272, "must exceed config.rollout.max_prompt_length=272"),
    ("max_episode_tokens", -1, "max_episode_tokens=-1 is out of range"),
    ("slots", -2, "slots=-2 is out of range"),
  ],
)
def test_config_refuses_a_budget_or_slot_count_that_cannot_run(field, value, message):
  config = okvos_config.get_config()
  config.rollout[field] = value
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config)
