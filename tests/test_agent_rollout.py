"""The jitted multi-turn rollout, driven by a scripted policy and a scripted host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rollout_config

from segresearch_jax import protocol, steps
from segresearch_jax.agent import rollout
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import decoding, policy
from segresearch_jax.rl import rows as rows_lib

CFG = config_lib.get_preset("tiny")
PD = CFG.vision.patch_dim
IM_END = 500
SEARCH_END = (40, 41)  # "</search>" as two tokens
KEY_END = (42,)  # "</keyframe>" as one token
TEXT_OBS = [300, 301, 302]
KEY_SLOT = 1
FRAME_GRID, KEY_GRID, SEARCH_GRID = (2, 2), (3, 3), (1, 1)  # merged tokens
NK = KEY_GRID[0] * KEY_GRID[1]
KEY_OBS = (
  [303, CFG.vision_start_token_id] + [CFG.image_token_id] * NK + [CFG.vision_end_token_id, 304]
)
PATTERNS = np.array([[SEARCH_END[0], SEARCH_END[1]], [-1, KEY_END[0]]], np.int32)


def host_fn(pending, actions, act_len):
  """A scripted environment: search -> text observation, keyframe -> frame KEY_SLOT."""
  b = pending.shape[0]
  obs = np.zeros((b, OBS_MAX), np.int32)
  obs_len = np.zeros((b,), np.int32)
  kind = np.zeros((b,), np.int32)
  slot = np.full((b,), -1, np.int32)
  for r in np.flatnonzero(pending):
    act = list(actions[r, : act_len[r]])
    toks, k = (KEY_OBS, protocol.KEYFRAME_IMAGE) if act[-1:] == list(KEY_END) else (TEXT_OBS, 0)
    obs[r, : len(toks)] = toks
    obs_len[r], kind[r] = len(toks), k
    slot[r] = KEY_SLOT if k else -1
  return obs, obs_len, kind, slot, np.zeros((b, 4, PD), np.float32)


OBS_MAX = 24


BANNED = (CFG.image_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id)


def _setup(scripts, max_turns=3, group_size=1, temperature=1.0, observe_rows=0):
  rcfg = rollout_config(
    observe_rows=observe_rows,
    group_size=group_size,
    max_turns=max_turns,
    max_response_length=64,
    max_action_length=16,
    max_obs_length=OBS_MAX,
    temperature=temperature,
    im_end_id=IM_END,
    frame_grid=FRAME_GRID,
    keyframe_grid=KEY_GRID,
    search_grid=SEARCH_GRID,
    banned_ids=BANNED,
  )
  fn = rollout.make_rollout_fn(CFG, rcfg, PATTERNS, host_fn, (4, PD))
  b = len(scripts)
  prompts = b // group_size
  rng = np.random.default_rng(0)
  frames = 2
  row = []
  for fid in range(frames):
    row += (
      [60 + fid, CFG.vision_start_token_id] + [CFG.image_token_id] * 4 + [CFG.vision_end_token_id]
    )
  row += [70, 71, 72]
  ids = np.array([row] * prompts)
  mask = np.ones_like(ids)
  pos, next_pos = policy.rope_index(
    ids, mask, [[FRAME_GRID] * frames] * prompts, CFG.image_token_id
  )
  batch = rollout.PromptBatch(
    prompt_ids=jnp.asarray(ids, jnp.int32),
    prompt_valid=jnp.asarray(mask, bool),
    prompt_positions=jnp.asarray(pos),
    next_pos=jnp.asarray(next_pos),
    frame_patches=jnp.asarray(rng.standard_normal((prompts, frames, 16, PD)), jnp.float32),
    keyframe_patches=jnp.asarray(rng.standard_normal((prompts, frames, 36, PD)), jnp.float32),
  )
  width = max(len(s) for s in scripts)
  forced = np.full((b, width), -1, np.int32)
  for i, s in enumerate(scripts):
    forced[i, : len(s)] = s
  batch = batch.replace(forced_tokens=jnp.asarray(forced))
  params = policy.init_params(CFG, jax.random.PRNGKey(0))
  return params, rcfg, batch, fn


def _response(out, row):
  n = int(out.response_length[row])
  return list(np.asarray(out.response_ids[row, :n])), list(np.asarray(out.loss_mask[row, :n]))


def test_search_keyframe_answer_sequence_token_for_token():
  script = [10, 11, *SEARCH_END, 12, *KEY_END, 13, 14, IM_END]
  params, _, batch, fn = _setup([script])
  out = fn(params, batch, jax.random.PRNGKey(1))
  tokens, mask = _response(out, 0)
  expected = [10, 11, *SEARCH_END] + TEXT_OBS + [12, *KEY_END] + KEY_OBS + [13, 14, IM_END]
  expected_mask = [1] * 4 + [0] * 3 + [1] * 2 + [0] * len(KEY_OBS) + [1] * 3
  assert tokens == expected
  assert mask == expected_mask
  assert protocol.STOP_REASONS[int(out.stop_reason[0])] == "finished"
  assert int(out.num_turns[0]) == 2
  assert list(np.asarray(out.obs_kind[0, :2])) == [0, protocol.KEYFRAME_IMAGE]
  assert int(out.obs_slot[0, 1]) == KEY_SLOT


def test_action_on_last_turn_is_kept_but_not_executed():
  script = [10, *SEARCH_END, 11, *SEARCH_END, 12]
  params, _, batch, fn = _setup([script], max_turns=1)
  out = fn(params, batch, jax.random.PRNGKey(1))
  tokens, mask = _response(out, 0)
  assert tokens == [10, *SEARCH_END] + TEXT_OBS + [11, *SEARCH_END]
  assert mask == [1] * 3 + [0] * 3 + [1] * 3
  assert protocol.STOP_REASONS[int(out.stop_reason[0])] == "max_turns"
  assert int(out.num_turns[0]) == 1


def test_rows_stop_at_different_turns_and_one_never_calls_a_tool():
  scripts = [
    [10, IM_END],
    [10, *SEARCH_END, 11, IM_END],
    [10, *SEARCH_END, 11, *KEY_END, 12, IM_END],
  ]
  params, _, batch, fn = _setup(scripts, group_size=3)
  out = fn(params, batch, jax.random.PRNGKey(1))
  assert [int(t) for t in out.num_turns] == [0, 1, 2]
  assert _response(out, 0)[0] == [10, IM_END]
  assert _response(out, 1)[0] == [10, *SEARCH_END] + TEXT_OBS + [11, IM_END]
  assert _response(out, 2)[0] == [10, *SEARCH_END] + TEXT_OBS + [11, *KEY_END] + KEY_OBS + [
    12,
    IM_END,
  ]
  assert all(protocol.STOP_REASONS[int(r)] == "finished" for r in out.stop_reason)


def test_empty_and_max_length_stop_reasons():
  params, _, batch, fn = _setup([[IM_END], [10] * 70], group_size=2)
  out = fn(params, batch, jax.random.PRNGKey(1))
  # Row 1 has no stop string: its turn is cut at max_action_length and the cut action
  # is sent to the host like any other, until the response is full.
  assert [protocol.STOP_REASONS[int(r)] for r in out.stop_reason] == ["empty", "max_length"]
  assert int(out.response_length[1]) <= 64


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs(temperature):
  # Scripted prefix (search, then keyframe with a high-res image), then free sampling.
  scripts = [[10, *SEARCH_END, 12, *KEY_END], [11, *KEY_END]]
  params, rcfg, batch, fn = _setup(scripts, group_size=2, temperature=temperature)
  out = fn(params, batch, jax.random.PRNGKey(3))
  rows = rows_lib.training_rows(batch, out, rcfg.group_size)
  ids, pos, valid, visual, deepstack = steps.training_inputs(params, CFG, rcfg, rows)
  logp = decoding.token_logprobs(
    params,
    CFG,
    ids,
    pos,
    valid,
    visual,
    deepstack,
    temperature=temperature,
    chunk_size=32,
    banned_ids=BANNED,
  )
  lp = batch.prompt_ids.shape[1]
  mask = np.asarray(out.loss_mask)
  assert mask.sum() > 10
  generated = np.asarray(out.response_ids)[mask]
  assert not np.isin(generated, BANNED).any()
  np.testing.assert_allclose(
    np.asarray(logp)[:, lp:][mask], np.asarray(out.logprobs)[mask], atol=1e-5
  )


def test_observations_prefilled_in_chunks_equal_the_full_batch_prefill():
  # Rows 0 and 1 wait at the same step, row 2 later, row 3 never; then free sampling.
  scripts = [
    [10, *SEARCH_END, 12, *KEY_END],
    [11, *SEARCH_END],
    [10, 11, 12, 13, *KEY_END, 14, *SEARCH_END],
    [15, 16],
  ]
  outs = {}
  for rows in (4, 2, 1):  # 4 = one prefill of the whole batch
    params, rcfg, batch, fn = _setup(scripts, group_size=4, observe_rows=rows)
    assert rcfg.observe_chunk(4) == rows
    outs[rows] = jax.device_get(fn(params, batch, jax.random.PRNGKey(5)))
  full = outs[4]
  assert int(full.num_turns.sum()) >= 5
  for rows in (2, 1):
    for key in ("response_ids", "response_positions", "loss_mask", "stop_reason", "num_turns"):
      np.testing.assert_array_equal(
        getattr(outs[rows], key), getattr(full, key), err_msg=f"{key}, {rows} rows"
      )
    np.testing.assert_allclose(outs[rows].logprobs, full.logprobs, atol=1e-5)


def test_observe_chunk_divides_the_batch():
  def cfg(observe_rows):
    return rollout_config(
      observe_rows=observe_rows,
      im_end_id=IM_END,
      frame_grid=FRAME_GRID,
      keyframe_grid=KEY_GRID,
      search_grid=SEARCH_GRID,
      banned_ids=BANNED,
    )

  assert [cfg(0).observe_chunk(b) for b in (1, 16, 32, 48, 56, 128)] == [1, 1, 2, 3, 2, 8]
  assert cfg(3).observe_chunk(16) == 2
  assert cfg(64).observe_chunk(16) == 16


def test_observation_positions_continue_after_an_image():
  obs = jnp.asarray([[1, 2, 9, 9, 9, 9, 9, 9, 3, 0]])  # two text, 2x3 image, one text, pad
  pos, nxt = rollout.observation_positions(
    obs, jnp.asarray([9]), jnp.asarray([10]), jnp.asarray([2]), jnp.asarray([3]), 9
  )
  expected, expected_next = policy.mrope_positions(
    np.array([1, 2] + [9] * 6 + [3]), [(2, 3)], 9, 10
  )
  np.testing.assert_array_equal(np.asarray(pos)[0, :, :9], expected)
  assert int(nxt[0]) == expected_next
