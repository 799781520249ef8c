"""Fakes shared by several test files: import them with `from conftest import ...`.

Each was copied between test files before; one copy keeps them from drifting apart.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from configs import okvos as okvos_config
from segresearch_jax.data import okvos, synthetic
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
