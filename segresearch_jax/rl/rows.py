"""Training rows: the layout of an update batch, its LM-head index and mini-batches.

Every field of an update batch is row-major ([B, ...], B = prompts x group size): a
prompt's inputs are repeated for each of its `group_size` rows (consecutive), the
rollout's outputs are per row, and M-RoPE positions are [B, 3, L] (the layout of the
whole package) so one batch sharding splits every field over ("data", "fsdp").

Like the rest of `rl/`, this module imports nothing above it: the prompt batch comes
in as the rollout took it (an `agent.rollout.PromptBatch`), the outputs as the mapping
it returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from segresearch_jax import sharding

# The `agent.rollout.PromptBatch` fields an update batch repeats for each row (all but
# next_pos: an update does not generate).
PROMPT_INPUTS = (
  "prompt_ids",
  "prompt_valid",
  "prompt_positions",
  "frame_patches",
  "keyframe_patches",
)

# The rollout outputs an update batch carries per row.
ROW_FIELDS = (
  "response_ids",
  "response_positions",
  "response_valid",
  "obs_kind",
  "obs_slot",
  "search_patches",
  "loss_mask",
)


def prompts_per_process(config) -> int:
  """Prompts of the global batch (`batch_size`) that each process draws and rolls out."""
  return config.batch_size // jax.process_count()


def per_row(batch: Mapping[str, Any], key: str, group_size: int) -> list[Any]:
  """A per-prompt field repeated for each of its `group_size` rows."""
  return [v for v in batch[key] for _ in range(group_size)]


def training_rows(
  prompts: Any, out: Mapping[str, np.ndarray], group_size: int
) -> dict[str, np.ndarray]:
  """An update batch: per-prompt inputs (`prompts`, an `agent.rollout.PromptBatch`)
  repeated per row, then the rollout outputs."""
  rows = {k: np.repeat(np.asarray(getattr(prompts, k)), group_size, axis=0) for k in PROMPT_INPUTS}
  for k in ROW_FIELDS:
    rows[k] = np.asarray(out[k])
  rows["old_logprobs"] = np.asarray(out["logprobs"], np.float32)
  return rows


def token_index(loss_mask: np.ndarray, buckets: int = 4, min_width: int = 0) -> np.ndarray:
  """int32 [B, K]: each row's trained response positions (`loss_mask`), padded with R.

  K is the longest row's count rounded up to a multiple of R / `buckets` (and at
  least `min_width`), so an update compiles once per bucket, not once per batch;
  under several processes it is the largest over all of them (the rows form one
  global array).
  """
  b, r = loss_mask.shape
  step = -(-r // buckets)
  longest = sharding.process_max(loss_mask.sum(axis=1).max(initial=0))
  k = min(r, max(1, -(-longest // step), -(-min_width // step)) * step)
  index = np.full((b, k), r, np.int32)
  for row, mask in enumerate(loss_mask):
    where = np.flatnonzero(mask)
    index[row, : len(where)] = where
  return index


def with_token_index(rows: Mapping[str, np.ndarray], min_width: int = 0) -> dict[str, np.ndarray]:
  """`rows` plus `token_index`: the update's LM head then skips observation and
  padding positions, which never train (most of a search-heavy response).

  The training loop passes the widest index so far as `min_width`: the width only
  grows, so the update compiles at most once per bucket and usually once or twice.
  """
  return dict(rows, token_index=token_index(np.asarray(rows["loss_mask"]), min_width=min_width))


def split_mini_batches(rows: Mapping[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
  """`count` consecutive slices of whole groups (batch_size % count == 0 is checked)."""
  size = len(rows["prompt_ids"]) // count
  return [{k: v[i * size : (i + 1) * size] for k, v in rows.items()} for i in range(count)]


def assemble_rows(
  config, drawn: Sequence[tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, np.ndarray]]]
) -> tuple[dict, np.ndarray]:
  """Training rows of exactly `batch_size` groups from the drawn rollouts.

  `drawn` holds (prompt batch in the rollout's layout, rollout outputs, scores) per
  rollout batch, in the order they were drawn.

  With DAPO dynamic sampling, groups with reward variance come first and any
  zero-variance group that still has to fill the batch is masked out of the loss
  (static shapes; the loss's token count excludes it, as if dropped). With
  overlong masking, truncated trajectories are masked out too.

  Returns:
    (rows, bool [groups] whether each kept group trains), this process's share.
  """
  n, p = config.rollout.group_size, prompts_per_process(config)
  parts = []
  for prompts, out, scores in drawn:
    rows = training_rows(prompts, out, n)
    rows["advantages"] = scores["advantages"].astype(np.float32)
    if config.dapo.overlong_mask:
      # Not in place: the mask can be a read-only view of a device array.
      rows["loss_mask"] = rows["loss_mask"] & ~scores["truncated"].astype(bool)[:, None]
    parts.append((rows, ~scores["zero_variance"].reshape(-1, n)[:, 0]))
  rows = {k: np.concatenate([r[k] for r, _ in parts]) for k in parts[0][0]}
  trains = np.concatenate([t for _, t in parts])  # [groups]
  if config.dapo.filter_groups:
    order = np.argsort(~trains, kind="stable")[:p]  # useful groups first
    trains = trains[order]
  else:
    order, trains = np.arange(p), np.ones(p, bool)
  take = (order[:, None] * n + np.arange(n)).reshape(-1)  # the rows of those groups
  rows = {k: v[take] for k, v in rows.items()}
  rows["loss_mask"] = rows["loss_mask"] & np.repeat(trains, n)[:, None]
  return rows, trains
