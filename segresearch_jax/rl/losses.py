"""GRPO / DAPO policy-gradient losses (docs/method.md §6), each returning (sum, count).

Every loss returns the SUM of its per-unit values and the COUNT of units, so that
micro-batches accumulate to the exact global mean (`sum / count` over the whole
mini-batch) whatever the aggregation. Shapes: N trajectories, L tokens; `mask`
[N, L] is 1 on generated tokens (observations and padding are 0).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # only for hints: the losses read fields, they need nothing else of rows
  from segresearch_jax.rl.rows import TrainingRows

Array = jax.Array

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "low_var_kl")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The GRPO loss settings of `config.loss` (`from_config`; the config holds the official
  values: symmetric clip 0.2, dual clip 3, no KL, no entropy, token-mean)."""

  clip_low: float
  clip_high: float  # DAPO's clip-higher: 0.28
  dual_clip: float  # 0 disables
  log_ratio_clamp: float
  kl_coef: float
  kl_estimator: str
  entropy_coef: float
  aggregation: str

  @classmethod
  def from_config(cls, loss: Any) -> LossConfig:
    """Every field from `config.loss` (a ConfigDict)."""
    return cls(**{f.name: loss[f.name] for f in dataclasses.fields(cls)})

  def __post_init__(self):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}.")


def aggregate(values: Array, mask: Array, mode: str) -> tuple[Array, Array]:
  """(sum, count) of per-token `values` [N, L] under `mask` for one aggregation mode."""
  mask = mask.astype(values.dtype)
  if mode == "token-mean":
    return jnp.sum(values * mask), jnp.sum(mask)
  per_seq = jnp.sum(values * mask, axis=1)  # [N]
  tokens = jnp.sum(mask, axis=1)
  has = (tokens > 0).astype(values.dtype)
  if mode == "seq-mean-token-mean":
    per_seq = per_seq / jnp.maximum(tokens, 1.0)
  elif mode != "seq-mean-token-sum":
    raise ValueError(f"Unknown aggregation {mode!r}.")
  return jnp.sum(per_seq * has), jnp.sum(has)


def ppo_clip(
  logp: Array, old_logp: Array, advantages: Array, cfg: LossConfig
) -> tuple[Array, Array]:
  """Per-token clipped surrogate loss and whether the clip was active.

  Args:
    logp, old_logp: [N, L] current and sampling log-probs.
    advantages: [N, L] (or broadcastable).

  Returns:
    (loss [N, L], clipped bool [N, L]).
  """
  log_ratio = jnp.clip(logp - old_logp, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
  loss = jnp.maximum(unclipped, clipped)
  was_clipped = clipped > unclipped
  if cfg.dual_clip > 0:
    # Dual clip: for negative advantages the loss is bounded by -A * c.
    bound = -advantages * cfg.dual_clip
    loss = jnp.where(advantages < 0, jnp.minimum(loss, bound), loss)
  return loss, was_clipped


def kl_penalty(logp: Array, ref_logp: Array, estimator: str) -> Array:
  """Per-token KL(pi || ref) estimate: k1 = log-ratio, low_var_kl = k3 clamped to +-10."""
  if estimator == "k1":
    return logp - ref_logp
  kl = ref_logp - logp
  return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)


def grpo_loss(
  logp: Array,
  entropy: Array | None,
  batch: TrainingRows,
  cfg: LossConfig,
) -> tuple[Array, Array, dict[str, Array]]:
  """The policy loss of one micro-batch.

  Args:
    logp: [N, L] current log-probs of the tokens.
    entropy: [N, L] entropies of the predicting distributions, or None.
    batch: the micro-batch's rows; reads `loss_mask` [N, L], `old_logprobs` [N, L],
      `advantages` [N] and, when not None, `ref_logprobs` [N, L].
    cfg: loss settings.

  Returns:
    (loss sum, count, metric sums keyed by name; each metric is a (sum over
    masked tokens) to be divided by the token count).
  """
  mask = batch.loss_mask.astype(jnp.float32)
  adv = batch.advantages[:, None].astype(jnp.float32)  # [N, 1] over tokens
  # 1. Clipped surrogate.
  per_token, was_clipped = ppo_clip(logp, batch.old_logprobs, adv, cfg)
  # 2. KL to the reference policy.
  kl = jnp.zeros_like(per_token)
  if cfg.kl_coef and batch.ref_logprobs is not None:
    kl = kl_penalty(logp, batch.ref_logprobs, cfg.kl_estimator)
    per_token = per_token + cfg.kl_coef * kl
  # 3. Entropy bonus.
  ent = jnp.zeros_like(per_token) if entropy is None else entropy
  if cfg.entropy_coef:
    per_token = per_token - cfg.entropy_coef * ent
  loss_sum, count = aggregate(per_token, mask, cfg.aggregation)
  tok = lambda x: jnp.sum(x * mask)
  metrics = {
    "clip_fraction": tok(was_clipped.astype(jnp.float32)),
    "kl": tok(kl),
    "entropy": tok(ent),
    "ratio": tok(
      jnp.exp(jnp.clip(logp - batch.old_logprobs, -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
    ),
    "tokens": jnp.sum(mask),
  }
  return loss_sum, count, metrics


def sft_loss(
  logp: Array,
  entropy: Array | None,
  batch: TrainingRows,
  cfg: LossConfig,
) -> tuple[Array, Array, dict[str, Array]]:
  """Masked cross-entropy on the generated tokens (the supervised warm start).

  Same signature and (sum, count) contract as `grpo_loss`, so the update step and
  its micro-batch accumulation are shared; `cfg.aggregation` applies.
  """
  mask = batch.loss_mask.astype(jnp.float32)
  loss_sum, count = aggregate(-logp, mask, cfg.aggregation)
  ent = jnp.zeros_like(logp) if entropy is None else entropy
  tok = lambda x: jnp.sum(x * mask)
  metrics = {
    "clip_fraction": jnp.zeros(()),
    "kl": jnp.zeros(()),
    "entropy": tok(ent),
    "ratio": tok(jnp.ones_like(logp)),
    "tokens": jnp.sum(mask),
  }
  return loss_sum, count, metrics
