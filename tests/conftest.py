"""Fakes shared by several test files: import them with `from conftest import ...`.

Each was copied between test files before; one copy keeps them from drifting apart.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib
from collections.abc import Sequence
from typing import Any

import flax
import numpy as np

from configs import okvos as okvos_config
from segresearch_jax.agent import rollout
from segresearch_jax.data import okvos, synthetic
from segresearch_jax.rewards import okvos as okvos_reward
from segresearch_jax.rl import losses, update
from segresearch_jax.search import factory


def words_embedder(texts: Sequence[str]) -> np.ndarray:
  """Deterministic bag-of-words vectors: cheap and enough to decide IGR in tests.

  Returns:
    float32 [len(texts), 64], unit rows (an empty text gives zeros).
  """
  out = np.zeros((len(texts), 64), np.float32)
  for i, t in enumerate(texts):
    for w in t.lower().split():
      out[i, zlib.crc32(w.encode()) % 64] += 1.0
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


class CountingEmbedder:
  """`words_embedder` that records the texts of every call (to count what was embedded)."""

  def __init__(self):
    self.calls: list[list[str]] = []

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    self.calls.append(list(texts))
    return words_embedder(texts)


def fake_sample(
  i: int,
  frames: np.ndarray,
  masks: np.ndarray,
  frame_numbers: np.ndarray,
  *,
  ability: str = "one-hop",
  steps: Sequence[str] = (),
) -> dict[str, Any]:
  """A raw sample as `okvos.load_example` makes it, from the caller's tiny arrays.

  Args:
    i: the sample's index; names its id ("s{i}"), video and question.
    frames: uint8 [F, H, W, 3].
    masks: bool [F, H, W], the GT masks.
    frame_numbers: int32 [F].
    ability: the sample's ability.
    steps: its search steps.
  """
  return {
    "id": f"s{i}",
    "video": f"v{i}",
    "oid": "1",
    "ability": ability,
    "question": f"Please find 'thing {i}' in the provided video.",
    "steps": list(steps),
    "frame_numbers": frame_numbers,
    "frame_paths": [f"/x/{n}.jpg" for n in frame_numbers],
    "frames": frames,
    "masks": masks,
    "ground_truth": okvos.ground_truth(frame_numbers, masks),
    "reference_chain": "[]",
  }


def small_synthetic(root: pathlib.Path) -> synthetic.Paths:
  """A synthetic OK-VOS of 6 train and 2 test samples, 8 frames of 64 x 48 each."""
  return synthetic.build(
    root, seed=0, num_train=6, num_test=2, teams_per_split=6, frames=(8, 8), size=(64, 48)
  )


def shrink_rollout(config) -> None:
  """Small images and episode lengths (in place): a tiny policy's rollouts on CPU."""
  config.data.frame_size = 64
  config.data.keyframe_size = 96
  config.data.search_image_size = 64
  config.rollout.max_prompt_length = 448
  config.rollout.max_response_length = 512
  config.rollout.max_obs_length = 192
  config.rollout.max_turns = 3


def search_settings(**overrides: Any) -> Any:
  """`factory.SearchConfig` of the default run config's `search` block, with overrides."""
  base = factory.SearchConfig.from_config(okvos_config.get_config().search)
  return dataclasses.replace(base, **overrides)


def rollout_config(**overrides: Any) -> rollout.RolloutConfig:
  """`rollout.RolloutConfig` of the default run config's `rollout` block, with overrides.

  The fields with no config counterpart (the tokenizer's ids and the image grids) have no
  default: a test passes the ones of its tiny model.
  """
  block = okvos_config.get_config().rollout
  names = [f.name for f in dataclasses.fields(rollout.RolloutConfig) if f.name in block]
  return rollout.RolloutConfig(**{**{n: block[n] for n in names}, **overrides})


def loss_config(**overrides: Any) -> losses.LossConfig:
  """`losses.LossConfig` of the default run config's `loss` block, with overrides."""
  base = losses.LossConfig.from_config(okvos_config.get_config().loss)
  return dataclasses.replace(base, **overrides)


def optimizer_config(**overrides: Any) -> update.OptimizerConfig:
  """`update.OptimizerConfig` of the default run config (GRPO's), with overrides."""
  base = update.OptimizerConfig.from_config(okvos_config.get_config())
  return dataclasses.replace(base, **overrides)


@flax.struct.dataclass
class LossRows:
  """The fields the losses read of `rl.rows.TrainingRows`, with a toy model's input in
  place of the prompt and response: the batch of update tests that inject a toy
  `logprob_fn`."""

  inputs: Any  # [N, ...] what the toy logprob_fn reads
  loss_mask: Any  # [N, L] bool
  old_logprobs: Any  # [N, L] float32
  advantages: Any  # [N] float32
  ref_logprobs: Any = None  # [N, L] float32


def reward_config(**overrides: Any) -> okvos_reward.RewardConfig:
  """`okvos_reward.RewardConfig` of the default run config's `reward` block, with overrides."""
  base = okvos_reward.RewardConfig.from_config(okvos_config.get_config().reward)
  return dataclasses.replace(base, **overrides)
