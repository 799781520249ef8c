"""benchmarks/train_speed.py at a tiny size: the PyTorch reference computes our loss.

The benchmark's comparison is only honest if the transformers step sees the same
sequences, images, log-probs and loss as our update step; these tests pin that on
one prompt x two rows of an expert episode with the `tiny` policy.
"""

import argparse
import dataclasses
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from conftest import shrink_rollout

from segresearch_jax import protocol

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Under `pytest -n 2 --dist loadgroup` one worker builds the module's episode batch once.
pytestmark = pytest.mark.xdist_group("train_speed_bench")


def _load_benchmark():
  spec = importlib.util.spec_from_file_location(
    "train_speed_bench", ROOT / "benchmarks" / "train_speed.py"
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it loads
  spec.loader.exec_module(module)
  return module


bench = _load_benchmark()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("train_speed")
  args = argparse.Namespace(preset="tiny", prompts=1, group_size=2)
  config = bench.benchmark_config(args)
  config.workdir = str(root / "run")
  shrink_rollout(config)
  return bench.build_world(config, str(root / "synthetic"), 2)


@pytest.fixture(scope="module")
def exact(world):
  """(rows without GRPO fields, our current log-probs [B, R])."""
  rows = bench.expert_rows(world, 1, 2)
  return rows, bench.current_logprobs(world, rows)


@pytest.fixture(scope="module")
def rows(exact):
  return bench.with_grpo_fields(*exact, seed=0, noise=0.1)


def test_batch_is_a_group_of_expert_rows(rows):
  assert len(rows.response_ids) == len(rows.prompt_ids) == 2
  assert rows.advantages.shape == (2,)
  # The rows of a group share the prompt and trajectory, not advantages or old log-probs.
  np.testing.assert_array_equal(rows.prompt_ids[0], rows.prompt_ids[1])
  np.testing.assert_array_equal(rows.response_ids[0], rows.response_ids[1])
  assert rows.advantages[0] != rows.advantages[1]
  assert not np.allclose(rows.old_logprobs[0], rows.old_logprobs[1])
  assert np.all(rows.old_logprobs[~rows.loss_mask] == 0)
  # Observations are real: a keyframe image, and tokens masked out of the loss.
  assert np.all(np.any(rows.obs_kind == protocol.KEYFRAME_IMAGE, axis=-1))
  assert np.all(rows.response_valid.sum(-1) > rows.loss_mask.sum(-1))


def test_hf_inputs_hold_the_same_tokens_and_images(world, rows):
  model_kwargs, loss_inputs = bench.hf_inputs(rows, world)
  assert int(model_kwargs["attention_mask"].sum()) == bench.real_tokens(rows)
  assert int(loss_inputs["select"].sum()) == int(rows.loss_mask.sum())
  assert len(loss_inputs["old_logprobs"]) == len(loss_inputs["targets"])
  s = world.shapes
  frames = np.sum(rows.prompt_ids == world.model_cfg.image_token_id) // s.tokens(s.frame_size)
  observed = np.isin(rows.obs_kind, (protocol.KEYFRAME_IMAGE, protocol.SEARCH_IMAGE))
  assert len(model_kwargs["image_grid_thw"]) == frames + np.sum(observed)


def test_reference_logprobs_equal_ours(world, exact):
  rows, logp = exact
  model = bench.load_hf_model(world.params, world.model_cfg)
  model_kwargs, loss_inputs = bench.hf_inputs(bench.with_grpo_fields(rows, logp, noise=0.0), world)
  with torch.no_grad():
    theirs = bench.reference_logprobs(model, model_kwargs, loss_inputs, world.rcfg.banned_ids)
  np.testing.assert_allclose(theirs.numpy(), logp[rows.loss_mask], atol=1e-4)


@pytest.mark.slow  # compiles the whole update step: ~50 s of a loaded 2-core CPU
def test_reference_step_matches_our_update_step(world, rows):
  ours, ref = bench.time_interleaved(
    bench.ours_step_fn(world, rows), bench.reference_step_fn(world, rows), steps=2
  )
  assert ours.warmup_compiles >= 1 and ours.later_compiles == 0
  assert len(ours.times) == len(ref.times) == 2 and len(ours.losses) == 3
  # Same weights, sequences and loss: the first losses agree; after one update
  # (AdamW with clipping, warmup and weight decay on both sides) they still do.
  assert abs(ours.losses[0] - ref.losses[0]) < 1e-5
  assert abs(ours.losses[1] - ref.losses[1]) < 1e-4
  assert ours.losses[1] != ours.losses[0]


def test_bad_sizes_fail_clearly(world):
  with pytest.raises(ValueError, match="group_size"):
    bench.expert_rows(world, 1, 0)
  short = dataclasses.replace(world, rcfg=dataclasses.replace(world.rcfg, max_response_length=16))
  with pytest.raises(RuntimeError, match="fits? the rollout limits"):
    bench.expert_rows(short, 1, 1)
