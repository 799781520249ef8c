"""Rewards and advantages of a rollout batch: host parse, then one jitted function.

    parsed = parse(responses, batch)                     # host: regexes, JSON, IGR
    scores = score_fn(parsed, lengths, stop_reasons)     # jit: docs/method.md §3.1 terms,
                                                         # mask term, DAPO shaping,
                                                         # group advantages
    scores = Scorer(config, group_size, convention)(batch, episodes)    # both, per batch

Everything numeric runs in `jnp` under `jax.jit` (`reward_terms` of the official
reward, the mask-cache gather, the overlong penalty, the group normalisation), so
the same function can move inside a larger jitted step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax import protocol
from segresearch_jax.rewards import mask as mask_lib
from segresearch_jax.rewards import okvos
from segresearch_jax.rl import advantages as adv_lib
from segresearch_jax.rl import rows as rows_lib


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """Reward and shaping settings of a run config (`from_config`).

  Attributes:
    reward: the docs/method.md §3.1 constants.
    group_size: rollouts per prompt (consecutive rows).
    overlong_buffer: > 0 turns on DAPO's soft overlong penalty over the last
      `overlong_buffer` tokens before `max_response_length`.
    overlong_penalty: its size at `max_response_length`.
    max_response_length: the response cap.
    mask_weight: weight of the mask-cache term (docs/method.md §3.2); 0 = exactly the
      official reward (§3.1).
    mask_prompt: which cached prompt scores it ("box" | "point" | "mean").
  """

  reward: okvos.RewardConfig
  group_size: int
  overlong_buffer: int
  overlong_penalty: float
  max_response_length: int
  mask_weight: float
  mask_prompt: str

  @classmethod
  def from_config(cls, config: Any) -> ScoreConfig:
    """The scoring settings of a run config (`reward`, `rollout`, `dapo` blocks)."""
    r = config.reward
    return cls(
      reward=okvos.RewardConfig.from_config(r),
      group_size=config.rollout.group_size,
      overlong_buffer=config.dapo.overlong_buffer,
      overlong_penalty=config.dapo.overlong_penalty,
      max_response_length=config.rollout.max_response_length,
      mask_weight=r.mask_weight,
      mask_prompt=r.mask_prompt,
    )


class Parser:
  """Host half: decoded responses -> fixed arrays (keeps the IGR step-embedding cache)."""

  def __init__(self, reward: okvos.RewardConfig, embed_fn: okvos.EmbedFn | None = None):
    self.reward = reward
    self.embed_fn = embed_fn
    self.step_cache: dict = {}

  def __call__(
    self,
    responses: Sequence[str],
    ground_truths: Sequence[str | Mapping],
    steps: Sequence[Sequence[str] | None],
  ) -> dict[str, np.ndarray]:
    return okvos.parse_responses(
      responses,
      ground_truths,
      steps,
      config=self.reward,
      embed_fn=self.embed_fn,
      step_cache=self.step_cache,
    )


def make_score_fn(cfg: ScoreConfig):
  """The jitted numeric half.

  Returns:
    `score_fn(parsed, response_length [B], stop_reason [B], mask_inputs=None) -> dict`
    with the reward terms [B], `score` [B] (the §3.1 score, plus `mask_weight` x
    `mask_score` when `mask_inputs` holds `rewards.mask.mask_score`'s arguments),
    `reward` [B] (score plus shaping: what the advantages use), `advantages` [B]
    and `zero_variance` [B] (rows of groups whose rewards are all equal; DAPO's
    dynamic sampling drops them).
  """

  def score_fn(parsed, response_length, stop_reason, mask_inputs=None):
    terms = okvos.reward_terms(parsed, cfg.reward)
    if mask_inputs is not None:
      score = mask_lib.mask_score(**mask_inputs, prompt=cfg.mask_prompt)
      terms = mask_lib.add_mask_term(terms, score, cfg.mask_weight)
    reward = terms["score"]
    if cfg.overlong_buffer > 0:
      length = response_length.astype(jnp.float32)
      penalty = adv_lib.overlong_penalty(
        length, cfg.max_response_length, cfg.overlong_buffer, cfg.overlong_penalty
      )
      reward = reward + penalty
      terms["overlong_penalty"] = penalty
    zero_var = adv_lib.zero_variance_groups(reward, cfg.group_size)  # [B / group_size]
    return dict(
      terms,
      reward=reward,
      advantages=adv_lib.group_advantages(reward, cfg.group_size),
      zero_variance=jnp.repeat(zero_var, cfg.group_size),
      truncated=(stop_reason == protocol.MAX_LENGTH).astype(jnp.float32),
    )

  return jax.jit(score_fn)


class Scorer:
  """Host parse + the jitted numeric half (`make_score_fn`) for one group size.

  With `mask=True` (training with `reward.mask_weight > 0`) the batch must carry the
  mask-cache tables (`mask_point_iou`, `mask_box_iou`) and the mask term is added.
  """

  def __init__(self, config, group_size: int, convention: str, *, mask: bool = False):
    cfg = dataclasses.replace(ScoreConfig.from_config(config), group_size=group_size)
    self.group_size = group_size
    self.convention = convention
    self.resized = (config.data.frame_size, config.data.frame_size)  # as the GT conversion
    self.mask = mask and cfg.mask_weight > 0
    self.parse = Parser(cfg.reward)
    self.score_fn = make_score_fn(cfg)

  def __call__(self, batch: Mapping[str, Any], episodes: Any) -> dict[str, np.ndarray]:
    """Reward terms and advantages per row of `episodes` (an `agent.episodes.Episodes` of
    `batch`'s prompts, `group_size` consecutive rows each)."""
    n = self.group_size
    gts = rows_lib.per_row(batch, "ground_truth", n)
    parsed = self.parse(episodes.responses, gts, rows_lib.per_row(batch, "steps", n))
    mask_inputs = None
    if self.mask:
      mask_inputs = mask_lib.parse_mask_prompts(
        episodes.responses,
        gts,
        np.repeat(np.asarray(batch["frame_numbers"]), n, axis=0),
        self.convention,
        self.resized,
      )
      mask_inputs["point_iou"] = np.repeat(np.asarray(batch["mask_point_iou"]), n, axis=0)
      mask_inputs["box_iou"] = np.repeat(np.asarray(batch["mask_box_iou"]), n, axis=0)
    scores = self.score_fn(
      parsed, episodes.out.response_length, episodes.out.stop_reason, mask_inputs
    )
    return {k: np.asarray(v) for k, v in jax.device_get(scores).items()}
