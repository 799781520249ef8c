"""The trainer: the main command end to end, resume after kill -9, early config errors."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from conftest import rollout_config, small_synthetic

from configs import okvos as okvos_config
from segresearch_jax import components, config_checks, steps
from segresearch_jax.agent import rollout
from segresearch_jax.data import okvos, synthetic
from segresearch_jax.eval import curves
from segresearch_jax.rewards import okvos as okvos_reward
from segresearch_jax.rl import rows as rows_lib

# The embedded default shrunk to seconds (tiny policy, small frames, short episodes,
# `configs/okvos.py:runlocal`), on the embedded default's synthetic set rather than
# runlocal's 16 / 4 samples.
CONFIG = "--config=configs/okvos.py:runlocal"
DATA = ["--config.data.synthetic_train=192", "--config.data.synthetic_test=32"]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.build(out, seed=0)  # The default set, built once for every run here.
  return str(out)


def _command(workdir, synthetic_dir, *extra, flags=()):
  return [
    sys.executable,
    "-m",
    "segresearch_jax.train",
    CONFIG,
    f"--config.workdir={workdir}",
    f"--config.data.synthetic_dir={synthetic_dir}",
    *DATA,
    *flags,
    *extra,
  ]


def _rows(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _train_rows(workdir):
  return {r["step"]: r for r in _rows(workdir) if r["phase"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_dir):
  workdir = tmp_path_factory.mktemp("run")
  # Validation at step 1 (the last step has the final evaluation instead).
  cmd = _command(workdir, synthetic_dir, "--config.eval.every_steps=1")
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir, out.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("train_run")  # shares the module's run
def test_main_command_trains_logs_checkpoints_and_validates(uninterrupted):
  workdir, stdout = uninterrupted
  assert "parameters" in stdout and "sft 2/2" in stdout and "step 2/2" in stdout
  assert "evaluation on test" in stdout and "search off" in stdout and "J&F" in stdout
  rows = _train_rows(workdir)
  assert sorted(rows) == [1, 2]
  for key in ("loss", "grad_norm", "reward/score", "search/per_trajectory", "stop/max_length"):
    assert key in rows[2]
  # The frozen control rolls out the same prompts with the same sampling streams: at
  # step 1 the policy is still the warm start, so both rollouts are the same episodes.
  assert rows[1]["control/score"] == rows[1]["reward/score"]
  assert rows[1]["control/keyframe_score"] == rows[1]["reward/keyframe_score"]
  assert "control/score" in rows[2] and "reward - frozen warm start" in stdout
  records = (workdir / "trajectories" / "step_000002.jsonl").read_text().splitlines()
  assert len(records) == 4  # 2 prompts x group of 2
  rec = json.loads(records[0])
  assert {"response", "tool_calls", "reward", "stop_reason"} <= set(rec)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["eval_with_search"]["samples"] == 2
  assert summary["eval_with_search"]["failures"] == []
  validation = [r for r in _rows(workdir) if r["phase"] == "eval" and r["step"] == 1]
  assert len(validation) == 1 and 0.0 <= validation[0]["val/reward"] <= 1.0
  gain = [rows[s]["reward/score"] - rows[s]["control/score"] for s in (1, 2)]
  assert summary["reward_minus_frozen"]["steps 1-2"][0] == pytest.approx(np.mean(gain))
  assert {"0", "1", "2"} <= set(os.listdir(workdir / "checkpoints"))
  assert (workdir / "reward_curve.png").stat().st_size > 1000
  assert len((workdir / "eval" / "predictions.jsonl").read_text().splitlines()) == 2
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert results["summary"]["overall"]["count"] == 2
  assert (workdir / "eval" / "report.html").is_file()
  assert (workdir / "eval_no_search" / "eval_metrics.json").is_file()
  assert list((workdir / "tb").iterdir())  # TensorBoard events


@pytest.mark.slow
@pytest.mark.xdist_group("train_run")  # shares the module's run
def test_resume_after_kill_reproduces_the_next_metrics(tmp_path, synthetic_dir, uninterrupted):
  reference = _train_rows(uninterrupted[0])
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    _command(workdir, synthetic_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  # Kill -9 as soon as step 1 is checkpointed (the run is then in step 2 or saving).
  deadline = time.time() + 900
  while not (workdir / "checkpoints" / "1").is_dir():
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  out = subprocess.run(
    _command(workdir, synthetic_dir), capture_output=True, text=True, timeout=1200
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert "resumed from step 1" in out.stdout
  resumed = _train_rows(workdir)
  # control/score: the frozen control is restored from checkpoint step 0.
  for key in (
    "loss",
    "grad_norm",
    "param_norm",
    "reward/score",
    "response_length",
    "control/score",
  ):
    assert resumed[2][key] == pytest.approx(reference[2][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.xdist_group("train_run")  # shares the module's run
def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(
  tmp_path, synthetic_dir, uninterrupted
):
  reference = _train_rows(uninterrupted[0])
  workdir = tmp_path / "damaged"
  shutil.copytree(uninterrupted[0], workdir)
  # Step 2's array chunks cut in half (a full disk, a copy that died): only a restore sees it.
  chunks = [p for p in (workdir / "checkpoints" / "2" / "state").rglob("*") if p.parent.name == "d"]
  assert chunks
  for path in chunks:
    os.truncate(path, path.stat().st_size // 2)
  out = subprocess.run(
    _command(workdir, synthetic_dir), capture_output=True, text=True, timeout=1200
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert "checkpoint step 2 in" in out.stdout and "does not restore: " in out.stdout
  assert "resumed from step 1" in out.stdout
  assert (workdir / "checkpoints" / "2.damaged").is_dir()
  resumed = _train_rows(workdir)
  for key in ("loss", "grad_norm", "param_norm", "reward/score"):
    assert resumed[2][key] == pytest.approx(reference[2][key], rel=1e-5, abs=1e-6), key


def test_misspelled_config_key_fails_before_any_work(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.train",
    "--config=configs/okvos.py",
    f"--config.workdir={tmp_path}",
    "--config.model.presett=tiny",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "presett" in out.stderr
  assert not (tmp_path / "synthetic").exists()


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("model.hf_dir", "/nonexistent/ckpt", "config.model.hf_dir"),
    ("data.okvos_dir", "/nonexistent/okvos", "config.data.okvos_dir"),
    ("search.kb_dir", "/nonexistent/kb", "config.search.kb_dir"),
    ("loss.mini_batches", 3, "mini_batches"),
  ],
)
def test_unusable_config_fails_with_a_clear_message(field, value, message):
  config = okvos_config.get_config()
  if field == "data.okvos_dir":
    config.data.source = "okvos"
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises((FileNotFoundError, ValueError), match=message.replace(".", r"\.")):
    config_checks.check_config(config)


def test_search_backend_that_is_down_fails_before_training(tmp_path):
  config = okvos_config.get_config()
  config.workdir = str(tmp_path)
  config.search.backend = "service"
  config.search.service_url = "http://127.0.0.1:9"  # discard port: nothing listens
  config.search.timeout_s = 1.0
  config.search.cache_mode = "off"
  with pytest.raises(RuntimeError, match="does not answer"):
    components.make_search_backend(config, "")


@pytest.mark.slow
@pytest.mark.xdist_group("train_run")  # shares the module's run
def test_evaluate_command_on_a_checkpoint(tmp_path, synthetic_dir, uninterrupted):
  workdir = uninterrupted[0]
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.evaluate",
    CONFIG,
    f"--config.workdir={workdir}",
    f"--config.data.synthetic_dir={synthetic_dir}",
    *DATA,
    f"--checkpoint={workdir / 'checkpoints'}",
    "--step=1",
    f"--out={tmp_path / 'eval'}",
    "--nosearch",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "evaluating step 1" in out.stdout
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["summary"]["overall"]["count"] == 2
  preds = [
    json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().split("\n") if x
  ]
  # Search detached: every search call came back as an error observation.
  calls = [c for p in preds for c in p["search_calls"]]
  assert all(c["error"] for c in calls)


def _drawn(truncated, rewards_vary, group_size=2, length=5):
  """One rollout batch as `assemble_rows` takes it (prompts in the rollout's layout,
  outputs, scores), every array read-only (as `jax.device_get` hands them back)."""
  prompts = len(rewards_vary)
  rows = prompts * group_size
  batch = rollout.PromptBatch(
    prompt_ids=np.arange(prompts)[:, None] * np.ones((1, 3), np.int32),
    prompt_valid=np.ones((prompts, 3), bool),
    prompt_positions=np.zeros((prompts, 3, 3), np.int32),
    next_pos=np.full((prompts,), 3, np.int32),
    frame_patches=np.zeros((prompts, 1, 2, 2), np.float32),
    keyframe_patches=np.zeros((prompts, 1, 2, 2), np.float32),
  )
  out = rollout.RolloutOutput(
    response_ids=np.zeros((rows, length), np.int32),
    response_positions=np.zeros((rows, 3, length), np.int32),
    response_valid=np.ones((rows, length), bool),
    loss_mask=np.ones((rows, length), bool),
    logprobs=np.zeros((rows, length), np.float32),
    response_length=np.full((rows,), length, np.int32),
    stop_reason=np.zeros((rows,), np.int32),
    num_turns=np.zeros((rows,), np.int32),
    obs_kind=np.zeros((rows, 1), np.int32),
    obs_slot=np.zeros((rows, 1), np.int32),
    search_patches=np.zeros((rows, 1, 2, 2), np.float32),
  )
  scores = {
    "advantages": np.arange(rows, dtype=np.float32),
    "truncated": np.asarray(truncated, np.float32),
    "zero_variance": np.repeat(~np.asarray(rewards_vary), group_size),
  }
  for x in [*jax.tree.leaves(batch), *jax.tree.leaves(out), *scores.values()]:
    x.setflags(write=False)
  return batch, out, scores


@pytest.mark.parametrize("overlong_mask", [False, True])
def test_assemble_rows_masks_truncated_rows_and_unusable_groups(overlong_mask):
  config = okvos_config.get_config()
  config.batch_size, config.rollout.group_size = 2, 2
  config.dapo.overlong_mask = overlong_mask
  config.dapo.filter_groups = True
  # Two draws: the first has one group without reward variance, the refill has two good ones.
  drawn = [
    _drawn(truncated=[0, 1, 0, 0], rewards_vary=[False, True]),
    _drawn(truncated=[1, 0, 0, 0], rewards_vary=[True, True]),
  ]
  rows, trains = rows_lib.assemble_rows(config, drawn)
  assert trains.tolist() == [True, True]
  # Useful groups first: group 1 of the first draw, then group 0 of the refill.
  np.testing.assert_array_equal(rows.advantages, [2, 3, 0, 1])
  masked = ~rows.loss_mask.any(axis=1)
  assert masked.tolist() == ([False, False, True, False] if overlong_mask else [False] * 4)


def test_reward_curve_and_gain_against_the_frozen_control(tmp_path):
  from PIL import Image

  rows = [
    {
      "step": s,
      "reward/score": 1.0 + 0.1 * s,
      "control/score": 1.0 - 0.05 * (s % 2),
      "reward/process_score": 0.5,
      **{f"reward/{k}": 0.1 for k in okvos_reward.OUTCOME_TERMS},
    }
    for s in range(1, 7)
  ]
  diff = np.array([r["reward/score"] - r["control/score"] for r in rows])
  gain = curves.paired_gain(rows)
  assert list(gain) == ["steps 1-6", "steps 4-6"]
  assert gain["steps 1-6"][0] == pytest.approx(diff.mean())
  assert gain["steps 1-6"][1] == pytest.approx(diff.std(ddof=1) / np.sqrt(6))
  assert gain["steps 4-6"][0] == pytest.approx(diff[3:].mean())
  path = tmp_path / "curve.png"
  curves.plot_rewards(rows, path, [{"step": 6, "score": 1.2}], window=3)
  assert Image.open(path).size == (700, 400)


def test_trainer_logprobs_use_the_rollout_temperature(monkeypatch):
  seen = {}

  def token_logprobs(*args, temperature, **kwargs):
    seen["temperature"] = temperature
    return np.zeros((1, 2)), np.zeros((1, 2))

  monkeypatch.setattr(steps, "training_inputs", lambda *a: ())
  monkeypatch.setattr(steps.decoding, "token_logprobs", token_logprobs)
  fields = (*rows_lib.PROMPT_INPUTS, *rows_lib.ROW_FIELDS, "obs_image", "old_logprobs")
  rows = rows_lib.TrainingRows(**{k: np.zeros((1, 2), np.int32) for k in fields})
  rows = rows.replace(
    prompt_positions=np.zeros((1, 3, 2), np.int32),
    response_positions=np.zeros((1, 3, 2), np.int32),
  )
  rcfg = rollout_config(
    temperature=0.7,
    im_end_id=151645,
    frame_grid=(2, 2),
    keyframe_grid=(2, 2),
    search_grid=(2, 2),
    banned_ids=(),
  )
  steps.make_logprob_fn(None, rcfg)(None, rows)
  assert seen["temperature"] == 0.7  # the sampler's distribution, not temperature 1


class _FakeEncoder:
  """What `components.make_dataset` needs of the prompt encoder, without a tokenizer."""

  model_cfg = type("ModelCfg", (), {"coord_convention": "norm1000"})()

  def __call__(self, sample):
    return {}


def _broken_set(tmp_path, broken):
  """A small synthetic OK-VOS whose first `broken` train samples lost their frames."""
  paths = small_synthetic(tmp_path / "syn")
  for i in range(broken):
    for f in (pathlib.Path(paths.okvos_dir) / "train" / "JPEGImages" / f"train_{i:04d}").iterdir():
      f.unlink()
  config = okvos_config.get_config()
  config.data.frame_size = 16
  return config, paths.okvos_dir


def test_training_on_only_broken_samples_fails_instead_of_hanging(tmp_path):
  config, okvos_dir = _broken_set(tmp_path, broken=6)
  config.data.max_broken_fraction = 1.0  # even with no cap, a pass with nothing usable fails
  ds, _ = components.make_dataset(
    config, okvos_dir, "train", _FakeEncoder(), train=True, batch_size=2
  )
  with pytest.raises(okvos.DataError, match=r"6 of the 6 samples .*none is usable"):
    next(iter(ds))
  # The warm start's pass over the same data says so too (not "No expert episode fits").
  expert_ds, _ = components.make_dataset(
    config, okvos_dir, "train", _FakeEncoder(), train=False, batch_size=1
  )
  with pytest.raises(okvos.DataError, match="syn-train_000"):
    list(expert_ds)


def test_broken_share_above_the_cap_fails_naming_samples(tmp_path):
  config, okvos_dir = _broken_set(tmp_path, broken=1)
  make = lambda: components.make_dataset(
    config, okvos_dir, "train", _FakeEncoder(), train=True, batch_size=2
  )[0]
  config.data.max_broken_fraction = 0.1  # 1 of 6 is more than 10%
  with pytest.raises(okvos.DataError, match=r"1 of the 6 .*syn-train_0000"):
    it = iter(make())
    for _ in range(6):  # two epochs: the broken sample is read in the first
      next(it)
  config.data.max_broken_fraction = 0.2
  it = iter(make())
  ids = [i for _ in range(6) for i in next(it)["id"]]
  assert "syn-train_0000" not in ids and len(set(ids)) == 5


def test_useful_fraction_counts_generated_tokens_over_slot_steps():
  from segresearch_jax import train

  n = 4
  lengths = np.array([2, 3, 5, 10])  # tokens each episode generated
  loss_mask = np.arange(10)[None, :] < lengths[:, None]
  out = rollout.RolloutOutput(
    response_ids=np.zeros((n, 10), np.int32),
    response_positions=np.zeros((n, 3, 10), np.int32),
    response_valid=loss_mask,
    loss_mask=loss_mask,
    logprobs=np.zeros((n, 10), np.float32),
    response_length=lengths.astype(np.int32),
    stop_reason=np.zeros(n, np.int32),
    num_turns=np.ones(n, np.int32),
    obs_kind=np.zeros((n, 1), np.int32),
    obs_slot=np.zeros((n, 1), np.int32),
    search_patches=np.zeros((n, 1, 1, 1), np.float32),
    decode_steps=np.int32(10),
  )
  episodes = types.SimpleNamespace(out=out, tool_calls=[[]] * n, responses=[""] * n)
  scores = {"num_search": np.zeros(n, np.float32)}
  # One slot per episode: 4 slots x 10 steps for 20 generated tokens.
  assert train.episode_metrics(episodes, scores, slots=4)["rollout/useful_fraction"] == 0.5
  # Two slots over 10 steps: 20 of 20 slot-steps used.
  assert train.episode_metrics(episodes, scores, slots=2)["rollout/useful_fraction"] == 1.0
  assert "rollout/useful_fraction" not in train.episode_metrics(episodes, scores)
