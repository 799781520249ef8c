"""Checkpoints: round trip, resume position, keep-N, sharded restore, kill -9 safety, damage."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import fake_sample, optimizer_config

from segresearch_jax import checkpoint
from segresearch_jax.data import pipeline
from segresearch_jax.models import config as config_lib
from segresearch_jax.rl import update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(scale: float = 1.0) -> update.TrainState:
  """A TrainState after one AdamW update, so the optimizer moments are not zeros."""
  params = {
    "dense": {"kernel": scale * jnp.arange(24.0).reshape(4, 6), "bias": jnp.full((6,), scale)},
    "embed": scale * jnp.linspace(-1.0, 1.0, 40).reshape(8, 5),
  }
  optimizer = update.make_optimizer(optimizer_config(lr=1e-2, warmup_steps=2, updates_per_step=1))
  state = update.init_state(params, optimizer)
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.5, params)
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  return update.TrainState(
    params=jax.tree.map(jnp.add, params, updates), opt_state=opt_state, step=jnp.int32(1)
  )


def _assert_tree_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _example(i: int) -> dict:
  """A raw sample as `okvos.load_example` makes it, tiny and distinct per index."""
  frames = np.full((3, 12, 16, 3), 10 * i, np.uint8)
  masks = np.zeros((3, 12, 16), bool)
  masks[:, 2 : 4 + i % 5, 3:9] = True
  numbers = np.arange(3, dtype=np.int32) * 4
  return fake_sample(i, frames, masks, numbers)


def _dataset():
  source = [_example(i) for i in range(7)]
  return pipeline.make_dataset(
    source,
    batch_size=2,
    seed=3,
    frame_size=16,
    num_frames=3,
    shard_index=0,
    shard_count=1,
  )


def test_round_trip_state_rng_metadata_and_next_batch(tmp_path):
  state, rng = _state(), jax.random.key(7)
  model_cfg = config_lib.get_preset("tiny")
  run_config = ml_collections.ConfigDict({"seed": 0, "optim": {"lr": 1e-4}})
  metadata = checkpoint.make_metadata(model_cfg, run_config)
  it = iter(_dataset())
  for _ in range(3):  # Partway into the first epoch; prefetching threads are running.
    next(it)
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every=1) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, rng, it, metadata)
  expected = [next(it) for _ in range(3)]  # The uninterrupted run's next batches.

  resumed = iter(_dataset())
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every=1) as ckpt:
    assert ckpt.latest_step() == 3
    state2, rng2, metadata2 = ckpt.restore(None, checkpoint.abstract_state(_state(0.0)), resumed)
  _assert_tree_equal(state2, state)
  assert isinstance(state2, update.TrainState) and int(state2.step) == 1
  np.testing.assert_array_equal(jax.random.key_data(rng2), jax.random.key_data(rng))
  np.testing.assert_array_equal(jax.random.normal(rng2, (3,)), jax.random.normal(rng, (3,)))
  assert metadata2["run_config"] == {"seed": 0, "optim": {"lr": 1e-4}}
  assert checkpoint.model_config_from_dict(metadata2["model_config"]) == model_cfg
  for want in expected:
    got = next(resumed)
    assert list(got["id"]) == list(want["id"])
    np.testing.assert_array_equal(got["frames"], want["frames"])


@pytest.mark.parametrize(
  "rng", [jax.random.key(3), jax.random.key(3, impl="rbg"), jax.random.PRNGKey(5)]
)
def test_rng_json_round_trip(rng):
  value = json.loads(json.dumps(checkpoint.rng_to_json(rng)))
  back = checkpoint.rng_from_json(value)
  assert back.dtype == rng.dtype
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    assert jax.random.key_impl(back) == jax.random.key_impl(rng)
  np.testing.assert_array_equal(jax.random.uniform(back, (4,)), jax.random.uniform(rng, (4,)))
  with pytest.raises(ValueError, match="uint32"):
    checkpoint.rng_to_json(jnp.zeros((2,), jnp.int32))


def test_save_every_force_and_keep_n(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, save_every=3)
  saved = []
  for step in range(1, 11):
    if ckpt.save(step, _state(float(step)), jax.random.key(step), None, {"step": step}):
      saved.append(step)
  assert saved == [3, 6, 9]
  assert ckpt.save(10, _state(10.0), jax.random.key(10), None, {"step": 10}, force=True)
  # The last step was just saved: a second forced save of it is a no-op, not an error.
  assert not ckpt.save(10, _state(10.0), jax.random.key(10), None, {"step": 10}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [9, 10]
  # Keep-N deleted the older folders from disk, not only from the listing.
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [9, 10]
  state, _, metadata = ckpt.restore(None, checkpoint.abstract_state(_state()))
  assert metadata == {"step": 10}
  _assert_tree_equal(state, _state(10.0))
  state9, rng9, _ = ckpt.restore(9, checkpoint.abstract_state(_state()))
  _assert_tree_equal(state9, _state(9.0))
  np.testing.assert_array_equal(jax.random.key_data(rng9), jax.random.key_data(jax.random.key(9)))
  ckpt.close()


def test_state_may_be_donated_once_save_returns(tmp_path):
  state = _state(2.0)
  expected = jax.tree.map(np.asarray, state)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, save_every=1)
  assert ckpt.save(1, state, jax.random.key(0), None, {})
  # What a donating update does to its input: the device buffers are gone.
  for leaf in jax.tree.leaves(state):
    leaf.delete()
  ckpt.wait()
  restored, _, _ = ckpt.restore(1, checkpoint.abstract_state(_state()))
  _assert_tree_equal(restored, expected)
  ckpt.close()


def test_abstract_leaves_without_sharding(tmp_path, monkeypatch):
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every=1) as ckpt:
    ckpt.save(1, _state(5.0), jax.random.key(0), None, {})
    plain = jax.eval_shape(_state)  # No shardings: the default device, in one process.
    restored, _, _ = ckpt.restore(1, plain)
    _assert_tree_equal(restored, _state(5.0))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    assert {x.sharding.device_set.pop() for x in jax.tree.leaves(restored)} == {jax.devices()[0]}
    # Several processes: a global array has no default placement.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="with 2 processes every leaf needs"):
      ckpt.restore(1, plain)


def test_read_only_helpers_restore_params_alone(tmp_path):
  state = _state(3.0)
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
    ckpt.save(4, state, jax.random.key(0), None, {"note": "four"})
    ckpt.save(8, _state(4.0), jax.random.key(0), None, {"note": "eight"})
  assert checkpoint.read_metadata(tmp_path) == (8, {"note": "eight"})
  assert checkpoint.read_metadata(tmp_path, 4) == (4, {"note": "four"})
  params = checkpoint.restore_params(tmp_path, 4, checkpoint.abstract_state(_state().params))
  _assert_tree_equal(params, state.params)
  with pytest.raises(ValueError, match="do not match"):
    checkpoint.restore_params(tmp_path, 4, {"other": jnp.zeros((2,))})


def test_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="keep"):
    checkpoint.Checkpointer(tmp_path, keep=0, save_every=1)
  with pytest.raises(ValueError, match="save_every"):
    checkpoint.Checkpointer(tmp_path, keep=1, save_every=0)
  with pytest.raises(FileNotFoundError, match="not found"):
    checkpoint.read_metadata(tmp_path / "missing")
  ckpt = checkpoint.Checkpointer(tmp_path / "run", keep=2, save_every=1)
  abstract = checkpoint.abstract_state(_state())
  with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
    ckpt.restore(None, abstract)
  with pytest.raises(ValueError, match="JSON"):
    ckpt.save(1, _state(), jax.random.key(0), None, {"bad": object()})
  ckpt.save(2, _state(), jax.random.key(0), None, {})
  with pytest.raises(FileNotFoundError, match=r"step 5 .*\[2\]"):
    ckpt.restore(5, abstract)
  with pytest.raises(ValueError, match="no data-iterator state"):
    ckpt.restore(2, abstract, iter(_dataset()))
  with pytest.raises(ValueError, match="must be a jax.ShapeDtypeStruct"):
    ckpt.restore(2, jax.tree.map(np.asarray, _state()))
  wrong = checkpoint.abstract_state(_state().replace(params={"dense": {"kernel": jnp.zeros(3)}}))
  with pytest.raises(ValueError, match="Could not restore step 2"):
    ckpt.restore(2, wrong)
  ckpt.close()


def _truncate_tensor_files(step_dir) -> None:
  """What a disk-full or interrupted copy does to the array chunks (under `state/**/d/`)."""
  chunks = [
    p for p in step_dir.joinpath("state").rglob("*") if p.is_file() and p.parent.name == "d"
  ]
  assert chunks
  for path in chunks:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)


def _delete_metadata(step_dir) -> None:
  (step_dir / "metadata" / "metadata").unlink()


@pytest.mark.parametrize(
  "damage, why",
  [(_truncate_tensor_files, "OUT_OF_RANGE"), (_delete_metadata, "metadata/metadata not found")],
)
def test_resume_skips_a_damaged_newest_step_and_says_so(tmp_path, damage, why):
  it = iter(_dataset())
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
    for step in (1, 2, 3):
      batch = next(it)
      if step == 3:
        expected = batch  # The batch that followed step 2's save.
      ckpt.save(step, _state(float(step)), jax.random.key(step), it, {"step": step})
      ckpt.wait()
  damage(tmp_path / "3")

  said = []
  resumed = iter(_dataset())
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
    assert ckpt.latest_step() == 3  # Only a restore can tell a damaged step.
    step, state, rng, metadata = ckpt.restore_latest(
      checkpoint.abstract_state(_state()), resumed, log=said.append
    )
    assert step == 2 and metadata == {"step": 2}
    _assert_tree_equal(state, _state(2.0))
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(2)))
    assert list(next(resumed)["id"]) == list(expected["id"])
    text = "\n".join(said)
    assert f"step 3 in {tmp_path} does not restore" in text and why in text
    assert "resuming from checkpoint step 2" in text and "skipped 3" in text
    # Set aside, so the resumed run saves step 3 again (instead of silently not saving it).
    assert (tmp_path / "3.damaged").is_dir() and not (tmp_path / "3").exists()
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, _state(30.0), rng, None, {"step": "3 again"})
  assert checkpoint.read_metadata(tmp_path) == (3, {"step": "3 again"})


def test_restore_none_falls_back_and_no_restorable_step_lists_each(tmp_path, caplog):
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(float(step)), jax.random.key(step), None, {"step": step})
  _delete_metadata(tmp_path / "2")
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
    with caplog.at_level("WARNING", logger="segresearch_jax.checkpoint"):
      _, _, metadata = ckpt.restore(None, checkpoint.abstract_state(_state()))
    assert metadata == {"step": 1}
    assert "step 2" in caplog.text and "does not restore" in caplog.text
    # A step named explicitly: a clear error, not a bare Orbax one.
    ckpt.save(2, _state(2.0), jax.random.key(2), None, {"step": 2})
    ckpt.wait()
  _truncate_tensor_files(tmp_path / "1")
  _truncate_tensor_files(tmp_path / "2")
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
    with pytest.raises(ValueError, match=r"Could not restore step 1 of .*damaged files"):
      ckpt.restore(1, checkpoint.abstract_state(_state()))
    with pytest.raises(ValueError, match="No checkpoint in") as error:
      ckpt.restore_latest(checkpoint.abstract_state(_state()), log=lambda _: None)
  lines = str(error.value).splitlines()
  assert [line.split(":")[0].strip() for line in lines[1:]] == ["step 2", "step 1"]
  assert all("OUT_OF_RANGE" in line and "tensorstore_spec" not in line for line in lines[1:])
  # Nothing is moved aside when no step restores (a model change must not cost the run).
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.damaged"]
  with pytest.raises(ValueError, match=r"step 2 in .* does not restore \(damaged files\?\)"):
    checkpoint.restore_params(tmp_path, None, checkpoint.abstract_state(_state().params))


def test_an_empty_or_partial_step_folder_is_never_the_latest(tmp_path):
  with checkpoint.Checkpointer(tmp_path, keep=5, save_every=1) as ckpt:
    ckpt.save(1, _state(1.0), jax.random.key(1), None, {"step": 1})
  (tmp_path / "9").mkdir()  # e.g. `mkdir` by a sync tool, or a copy that died at once
  (tmp_path / "7").mkdir()
  (tmp_path / "7" / "state").mkdir()  # a copy that died after its first item
  (tmp_path / "7" / "state" / "_METADATA").write_text("{}")
  # Read-only (export, evaluation): skipped, and named when asked for.
  assert checkpoint.read_metadata(tmp_path) == (1, {"step": 1})
  with pytest.raises(FileNotFoundError, match=r"step 9 .*\(empty folder\)"):
    checkpoint.read_metadata(tmp_path, 9)
  with pytest.raises(
    FileNotFoundError, match=r"step 7 .*\(partial folder: no rng, metadata item\)"
  ):
    checkpoint.read_metadata(tmp_path, 7)
  # A writer removes the empty folder and moves the partial one aside, saying so.
  said = []
  with checkpoint.Checkpointer(tmp_path, keep=5, save_every=1, log=said.append) as ckpt:
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert any("step 9" in s and "empty folder" in s for s in said)
    assert any("step 7" in s and "7.incomplete" in s for s in said)
    assert ckpt.save(7, _state(7.0), jax.random.key(7), None, {"step": 7})
  assert sorted(os.listdir(tmp_path)) == ["1", "7", "7.incomplete"]
  assert checkpoint.read_metadata(tmp_path) == (7, {"step": 7})


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_model_config_dict_round_trip(name):
  cfg = config_lib.PRESETS[name]
  back = checkpoint.model_config_from_dict(
    json.loads(json.dumps(checkpoint.model_config_to_dict(cfg)))
  )
  assert back == cfg and hash(back) == hash(cfg)


def test_model_config_from_dict_rejects_unknown_fields():
  values = checkpoint.model_config_to_dict(config_lib.get_preset("tiny"))
  values["text"]["num_experts"] = 8
  with pytest.raises(ValueError, match=r"ModelConfig\.text fields \['num_experts'\]"):
    checkpoint.model_config_from_dict(values)


def test_make_metadata_records_the_tokenizer():
  class HFTok:
    name = "/ckpt/Qwen3-VL-4B-Instruct"

  class EmbeddedTok:
    name = "embedded:0123abcd"

  cfg = config_lib.get_preset("tiny")
  meta = checkpoint.make_metadata(cfg, {"seed": 1}, HFTok())
  assert meta["tokenizer"] == {"kind": "hf", "dir": "/ckpt/Qwen3-VL-4B-Instruct"}
  assert meta["run_config"] == {"seed": 1}
  assert checkpoint.make_metadata(cfg, None, EmbeddedTok())["tokenizer"] == {
    "kind": "embedded",
    "name": "embedded:0123abcd",
  }
  json.dumps(meta)  # The whole thing is JSON.


def _run(script: str, *args: str, devices: int = 1, timeout: float = 240.0):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


_SHARDED = """
import dataclasses
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
from segresearch_jax import checkpoint
from segresearch_jax.rl import update
from configs import okvos

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
params = {"w": jnp.arange(64.0 * 8).reshape(64, 8), "b": jnp.arange(8.0)}
optimizer = update.make_optimizer(dataclasses.replace(
  update.OptimizerConfig.from_config(okvos.get_config()),
  lr=1e-2, warmup_steps=10, updates_per_step=1,
))

def place(state, spec_2d):
  specs = jax.tree.map(lambda x: NamedSharding(mesh, spec_2d if x.ndim == 2 else P()), state)
  return jax.device_put(state, specs)

state = place(update.init_state(params, optimizer), P("fsdp", None))
state = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params))
with checkpoint.Checkpointer(sys.argv[1], keep=1, save_every=1) as ckpt:
  ckpt.save(1, state, jax.random.key(0), None, {})

# 1. Another layout on the same mesh: columns over both axes, vectors replicated.
target = checkpoint.abstract_state(place(update.init_state(params, optimizer), P(None, ("data", "fsdp"))))
with checkpoint.Checkpointer(sys.argv[1], keep=1, save_every=1) as ckpt:
  restored, _, _ = ckpt.restore(None, target)
for got, want, t in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target)):
  assert got.sharding == t.sharding, (got.sharding, t.sharding)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
w = restored.params["w"]
assert w.sharding.spec == P(None, ("data", "fsdp")) and len(w.addressable_shards) == 4
assert w.addressable_shards[0].data.shape == (64, 2)

# 2. One device (e.g. evaluation on a single accelerator).
one = SingleDeviceSharding(jax.devices()[3])
target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), target)
with checkpoint.Checkpointer(sys.argv[1], keep=1, save_every=1) as ckpt:
  restored, _, _ = ckpt.restore(1, target)
assert all(x.sharding == one for x in jax.tree.leaves(restored))
np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(state.params["w"]))
print("OK")
"""


def test_restore_into_a_sharded_abstract_state(tmp_path):
  result = _run(_SHARDED, str(tmp_path / "ckpt"), devices=4)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


_KILLED = """
import sys
import jax, jax.numpy as jnp
from segresearch_jax import checkpoint

ckpt = checkpoint.Checkpointer(sys.argv[1], keep=5, save_every=1)
ckpt.save(1, {"w": jnp.full((4, 4), 1.0)}, jax.random.key(1), None, {"step": 1})
ckpt.wait()
print("saved 1", flush=True)
# 128 MiB of incompressible data: the write takes long enough to be killed inside it.
big = {"w": jax.random.normal(jax.random.key(0), (32, 1024, 1024))}
big["w"].block_until_ready()
ckpt.save(2, big, jax.random.key(2), None, {"step": 2})
ckpt.wait()
print("saved 2", flush=True)
"""


def test_kill_9_during_a_save_leaves_the_previous_step_loadable(tmp_path):
  directory = tmp_path / "ckpt"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", textwrap.dedent(_KILLED), str(directory)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  partial = directory / "2.orbax-checkpoint-tmp"
  deadline = time.monotonic() + 180
  try:
    # Kill as soon as step 2's temporary folder appears: the save has started, and it
    # is renamed to `2` only after all 128 MiB are written.
    while not partial.exists():
      assert proc.poll() is None, f"child exited early: {proc.communicate()}"
      assert time.monotonic() < deadline, "step 2's save never started"
      time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert "saved 1" in stdout and "saved 2" not in stdout, stderr[-2000:]
  assert partial.exists() and not (directory / "2").exists(), "the kill landed after the save"

  ckpt = checkpoint.Checkpointer(directory, keep=5, save_every=1)
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  state, rng, metadata = ckpt.restore(None, checkpoint.abstract_state({"w": jnp.zeros((4, 4))}))
  np.testing.assert_array_equal(state["w"], np.ones((4, 4)))
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(1)))
  assert metadata == {"step": 1}
  # And the run goes on: step 2 is saved again over the debris (which Orbax removes).
  assert ckpt.save(2, {"w": jnp.full((4, 4), 2.0)}, rng, None, {"step": 2})
  ckpt.close()
  assert not partial.exists()
  assert checkpoint.read_metadata(directory) == (2, {"step": 2})


_TWO_PROCESSES = """
import glob, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from segresearch_jax import checkpoint

directory = sys.argv[3]
rows = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))

def state(value):
  full = np.full((8,), value, np.float32)
  return {"w": jax.make_array_from_callback((8,), rows, lambda index: full[index])}

with checkpoint.Checkpointer(directory, keep=5, save_every=1) as ckpt:
  for step in (1, 2):
    ckpt.save(step, state(float(step)), jax.random.key(step), None, {"step": step})
multihost_utils.sync_global_devices("saved")
if jax.process_index() == 0:
  os.mkdir(os.path.join(directory, "5"))
  for path in glob.glob(os.path.join(directory, "2", "state", "**", "d", "*"), recursive=True):
    os.truncate(path, 3)
multihost_utils.sync_global_devices("damaged")
said = []
with checkpoint.Checkpointer(directory, keep=5, save_every=1, log=said.append) as ckpt:
  abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rows)}
  step, restored, _, metadata = ckpt.restore_latest(abstract, log=said.append)
  assert step == 1 and metadata == {"step": 1}, (step, metadata)
  assert ckpt.all_steps() == [1]
  np.testing.assert_array_equal(restored["w"].addressable_data(0), np.ones(4))
  ckpt.save(2, state(20.0), jax.random.key(2), None, {"step": "2 again"})
print("SAID", " | ".join(said))
print("OK")
"""


def test_two_processes_agree_on_the_step_and_the_primary_moves_the_damaged_one(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(
    {k: v for k, v in os.environ.items() if not k.startswith("SEGRESEARCH_")},
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  script = textwrap.dedent(_TWO_PROCESSES)
  directory = str(tmp_path / "ckpt")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", script, f"127.0.0.1:{port}", str(i), directory],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=240) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-2000:] for _, err in outs)
  primary, other = (out for out, _ in outs)
  # Only the primary touched the folder; every process says why it skipped step 2.
  assert "step 5" in primary and "empty folder" in primary and "step 5" not in other
  assert "moved the damaged checkpoint step 2" in primary
  assert "step 2" in other and "does not restore" in other
  assert sorted(os.listdir(directory)) == ["1", "2", "2.damaged"]
  assert checkpoint.read_metadata(directory) == (2, {"step": "2 again"})
