"""Training rows: the layout of an update batch, its LM-head index and mini-batches.

Every field of an update batch is row-major ([B, ...], B = prompts x group size): a
prompt's inputs are repeated for each of its `group_size` rows (consecutive), the
rollout's outputs are per row, and M-RoPE positions are [B, 3, L] (the layout of the
whole package) so one batch sharding splits every field over ("data", "fsdp").

Like the rest of `rl/`, this module imports nothing above it: the prompt batch comes
in as the rollout took it (an `agent.rollout.PromptBatch`), the outputs as it
returned them (an `agent.rollout.RolloutOutput`); both are read by field name.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from segresearch_jax import sharding


@flax.struct.dataclass
class TrainingRows:
  """One update batch, one row per trajectory (B = prompts x group size).

  A pytree of numpy arrays on the host and of batch-sharded arrays on the mesh
  (`sharding.shard_batch` places every field, `split_mini_batches` slices every
  field); the optional fields are None (no leaf) until a later stage adds them.
  Lp = max_prompt_length, R = max_response_length, T = max_turns, F = shown frames.
  """

  # The prompt's inputs (`agent.rollout.PromptBatch`), repeated for each of its rows.
  prompt_ids: Any  # [B, Lp] int32, left padded
  prompt_valid: Any  # [B, Lp] bool
  prompt_positions: Any  # [B, 3, Lp] int32 M-RoPE positions
  frame_patches: Any  # [B, F, Pf, pd] float32, the shown frames
  keyframe_patches: Any  # [B, F, Pk, pd] float32, their high-resolution copies
  # The rollout's outputs (`agent.rollout.RolloutOutput`).
  response_ids: Any  # [B, R] int32
  response_positions: Any  # [B, 3, R] int32
  response_valid: Any  # [B, R] bool
  obs_kind: Any  # [B, T] int32, each turn's observation image kind
  obs_slot: Any  # [B, T] int32, the shown frame a keyframe turn picked
  search_patches: Any  # [B, T, Ps, pd] float32, each turn's image_search result
  loss_mask: Any  # [B, R] bool, the trained tokens
  old_logprobs: Any  # [B, R] float32, the sampler's log-probs
  # Added by later stages: the scorer (`assemble_rows`; ones in the warm start), the
  # frozen reference policy (KL, `train.grpo_step`), the LM-head index
  # (`with_token_index`).
  advantages: Any = None  # [B] float32
  ref_logprobs: Any = None  # [B, R] float32
  token_index: Any = None  # [B, K] int32, see `token_index`

  def __len__(self) -> int:
    return len(self.prompt_ids)


# The `agent.rollout.PromptBatch` fields an update batch repeats for each row (all but
# next_pos: an update does not generate).
PROMPT_INPUTS = (
  "prompt_ids",
  "prompt_valid",
  "prompt_positions",
  "frame_patches",
  "keyframe_patches",
)

# The `agent.rollout.RolloutOutput` fields an update batch carries per row.
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


def training_rows(prompts: Any, out: Any, group_size: int) -> TrainingRows:
  """An update batch: per-prompt inputs (`prompts`, an `agent.rollout.PromptBatch`)
  repeated per row, then the rollout outputs (`out`, an `agent.rollout.RolloutOutput`
  on the host)."""
  rows = {k: np.repeat(np.asarray(getattr(prompts, k)), group_size, axis=0) for k in PROMPT_INPUTS}
  for k in ROW_FIELDS:
    rows[k] = np.asarray(getattr(out, k))
  return TrainingRows(**rows, old_logprobs=np.asarray(out.logprobs, np.float32))


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


def with_token_index(rows: TrainingRows, min_width: int = 0) -> TrainingRows:
  """`rows` plus `token_index`: the update's LM head then skips observation and
  padding positions, which never train (most of a search-heavy response).

  The training loop passes the widest index so far as `min_width`: the width only
  grows, so the update compiles at most once per bucket and usually once or twice.
  """
  return rows.replace(token_index=token_index(np.asarray(rows.loss_mask), min_width=min_width))


def split_mini_batches(rows: TrainingRows, count: int) -> list[TrainingRows]:
  """`count` consecutive slices of whole groups (batch_size % count == 0 is checked)."""
  size = len(rows) // count
  take = lambda i: operator.itemgetter(slice(i * size, (i + 1) * size))
  return [jax.tree.map(take(i), rows) for i in range(count)]


def assemble_rows(
  config, drawn: Sequence[tuple[Any, Any, dict[str, np.ndarray]]]
) -> tuple[TrainingRows, np.ndarray]:
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
    rows = rows.replace(advantages=scores["advantages"].astype(np.float32))
    if config.dapo.overlong_mask:
      # Not in place: the mask can be a read-only view of a device array.
      rows = rows.replace(loss_mask=rows.loss_mask & ~scores["truncated"].astype(bool)[:, None])
    parts.append((rows, ~scores["zero_variance"].reshape(-1, n)[:, 0]))
  rows = jax.tree.map(lambda *xs: np.concatenate(xs), *[r for r, _ in parts])
  trains = np.concatenate([t for _, t in parts])  # [groups]
  if config.dapo.filter_groups:
    order = np.argsort(~trains, kind="stable")[:p]  # useful groups first
    trains = trains[order]
  else:
    order, trains = np.arange(p), np.ones(p, bool)
  take = (order[:, None] * n + np.arange(n)).reshape(-1)  # the rows of those groups
  rows = jax.tree.map(lambda v: v[take], rows)
  rows = rows.replace(loss_mask=rows.loss_mask & np.repeat(trains, n)[:, None])
  return rows, trains
