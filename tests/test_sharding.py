"""Mesh, partition rules, sharded creation, the plan, and the 8-device GRPO proof.

The proof runs in a subprocess with 8 fake CPU devices (`python tests/test_sharding.py`
runs it directly and prints its JSON): the same GRPO update on a 2x2x2 mesh (params,
optimizer state and batch sharded by the rules) and on one device.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import loss_config, optimizer_config, rollout_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from segresearch_jax import protocol, sharding
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy
from segresearch_jax.rl import rows as rows_lib
from segresearch_jax.rl import update

ROOT = pathlib.Path(__file__).resolve().parents[1]
SDS = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)


def _mesh(data=1, fsdp=1, tensor=1):
  return sharding.abstract_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


# ----------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------


def test_mesh_shape_fills_the_minus_one_axis():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 4}, 64) == {
    "data": 8,
    "fsdp": 2,
    "tensor": 4,
  }
  # A ConfigDict with extra fields (rules).
  from configs import okvos

  paper = okvos.get_config("paper")
  assert sharding.mesh_shape(paper.mesh, 16) == {"data": 1, "fsdp": 16, "tensor": 1}


@pytest.mark.parametrize(
  "sizes, devices, message",
  [
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "multiply to the device count"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "Only one mesh axis may be -1"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "does not divide the 8 available devices"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, 1, "positive int or -1"),
    ({"data": 1, "fsdp": 1, "tensor": 2.0}, 2, "positive int or -1"),
    ({"data": -1, "fsdp": 2}, 8, r"lacks the axes \['tensor'\]"),
  ],
)
def test_mesh_shape_errors(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(sizes, devices)


def test_make_mesh_on_this_machine():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert mesh.axis_names == sharding.AXES
  assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match=r"data=2 x fsdp=1 x tensor=1 has 2 devices but 1"):
    sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_parse_mesh():
  assert sharding.parse_mesh("data:1, fsdp:16,tensor:4") == {"data": 1, "fsdp": 16, "tensor": 4}
  assert sharding.parse_mesh("fsdp:-1") == {"data": 1, "fsdp": -1, "tensor": 1}
  for bad in ("model:2", "data=2", "data:two", "data:1,data:2"):
    with pytest.raises(ValueError, match="[Mm]esh"):
      sharding.parse_mesh(bad)


# ----------------------------------------------------------------------------
# Rules.
# ----------------------------------------------------------------------------


def test_first_matching_rule_wins_and_undivisible_dims_fall_back(caplog):
  params = {
    "layers_0": {"q_proj": {"kernel": SDS(64, 48), "bias": SDS(48)}},
    "odd": {"kernel": SDS(6, 8)},
    "joint": {"a": SDS(16, 3), "b": SDS(12, 3)},
    "norm": {"weight": SDS(64)},
  }
  rules = [
    (r"odd/kernel$", ("fsdp", "tensor")),
    (r"q_proj/kernel$", ("fsdp", "tensor")),
    (r"q_proj", ("tensor",)),  # Would also match the kernel: must not be used for it.
    (r"joint/", (("fsdp", "tensor"),)),
    (r".*", ()),
  ]
  with caplog.at_level(logging.WARNING, logger="segresearch_jax.sharding"):
    specs = sharding.param_specs(params, rules, _mesh(fsdp=4, tensor=2))
  assert specs["layers_0"]["q_proj"]["kernel"] == P("fsdp", "tensor")
  assert specs["layers_0"]["q_proj"]["bias"] == P("tensor")
  assert specs["odd"]["kernel"] == P(None, "tensor")  # 6 rows do not split 4 ways.
  assert specs["joint"]["a"] == P(("fsdp", "tensor"))  # 16 over 4 x 2 devices.
  assert specs["joint"]["b"] == P()  # 12 does not split 8 ways.
  assert specs["norm"]["weight"] == P()
  assert "odd/kernel dim 0 (6) over fsdp (4)" in caplog.text
  assert "joint/b dim 0 (12)" in caplog.text


def test_string_specs_parse_like_tuples():
  assert sharding.parse_spec("fsdp,tensor") == ("fsdp", "tensor")
  assert sharding.parse_spec("None,fsdp+tensor") == (None, ("fsdp", "tensor"))
  assert sharding.parse_spec("") == ()
  specs = sharding.param_specs({"w": SDS(8, 8)}, [("w", "tensor,fsdp")], _mesh(fsdp=2, tensor=2))
  assert specs["w"] == P("tensor", "fsdp")


@pytest.mark.parametrize(
  "rules, message",
  [
    ([("w", ("model",))], "unknown mesh axes"),
    ([("w", ("fsdp", "fsdp"))], "on two dimensions"),
    ([("w", ("fsdp", None, "tensor"))], "gives 3 dimensions"),
    ([("nothing", ())], "No partition rule matches parameter w"),
    ([("w(", ())], "does not compile"),
    ([("w", (1,))], "Bad spec entry"),
  ],
)
def test_rule_errors(rules, message):
  with pytest.raises(ValueError, match=message):
    sharding.param_specs({"w": SDS(8, 8)}, rules, _mesh(fsdp=2))


def test_default_rules_split_every_matrix_of_both_families():
  for preset in ("tiny", "tiny_qwen2_5"):
    cfg = config_lib.get_preset(preset)
    abstract = jax.eval_shape(functools.partial(policy.init_params, cfg), jax.random.PRNGKey(0))
    specs = sharding.param_specs(abstract, sharding.DEFAULT_RULES, _mesh(2, 2, 2))
    for path, spec in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P)
    )[0]:
      name = sharding.path_str(path)
      leaf = functools.reduce(lambda t, k: t[k.key], path, abstract)
      if leaf.ndim == 2:
        assert any(e is not None for e in spec), f"{preset}: {name} {leaf.shape} is replicated"
      else:  # Norms and biases.
        assert spec == P(), f"{preset}: {name} {spec}"


# ----------------------------------------------------------------------------
# Shardings of params and state, sharded creation, batches (this machine's device).
# ----------------------------------------------------------------------------

TINY = config_lib.get_preset("tiny")


def test_state_shardings_follow_params():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  init_fn = functools.partial(policy.init_params, TINY)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  param_sharding = sharding.param_shardings(abstract, sharding.DEFAULT_RULES, mesh)
  optimizer = update.make_optimizer(optimizer_config(lr=1e-3, warmup_steps=10, updates_per_step=1))
  abstract_state = jax.eval_shape(lambda p: update.init_state(p, optimizer), abstract)
  state_sharding = sharding.state_shardings(abstract_state, param_sharding)

  flat_params = {
    sharding.path_str(p): s
    for p, s in jax.tree_util.tree_flatten_with_path(
      param_sharding, is_leaf=lambda x: isinstance(x, NamedSharding)
    )[0]
  }
  checked = 0
  for path, s in jax.tree_util.tree_flatten_with_path(
    state_sharding, is_leaf=lambda x: isinstance(x, NamedSharding)
  )[0]:
    name = sharding.path_str(path)
    param_name = next((k for k in flat_params if name.endswith("/" + k)), None)
    if param_name is None:  # Step counters.
      assert s.spec == P(), name
    else:  # params, Adam's mu and nu.
      assert s == flat_params[param_name], name
      checked += 1
  assert checked == 3 * len(flat_params)

  # A parameter-structured subtree with other shapes (a factored moment) is replicated
  # where the parameter's spec cannot lay it out.
  fake = {"p": abstract, "v_row": jax.tree.map(lambda x: SDS(x.shape[0]), abstract)}
  fake_sharding = sharding.state_shardings(fake, param_sharding)
  assert fake_sharding["v_row"]["layers_0"]["q_proj"]["kernel"].spec == P()
  assert fake_sharding["p"]["layers_0"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")


def test_create_sharded_equals_plain_init():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  init_fn = lambda rng: {
    "mlp": {"gate_proj": {"kernel": jax.random.normal(rng, (8, 16))}},
    "norm": {"weight": jnp.ones((8,))},
  }
  rng = jax.random.PRNGKey(3)
  expected = init_fn(rng)
  for shardings in (
    lambda abstract: sharding.param_shardings(abstract, sharding.DEFAULT_RULES, mesh),
    sharding.param_shardings(jax.eval_shape(init_fn, rng), sharding.DEFAULT_RULES, mesh),
  ):
    made = sharding.create_sharded(init_fn, rng, shardings=shardings)
    assert made["mlp"]["gate_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert made["norm"]["weight"].sharding.spec == P()
    jax.tree.map(np.testing.assert_array_equal, made, expected)
  # (The 8-device proof checks the same for the policy on a 2x2x2 mesh.)


def test_batch_that_does_not_divide_fails_before_compiling():
  mesh = _mesh(2, 2, 2)
  with pytest.raises(ValueError, match=r"rollout batch: 6 rows do not divide .* 2 x 2 = 4"):
    sharding.check_batch_divisible(6, mesh, "rollout batch")
  with pytest.raises(ValueError, match=r"4 rows per micro-batch \(2 micro-batches\)"):
    sharding.check_batch_divisible(8, _mesh(1, 8, 1), "update batch", micro_batches=2)
  with pytest.raises(ValueError, match="do not split into 3 micro-batches"):
    sharding.check_batch_divisible(8, mesh, "update batch", micro_batches=3)
  sharding.check_batch_divisible(8, mesh, "update batch", micro_batches=2)


def test_shard_batch_on_this_machine():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  batch = {"ids": np.arange(8).reshape(4, 2), "pos": np.zeros((4, 3, 2), np.int32)}
  placed = sharding.shard_batch(batch, mesh)
  assert placed["pos"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(placed["ids"], batch["ids"])
  with pytest.raises(ValueError, match="same leading row axis"):
    sharding.shard_batch({"a": np.zeros((4, 2)), "b": np.zeros((3, 2))}, mesh)


# ----------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------


def test_plan_of_the_paper_model_on_64_abstract_devices():
  cfg = config_lib.get_preset("qwen3_vl_4b")
  p = sharding.plan(
    cfg,
    {"data": 1, "fsdp": 16, "tensor": 4},
    sharding.DEFAULT_RULES,
    batch_rows=64,
    seq_len=10240,
    optimizer=update.make_optimizer(optimizer_config(lr=1e-6, warmup_steps=10, updates_per_step=1)),
    compute_dtype="bfloat16",
    image_patches=(784,) * 6,
  )
  # Qwen3-VL-4B-Instruct: 4.44B parameters (tied head).
  assert p.param_count == sum(q.size for q in p.params)
  assert 4.3e9 < p.param_count < 4.6e9
  assert p.param_bytes == 4 * p.param_count
  # Every matrix is split 64 ways; only norms and biases stay whole.
  replicated = sum(q.size * 4 for q in p.params if q.shard_shape == q.shape)
  assert replicated < 0.002 * p.param_bytes
  assert p.param_bytes_per_device == pytest.approx(
    (p.param_bytes - replicated) / 64 + replicated, rel=1e-9
  )
  # AdamW: mu and nu follow the params, plus a few scalar counters.
  assert 0 <= p.opt_bytes_per_device - 2 * p.param_bytes_per_device < 64
  assert p.rows_per_device == 4
  assert p.activation_bytes_per_device > 0 and "r=4 rows/device" in p.activation_formula
  # The update's batch: 4 rows a device, 26 bytes a token, fp32 patches of 3*2*16*16.
  assert p.input_bytes_per_device == 4 * (10240 * 26 + 6 * 784 * 1536 * 4)
  assert p.total_bytes_per_device == (
    p.param_bytes_per_device
    + p.grad_bytes_per_device
    + p.opt_bytes_per_device
    + p.activation_bytes_per_device
    + p.input_bytes_per_device
  )
  text = sharding.format_plan(p)
  assert "update inputs" in text
  assert "data=1 x fsdp=16 x tensor=4 (64 device(s))" in text
  q_line = next(line for line in text.splitlines() if "layers_*/q_proj/kernel" in line)
  assert "(2560, 4096)" in q_line and "(fsdp, tensor)" in q_line and "(160, 1024)" in q_line
  assert q_line.rstrip().endswith("x36")


def test_default_rules_split_every_large_tensor_of_qwen2_5_vl():
  p = sharding.plan(
    config_lib.get_preset("qwen2_5_vl_7b"),
    {"data": 2, "fsdp": 8, "tensor": 4},
    sharding.DEFAULT_RULES,
    batch_rows=16,
    seq_len=128,
    optimizer=update.make_optimizer(optimizer_config(lr=1e-6, warmup_steps=10, updates_per_step=1)),
    remat="full",
  )
  large = [q for q in p.params if q.size > 2**20]
  assert large and all(q.shard_shape != q.shape for q in large)
  assert not p.fallbacks


def test_plan_fails_when_a_rule_leaves_a_large_tensor_replicated():
  cfg = config_lib.get_preset("mid")
  args = dict(
    batch_rows=8,
    seq_len=64,
    optimizer=update.make_optimizer(optimizer_config(lr=1e-6, warmup_steps=10, updates_per_step=1)),
  )
  rules = [(r"layers_\d+/", ("fsdp",)), (r".*", ())]  # Forgets the embedding and vision.
  with pytest.raises(sharding.UnshardedParamError, match=r"embed_tokens/embedding \(32768"):
    sharding.plan(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, rules, **args)
  # One device: nothing to split over. A threshold above the largest tensor: allowed.
  sharding.plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, rules, **args)
  sharding.plan(
    cfg, {"data": 1, "fsdp": 8, "tensor": 1}, rules, max_replicated_elements=2**24, **args
  )


def _paper_config():
  from configs import okvos

  return okvos.get_config("paper")


def test_run_plan_reads_the_run_config():
  text = plan_lib().run_plan(_paper_config(), "data:1,fsdp:16,tensor:4")
  assert text.startswith(
    "model: qwen3_vl (preset qwen3_vl_4b), compute dtype bfloat16, remat full, attention"
  )
  # 16 prompts x 8 rollouts / 2 mini-batches; 2048 + 8192 tokens.
  assert "64 rows x 10240 tokens per update" in text
  assert "4 rows per device" in text
  # The paper images: 6 frames of 448 px encoded once for a group's 8 rows (1 a row,
  # rounded up), per turn (6) at most an 864 px keyframe and a 256 px result.
  assert "13 images/row of 19816 patches" in text

  # The config's own rules come first; its threshold is read too.
  from configs import okvos

  config = okvos.get_config()
  config.mesh.rules = ((r"embed_tokens", ()),)
  config.mesh.max_replicated_elements = 100_000
  with pytest.raises(sharding.UnshardedParamError, match=r"embed_tokens/embedding \(4096, 128\)"):
    plan_lib().run_plan(config, {"fsdp": 2})
  with pytest.raises(ValueError, match="do not divide over the mesh"):
    plan_lib().run_plan(_paper_config(), "fsdp:-1", num_devices=7)


def test_run_plan_reads_an_hf_config_json(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(config_lib.to_hf_config(TINY)))
  config = _paper_config()
  config.model.hf_dir = str(tmp_path)
  text = plan_lib().run_plan(config, "fsdp:2")
  abstract = jax.eval_shape(functools.partial(policy.init_params, TINY), jax.random.PRNGKey(0))
  n = sum(x.size for x in jax.tree.leaves(abstract))
  assert f"({tmp_path})" in text and f"parameters: {n:,}" in text
  config.model.hf_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="config.json"):
    plan_lib().run_plan(config)


def plan_lib():
  from segresearch_jax import components

  return components


def test_plan_tool_exits_non_zero_on_a_replicated_large_tensor():
  # tensor=3 divides none of the 4B model's matrices: all of them would stay whole.
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "segresearch_jax.tools.plan",
      "--config=configs/okvos.py:paper",
      "--mesh=data:1,fsdp:1,tensor:3",
    ],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1, out.stderr[-2000:]
  assert "fully replicated" in out.stderr and "embed_tokens/embedding" in out.stderr


def test_plan_tool_for_a_tpu_slice_says_whether_it_fits_and_exits_1_when_not():
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "segresearch_jax.tools.plan", "--config=configs/okvos.py:paper", *args],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  fits = run("--target=v5p-64")
  assert fits.returncode == 0, fits.stderr[-2000:]
  assert "attention splash" in fits.stdout and "32 device(s)" in fits.stdout
  assert re.search(
    r"^plan: [\d.]+ GiB of 95.7 GiB per chip \(\d+%\) fits \(v5p-64\)$", fits.stdout, re.M
  )
  # 64 rollouts a prompt, no rematerialisation: far above a v4 chip's 30.75 GiB.
  over = run("--target=v4-32", "--config.rollout.group_size=64", "--config.model.remat=none")
  assert over.returncode == 1
  assert re.search(
    r"^plan: [\d.]+ GiB of 30.8 GiB per chip \(\d+%\) does not fit", over.stdout, re.M
  )


# ----------------------------------------------------------------------------
# The proof: 8 fake devices, mesh 2x2x2, same GRPO update as one device.
# ----------------------------------------------------------------------------

PROOF_ROWS, PROOF_FRAMES, PROOF_TURNS, PROOF_RESPONSE = 8, 2, 2, 32
FRAME_GRID, KEY_GRID, SEARCH_GRID = (2, 2), (3, 3), (1, 1)  # merged tokens
IM_END = 500


def _grpo_batch(seed: int = 0):
  """A hand-built GRPO batch of the tiny policy: prompts with 2 frames, responses
  with text, keyframe (high-res image) and image_search observations, per-row lengths.

  Every leaf is row-major (positions [B, 3, L]) so it shards over rows.
  """
  rng = np.random.default_rng(seed)
  cfg, pd = TINY, TINY.vision.patch_dim
  img = lambda grid: (
    [cfg.vision_start_token_id]
    + [cfg.image_token_id] * (grid[0] * grid[1])
    + [cfg.vision_end_token_id]
  )
  b, f, turns, r = PROOF_ROWS, PROOF_FRAMES, PROOF_TURNS, PROOF_RESPONSE
  prompts, responses, masks, kinds, slots, grids = [], [], [], [], [], []
  for row in range(b):
    prompt = []
    for fid in range(f):
      prompt += [60 + fid] + img(FRAME_GRID)
    prompt += list(rng.integers(100, 200, size=rng.integers(2, 5)))
    response, mask, kind, slot, row_grids = [], [], [], [], [FRAME_GRID] * f
    for t in range(turns):
      gen = list(rng.integers(100, 400, size=rng.integers(2, 5)))
      choice = (row + t) % 3  # 0 text obs, 1 keyframe, 2 image_search
      obs = {0: [300, 301], 1: [303] + img(KEY_GRID) + [304], 2: [305] + img(SEARCH_GRID)}[choice]
      response += gen + obs
      mask += [1] * len(gen) + [0] * len(obs)
      kind.append(choice)
      # obs_image: the shown frame a keyframe turn picked, the turn's own search slot.
      slot.append(int(rng.integers(0, f)) if choice == 1 else t if choice == 2 else -1)
      row_grids += [KEY_GRID] if choice == 1 else [SEARCH_GRID] if choice == 2 else []
    response += [int(rng.integers(100, 400)), IM_END]
    mask += [1, 1]
    prompts.append(prompt)
    responses.append(response)
    masks.append(mask)
    kinds.append(kind)
    slots.append(slot)
    grids.append(row_grids)

  lp = max(len(p) for p in prompts)
  batch = rows_lib.TrainingRows(
    prompt_ids=np.zeros((b, lp), np.int32),
    prompt_valid=np.zeros((b, lp), bool),
    prompt_positions=np.zeros((b, 3, lp), np.int32),
    response_ids=np.zeros((b, r), np.int32),
    response_valid=np.zeros((b, r), bool),
    response_positions=np.zeros((b, 3, r), np.int32),
    loss_mask=np.zeros((b, r), np.float32),
    obs_kind=np.asarray(kinds, np.int32),
    obs_image=np.asarray(slots, np.int32),
    frame_patches=rng.standard_normal((b, f, 16, pd)).astype(np.float32),
    keyframe_patches=rng.standard_normal((b, f, 36, pd)).astype(np.float32),
    search_patches=rng.standard_normal((b, turns, 4, pd)).astype(np.float32),
    advantages=rng.standard_normal(b).astype(np.float32),
    old_logprobs=np.zeros((b, r), np.float32),  # set by each test
  )
  for row in range(b):
    p, resp = prompts[row], responses[row]
    pos, _ = policy.mrope_positions(np.array(p + resp), grids[row], cfg.image_token_id)
    batch.prompt_ids[row, lp - len(p) :] = p  # Left-padded prompts, as the rollout has.
    batch.prompt_valid[row, lp - len(p) :] = True
    batch.prompt_positions[row, :, lp - len(p) :] = pos[:, : len(p)]
    batch.response_ids[row, : len(resp)] = resp
    batch.response_valid[row, : len(resp)] = True
    batch.response_positions[row, :, : len(resp)] = pos[:, len(p) :]
    batch.loss_mask[row, : len(resp)] = masks[row]
  return batch


def _rollout_cfg():
  """The rollout shapes of `_grpo_batch`."""
  return rollout_config(
    group_size=1,  # Rows are already one per trajectory.
    max_turns=PROOF_TURNS,
    max_response_length=PROOF_RESPONSE,
    max_action_length=128,
    max_obs_length=256,
    im_end_id=IM_END,
    frame_grid=FRAME_GRID,
    keyframe_grid=KEY_GRID,
    search_grid=SEARCH_GRID,
    banned_ids=(TINY.image_token_id, TINY.vision_start_token_id, TINY.vision_end_token_id),
  )


@pytest.mark.slow  # compiles the update twice: ~80 s on a 2-core CPU
def test_update_on_trained_positions_only_equals_the_full_update():
  """`rows.with_token_index`: the LM head runs only where `loss_mask` is set; the
  log-probs there, the loss and the updated params are those of the full head."""
  from segresearch_jax import steps
  from segresearch_jax.rl import rows

  host = _grpo_batch()
  rng = np.random.default_rng(3)
  host = host.replace(
    old_logprobs=(rng.normal(-6, 0.3, host.loss_mask.shape) * host.loss_mask).astype(np.float32)
  )
  indexed = rows.with_token_index(host)
  index, mask = indexed.token_index, host.loss_mask.astype(bool)
  counts = mask.sum(axis=1)
  step = PROOF_RESPONSE // 4  # K is the longest row's count rounded up to R / 4
  assert index.shape == (PROOF_ROWS, -(-counts.max() // step) * step) and index.dtype == np.int32
  for row in range(PROOF_ROWS):
    np.testing.assert_array_equal(index[row, : counts[row]], np.flatnonzero(mask[row]))
    assert (index[row, counts[row] :] == PROOF_RESPONSE).all()  # padding, dropped
  assert rows.token_index(np.zeros((2, 12), bool)).shape == (2, 3)  # never empty
  wider = rows.token_index(mask, min_width=index.shape[1] + 1)  # the loop's widest so far
  assert wider.shape[1] == index.shape[1] + step
  np.testing.assert_array_equal(wider[:, : index.shape[1]], index)
  assert (wider[:, index.shape[1] :] == PROOF_RESPONSE).all()

  logprob_fn = jax.jit(steps.make_logprob_fn(TINY, _rollout_cfg()))
  params = policy.init_params(TINY, jax.random.PRNGKey(0))
  full, full_entropy = logprob_fn(params, host)
  part, part_entropy = logprob_fn(params, indexed)
  np.testing.assert_allclose(np.asarray(part)[mask], np.asarray(full)[mask], atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(part_entropy)[mask], np.asarray(full_entropy)[mask], atol=1e-5
  )
  assert not np.asarray(part)[~mask].any() and not np.asarray(part_entropy)[~mask].any()

  optimizer = update.make_optimizer(optimizer_config(lr=1e-3, warmup_steps=0, updates_per_step=1))
  step_fn = jax.jit(
    update.make_update_fn(steps.make_logprob_fn(TINY, _rollout_cfg()), optimizer, loss_config())
  )
  new_full, m_full = step_fn(update.init_state(params, optimizer), host, jax.random.PRNGKey(1))
  new_part, m_part = step_fn(update.init_state(params, optimizer), indexed, jax.random.PRNGKey(1))
  for k in ("loss", "grad_norm", "entropy", "clip_fraction", "tokens"):
    np.testing.assert_allclose(float(m_part[k]), float(m_full[k]), rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(new_part.params), jax.tree.leaves(new_full.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _padded(host, prompt_pad: int, response_pad: int):
  """`host` with more padding than any row uses: left of the prompts, right of the responses."""
  left = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(prompt_pad, 0)])
  right = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, response_pad)])
  return host.replace(
    **{k: left(getattr(host, k)) for k in ("prompt_ids", "prompt_valid", "prompt_positions")},
    **{
      k: right(getattr(host, k))
      for k in (
        "response_ids",
        "response_valid",
        "response_positions",
        "loss_mask",
        "old_logprobs",
      )
    },
  )


def test_fit_rows_keeps_the_used_tokens_and_images():
  """`rows.fit_rows`: sizes bucketed from what the rows use, each kept image the one
  its turn showed, and the floor respected."""
  host = _padded(_grpo_batch(), prompt_pad=8, response_pad=96)  # response 128 = 4 x 32
  lp, r = host.prompt_ids.shape[1], host.response_ids.shape[1]
  fitted, shape = rows_lib.fit_rows(host)
  used_prompt = lp - 8
  used_response = np.flatnonzero(host.response_valid.any(axis=0)).max() + 1
  assert shape.prompt == min(lp, -(-used_prompt // (-(-lp // 4))) * (-(-lp // 4)))
  assert shape.response == -(-used_response // 32) * 32 < r
  assert fitted.prompt_ids.shape == (PROOF_ROWS, shape.prompt)
  assert fitted.response_positions.shape == (PROOF_ROWS, 3, shape.response)
  np.testing.assert_array_equal(fitted.prompt_valid.sum(1), host.prompt_valid.sum(1))
  np.testing.assert_array_equal(fitted.loss_mask.sum(1), host.loss_mask.sum(1))
  kind = host.obs_kind
  for kind_id, name, count in (
    (protocol.KEYFRAME_IMAGE, "keyframe_patches", shape.keyframes),
    (protocol.SEARCH_IMAGE, "search_patches", shape.search_images),
  ):
    most = (kind == kind_id).sum(1).max()
    assert count == 1 << (int(most) - 1).bit_length()
    assert getattr(fitted, name).shape[1] == count
    for row, turn in zip(*np.nonzero(kind == kind_id)):
      np.testing.assert_array_equal(
        getattr(fitted, name)[row, fitted.obs_image[row, turn]],
        getattr(host, name)[row, host.obs_image[row, turn]],
      )
  assert (fitted.obs_image[kind == protocol.NO_IMAGE] == -1).all()
  floor = rows_lib.UpdateShape(prompt=lp, response=r, keyframes=2, search_images=2, head=r)
  wide, wide_shape = rows_lib.fit_rows(host, floor)
  assert wide_shape == floor and wide.keyframe_patches.shape[1] == 2
  assert shape.union(floor) == floor
  eighths, fine = rows_lib.fit_rows(host, buckets=8)  # response steps of 128 / 8 = 16
  assert fine.response == -(-used_response // 16) * 16 <= shape.response
  assert eighths.token_index.shape[1] % -(-fine.response // 8) == 0  # eighths of the kept
  np.testing.assert_array_equal(eighths.loss_mask.sum(1), host.loss_mask.sum(1))


def test_warm_start_batches_are_cut_to_their_own_rows():
  """`warm_start.fitted_batches`: one prompt length for all, each batch's response cut
  to its own longest row (eighths), every trained token kept."""
  from segresearch_jax import warm_start

  host = _padded(_grpo_batch(), prompt_pad=8, response_pad=96)
  # Rows of different lengths: row i keeps its first 8 + 3 i response tokens.
  r = host.response_ids.shape[1]
  keep = np.arange(r)[None, :] < (8 + 3 * np.arange(len(host)))[:, None]
  host = host.replace(response_valid=host.response_valid & keep, loss_mask=host.loss_mask * keep)
  batches = warm_start.fitted_batches(host, 2, np.random.default_rng(0))
  seen = []
  for _ in range(len(host) // 2):
    batch = next(batches)
    assert batch.prompt_ids.shape[1] == rows_lib.fit_rows(host, buckets=8)[1].prompt
    longest = np.flatnonzero(batch.response_valid.any(axis=0)).max() + 1
    assert batch.response_ids.shape[1] == -(-longest // (r // 8)) * (r // 8)
    seen.append(int(batch.loss_mask.sum()))
  assert sum(seen) == int(host.loss_mask.sum())  # an epoch: every row once


def test_a_frozen_vision_tower_gets_no_gradient():
  """`freeze_vision`: the vision tower's gradient is zero, so the global norm (and the
  clipping) is that of the trained parameters alone, and the tower does not move."""
  from segresearch_jax import steps

  host = _grpo_batch()
  params = policy.init_params(TINY, jax.random.PRNGKey(0))
  logprob_fn = steps.make_logprob_fn(TINY, _rollout_cfg())
  optimizer = update.make_optimizer(
    optimizer_config(lr=1e-3, warmup_steps=0, updates_per_step=1, vision_lr_scale=0.0)
  )
  norms = {}
  for freeze in (False, True):
    step_fn = jax.jit(
      update.make_update_fn(logprob_fn, optimizer, loss_config(), freeze_vision=freeze)
    )
    new, m = step_fn(update.init_state(params, optimizer), host, jax.random.PRNGKey(1))
    norms[freeze] = float(m["grad_norm"])
    for path, before in jax.tree_util.tree_leaves_with_path(params):
      if update.is_vision_param(path):
        after = dict(jax.tree_util.tree_leaves_with_path(new.params))[path]
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))

  def text_loss(text_params, vision_params):
    merged = jax.tree_util.tree_map_with_path(
      lambda path, t, v: v if update.is_vision_param(path) else t, text_params, vision_params
    )
    logp, entropy = logprob_fn(merged, host)
    loss_sum, count, _ = update.losses.grpo_loss(logp, entropy, host, loss_config())
    return loss_sum / jnp.maximum(count, 1.0)

  grads = jax.grad(text_loss)(params, params)
  text_norm = np.sqrt(
    sum(
      float(jnp.sum(g**2))
      for path, g in jax.tree_util.tree_leaves_with_path(grads)
      if not update.is_vision_param(path)
    )
  )
  np.testing.assert_allclose(norms[True], text_norm, rtol=1e-4)
  assert norms[False] > norms[True] * (1 + 1e-3)


def test_rows_share_frames_only_within_a_group_and_a_device():
  # The paper's update: 8 rows a prompt, 64 rows over 32 devices (2 a device).
  assert rows_lib.shared_frame_rows(8, 1, rows=64, row_devices=32) == 2
  assert rows_lib.shared_frame_rows(8, 1, rows=64, row_devices=1) == 8
  assert rows_lib.shared_frame_rows(8, 2, rows=64, row_devices=4) == 4  # strided micro-batches
  assert rows_lib.shared_frame_rows(8, 3) == 1  # a group does not split into runs
  assert rows_lib.shared_frame_rows(8, 1, rows=16, row_devices=32) == 1  # fewer rows than devices


def test_fitted_rows_with_frames_encoded_once_per_group_give_the_same_logprobs():
  """The update's inputs after `fit_rows`, the shown frames encoded once for each pair
  of rows that share them (a group), give the log-probs of the whole padded rows."""
  from segresearch_jax import steps

  host = _grpo_batch()
  host = host.replace(frame_patches=np.repeat(host.frame_patches[::2], 2, axis=0))
  host = _padded(host, prompt_pad=8, response_pad=32)
  fitted, _ = rows_lib.fit_rows(host)
  params = policy.init_params(TINY, jax.random.PRNGKey(0))
  full, _ = jax.jit(steps.make_logprob_fn(TINY, _rollout_cfg()))(params, host)
  part, _ = jax.jit(steps.make_logprob_fn(TINY, _rollout_cfg(), group=2))(params, fitted)
  mask = host.loss_mask.astype(bool)
  kept = fitted.loss_mask.astype(bool)
  assert mask.sum() > 20
  np.testing.assert_allclose(np.asarray(part)[kept], np.asarray(full)[mask], atol=1e-5)
  with pytest.raises(ValueError, match="groups of 3"):
    steps.training_inputs(params, TINY, _rollout_cfg(), fitted, group=3)


def _logprob_fn(params, micro):
  """The trainer's log-prob function on a row-major batch (see `steps.training_inputs`)."""
  from segresearch_jax import steps
  from segresearch_jax.models import decoding

  rollout_cfg = _rollout_cfg()
  banned = rollout_cfg.banned_ids
  inputs = steps.training_inputs(params, TINY, rollout_cfg, micro)
  logp, entropy = decoding.token_logprobs(
    params, TINY, *inputs, chunk_size=16, banned_ids=banned, return_entropy=True
  )
  lp = micro.prompt_ids.shape[1]
  return logp[:, lp:], entropy[:, lp:]


def _proof() -> dict:
  """Runs the same GRPO update on one device and on a 2x2x2 mesh; returns the gaps."""

  assert jax.device_count() == 8, jax.devices()
  # docs/method.md §6's AdamW with lr 1e-4: Adam's first step is close to lr * sign(grad), so a
  # gradient entry within rounding of zero moves by up to ~lr / 20 between reduction
  # orders; 1e-4 keeps that under the 1e-5 bar while every parameter still moves ~1e-4.
  optimizer = update.make_optimizer(optimizer_config(lr=1e-4, warmup_steps=0, updates_per_step=1))
  update_fn = update.make_update_fn(_logprob_fn, optimizer, loss_config(), micro_batches=2)
  rng = jax.random.PRNGKey(0)
  init_fn = functools.partial(policy.init_params, TINY)
  host = _grpo_batch()
  # Old log-probs around the initial policy's (near uniform over the vocabulary), spread
  # so that ratios move on both sides of the clip range.
  noise = np.random.default_rng(1).normal(0, 0.3, host.loss_mask.shape).astype(np.float32)
  host = host.replace(old_logprobs=(noise - np.log(TINY.text.vocab_size)) * host.loss_mask)

  # One device.
  device0 = jax.devices()[0]
  params_1 = jax.jit(init_fn)(jax.device_put(rng, device0))
  state_1 = jax.jit(lambda p: update.init_state(p, optimizer))(params_1)
  init_params = jax.tree.map(np.asarray, params_1)
  new_1, metrics_1 = jax.jit(update_fn, donate_argnums=0)(
    state_1, jax.device_put(host, device0), rng
  )

  # Mesh 2 x 2 x 2: params born sharded, optimizer state following them, rows split.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = jax.eval_shape(init_fn, rng)
  param_sharding = sharding.param_shardings(abstract, sharding.DEFAULT_RULES, mesh)
  params_8 = sharding.create_sharded(init_fn, rng, shardings=param_sharding)
  init_state_fn = lambda p: update.init_state(p, optimizer)
  state_sharding = sharding.state_shardings(jax.eval_shape(init_state_fn, abstract), param_sharding)
  state_8 = sharding.create_sharded(init_state_fn, params_8, shardings=state_sharding)
  init_gap = max(
    float(np.max(np.abs(np.asarray(a) - b)))
    for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(init_params))
  )
  try:
    sharding.shard_batch(jax.tree.map(lambda v: v[:6], host), mesh)
    bad_batch = ""
  except ValueError as e:
    bad_batch = str(e)
  replicated = NamedSharding(mesh, P())
  step = jax.jit(
    update_fn,
    in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
  new_8, metrics_8 = step(state_8, sharding.shard_batch(host, mesh), rng)

  gap = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  kernel = new_8.params["layers_0"]["q_proj"]["kernel"]
  mu = new_8.opt_state[1][0].mu["layers_0"]["q_proj"]["kernel"]
  return {
    "devices": jax.device_count(),
    "init_gap": init_gap,
    "loss_1": float(metrics_1["loss"]),
    "loss_8": float(metrics_8["loss"]),
    "metric_gaps": {k: gap(metrics_1[k], metrics_8[k]) for k in metrics_1},
    "metrics_1": {k: float(v) for k, v in metrics_1.items()},
    "param_gap": max(gap(a, b) for a, b in zip(jax.tree.leaves(new_1), jax.tree.leaves(new_8))),
    "worst": sorted(
      (
        (gap(a, b), jax.tree_util.keystr(path), float(np.max(np.abs(np.asarray(a)))))
        for (path, a), b in zip(
          jax.tree_util.tree_flatten_with_path(new_1)[0], jax.tree.leaves(new_8)
        )
      ),
      reverse=True,
    )[:6],
    "param_change": max(
      gap(a, b) for a, b in zip(jax.tree.leaves(new_1.params), jax.tree.leaves(init_params))
    ),
    "kernel_spec": str(kernel.sharding.spec),
    "mu_spec": str(mu.sharding.spec),
    "kernel_shard": list(kernel.addressable_shards[0].data.shape),
    "kernel_shape": list(kernel.shape),
    "distinct_kernel_shards": len(
      {str(i) for i in kernel.sharding.devices_indices_map(kernel.shape).values()}
    ),
    "bad_batch_error": bad_batch,
  }


@pytest.mark.slow
def test_eight_devices_give_the_same_grpo_update_as_one():
  # The LLVM flags only shorten compilation (the update has ~1,700 fusions, one per
  # optimizer op and parameter leaf); both runs compile with them.
  xla_flags = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
  )
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip(),
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
  }
  out = subprocess.run(
    [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["devices"] == 8
  assert r["init_gap"] == 0.0  # Born sharded, same values.
  # The update is real: a finite loss over masked tokens and params that moved.
  assert r["metrics_1"]["skipped"] == 0.0 and r["metrics_1"]["tokens"] > 20
  assert 0.0 < r["metrics_1"]["clip_fraction"] < 1.0
  assert r["param_change"] > 5e-5
  # And it is the same on 8 devices.
  assert abs(r["loss_1"] - r["loss_8"]) < 1e-5
  assert all(g < 1e-5 * max(1.0, abs(r["metrics_1"][k])) for k, g in r["metric_gaps"].items()), r
  assert r["param_gap"] < 1e-5  # params and Adam state
  # With real layouts: q_proj [64, 64] over fsdp x tensor, Adam's mu alike.
  assert r["kernel_spec"] == r["mu_spec"] == str(P("fsdp", "tensor"))
  assert r["kernel_shape"] == [64, 64] and r["kernel_shard"] == [32, 32]
  assert r["distinct_kernel_shards"] == 4  # Replicated over data only.
  assert "6 rows do not divide over the mesh's data x fsdp = 2 x 2 = 4" in r["bad_batch_error"]


if __name__ == "__main__":
  print(json.dumps(_proof()))


def specs_of_one_block(cfg):
  """The partition specs of vision block 0 of the per-layer model."""
  abstract = jax.eval_shape(functools.partial(policy.init_params, cfg), jax.random.PRNGKey(0))
  mesh = sharding.abstract_mesh({"data": 1, "fsdp": 2, "tensor": 2})
  return sharding.param_specs(abstract, sharding.DEFAULT_RULES, mesh)["visual"]["blocks_0"]


def test_stacked_decoder_layers_follow_one_layers_rule_and_never_split_the_layer_axis():
  import dataclasses

  scanned = dataclasses.replace(TINY, scan_layers=True)
  abstract = jax.eval_shape(functools.partial(policy.init_params, scanned), jax.random.PRNGKey(0))
  mesh = sharding.abstract_mesh({"data": 1, "fsdp": 2, "tensor": 2})
  specs = sharding.param_specs(abstract, sharding.DEFAULT_RULES, mesh)
  assert specs["layers"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["layers"]["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["input_layernorm"]["weight"] == P(None)
  # The vision blocks stack too, under the rule of one block.
  blocks = specs["visual"]["blocks"]
  assert blocks["qkv"]["kernel"] == P(None, *specs_of_one_block(TINY)["qkv"]["kernel"])
