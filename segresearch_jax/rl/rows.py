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

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from segresearch_jax import protocol, sharding


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
  # [B, K, Pk, pd] float32: high-resolution copies of frames. As built (`training_rows`)
  # K = F, every shown frame's copy; `fit_rows` keeps only those the row's keyframe
  # turns picked.
  keyframe_patches: Any
  # The rollout's outputs (`agent.rollout.RolloutOutput`).
  response_ids: Any  # [B, R] int32
  response_positions: Any  # [B, 3, R] int32
  response_valid: Any  # [B, R] bool
  obs_kind: Any  # [B, T] int32, each turn's observation image kind (`protocol.*_IMAGE`)
  # [B, T] int32: each image turn's image, an index into keyframe_patches (a keyframe
  # turn) or search_patches (an image_search turn); -1 for a turn without one.
  obs_image: Any
  # [B, S, Ps, pd] float32: image_search results. As built S = T, one per turn;
  # `fit_rows` keeps only the turns that had one.
  search_patches: Any
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
  kind = rows["obs_kind"]
  turn = np.broadcast_to(np.arange(kind.shape[1], dtype=np.int32), kind.shape)
  obs_image = np.where(
    kind == protocol.KEYFRAME_IMAGE,
    np.asarray(out.obs_slot, np.int32),
    np.where(kind == protocol.SEARCH_IMAGE, turn, -1),
  )
  return TrainingRows(
    **rows, obs_image=obs_image.astype(np.int32), old_logprobs=np.asarray(out.logprobs, np.float32)
  )


def token_index(loss_mask: np.ndarray, buckets: int = 4, min_width: int = 0) -> np.ndarray:
  """int32 [B, K]: each row's trained response positions (`loss_mask`), padded with R.

  K is the longest row's count rounded up to a multiple of R / `buckets` (and at
  least `min_width`), so an update compiles once per bucket, not once per batch;
  under several processes it is the largest over all of them (the rows form one
  global array).
  """
  b, r = loss_mask.shape
  k = _bucket(loss_mask.sum(axis=1).max(initial=0), r, buckets, min_width)
  index = np.full((b, k), r, np.int32)
  for row, mask in enumerate(loss_mask):
    where = np.flatnonzero(mask)
    index[row, : len(where)] = where
  return index


def _bucket(used: int, full: int, buckets: int, floor: int = 0) -> int:
  """`used` (the largest over all processes) rounded up to a multiple of full / buckets,
  at least 1 and `floor`, at most `full`."""
  step = -(-full // buckets)
  used = max(int(sharding.process_max(int(used))), int(floor), 1)
  return min(full, -(-used // step) * step)


def _count_bucket(used: int, full: int, floor: int = 0) -> int:
  """An image count (the largest over all processes) rounded up to 1, 2, 4, ... or
  `full`, and at least `floor`."""
  used = max(int(sharding.process_max(int(used))), int(floor), 1)
  return min(full, 1 << (used - 1).bit_length())


def with_token_index(rows: TrainingRows, min_width: int = 0, buckets: int = 4) -> TrainingRows:
  """`rows` plus `token_index`: the update's LM head then skips observation and
  padding positions, which never train (most of a search-heavy response).

  The training loop passes the widest index so far as `min_width`: the width only
  grows, so the update compiles at most once per bucket and usually once or twice.
  """
  index = token_index(np.asarray(rows.loss_mask), buckets=buckets, min_width=min_width)
  return rows.replace(token_index=index)


@dataclasses.dataclass(frozen=True)
class UpdateShape:
  """The static sizes of an update batch that `fit_rows` chooses (each bucketed)."""

  prompt: int = 0  # prompt tokens kept (the right end of the left-padded prompt)
  response: int = 0  # response tokens kept (the left end)
  keyframes: int = 0  # high-resolution keyframe images per row
  search_images: int = 0  # image_search results per row
  head: int = 0  # LM-head positions per row (`token_index`)

  def union(self, other: UpdateShape) -> UpdateShape:
    """The larger of each size."""
    return UpdateShape(
      *(max(a, b) for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other)))
    )


def fit_rows(
  rows: TrainingRows, floor: UpdateShape = UpdateShape(), buckets: int = 4
) -> tuple[TrainingRows, UpdateShape]:
  """Cuts an update batch down to what its trajectories use, in a few static sizes.

  As built, every row is max_prompt_length + max_response_length tokens with every
  shown frame's high-resolution copy and one image_search slot per turn. Here:
  1. the prompt keeps its last P tokens and the response its first R, where P and R
     are the longest real prompt / response rounded up to a multiple of their maxima
     over `buckets` (a quarter by default);
  2. `keyframe_patches` keeps, per row, the frames its keyframe turns picked (in turn
     order) and `search_patches` the turns that returned an image, their counts
     rounded up to 1, 2, 4, ... (`obs_image` re-indexed to match);
  3. `token_index` (`with_token_index`, in the same `buckets`) over the kept response.
  Each size is at least `floor`'s (the trainer passes the union of the sizes so far,
  so the update compiles once per bucket it reaches), and under several processes
  the largest over all of them. Log-probs of the kept tokens are those of the whole
  row: left padding and the tail after the last real token are masked keys.

  Returns:
    (the fitted rows, their sizes).
  """
  kind, image = np.asarray(rows.obs_kind), np.asarray(rows.obs_image)
  prompt_valid, response_valid = np.asarray(rows.prompt_valid), np.asarray(rows.response_valid)
  lp, lr = prompt_valid.shape[1], response_valid.shape[1]
  # 1. Lengths: the prompt is left padded, the response right padded.
  first = np.where(prompt_valid.any(axis=0), np.arange(lp), lp).min(initial=lp)
  last = np.where(response_valid.any(axis=0), np.arange(lr) + 1, 0).max(initial=0)
  p = _bucket(lp - first, lp, buckets, floor.prompt)
  r = _bucket(last, lr, buckets, floor.response)
  cut = {
    "prompt_ids": lambda x: x[:, lp - p :],
    "prompt_valid": lambda x: x[:, lp - p :],
    "prompt_positions": lambda x: x[..., lp - p :],
    "response_ids": lambda x: x[:, :r],
    "response_valid": lambda x: x[:, :r],
    "response_positions": lambda x: x[..., :r],
    "loss_mask": lambda x: x[:, :r],
    "old_logprobs": lambda x: x[:, :r],
    "ref_logprobs": lambda x: x[:, :r],
  }
  fields = {
    f.name: getattr(rows, f.name) for f in dataclasses.fields(rows) if f.name != "token_index"
  }
  for name, fn in cut.items():
    if fields[name] is not None:
      fields[name] = fn(np.asarray(fields[name]))
  # 2. Images: the j-th image turn of each kind reads image j of the kept ones.
  new_image = np.full_like(image, -1)
  sizes = {}
  for kind_id, name, floor_count in (
    (protocol.KEYFRAME_IMAGE, "keyframe_patches", floor.keyframes),
    (protocol.SEARCH_IMAGE, "search_patches", floor.search_images),
  ):
    is_kind = kind == kind_id
    source = np.asarray(fields[name])
    # At most one image a turn, so a count never exceeds the turns.
    count = _count_bucket(is_kind.sum(axis=1).max(initial=0), kind.shape[1], floor_count)
    rank = np.cumsum(is_kind, axis=1) - 1  # [B, T]
    take = np.zeros((len(kind), count), np.int64)  # [B, count] source image of each kept one
    rows_of, turns_of = np.nonzero(is_kind)
    take[rows_of, rank[rows_of, turns_of]] = np.clip(
      image[rows_of, turns_of], 0, source.shape[1] - 1
    )
    fields[name] = np.take_along_axis(source, take[:, :, None, None], axis=1)
    new_image = np.where(is_kind, rank, new_image)
    sizes[name] = count
  fields["obs_image"] = new_image.astype(np.int32)
  fitted = with_token_index(TrainingRows(**fields), min_width=floor.head, buckets=buckets)
  shape = UpdateShape(
    prompt=p,
    response=r,
    keyframes=sizes["keyframe_patches"],
    search_images=sizes["search_patches"],
    head=fitted.token_index.shape[1],
  )
  return fitted, shape


def shared_frame_rows(
  group_size: int, micro_batches: int, rows: int | None = None, row_devices: int = 1
) -> int:
  """Consecutive rows of an update micro-batch that repeat one prompt's shown frames
  on one device, so that the update encodes those frames once for them.

  A GRPO batch holds each prompt's `group_size` rows consecutively and a mini-batch
  whole groups (`split_mini_batches`); micro-batches are strided (rows i, i + m, ...:
  `update.make_update_fn`), so when m divides the group, runs of group / m rows of a
  micro-batch share a prompt (otherwise no two neighbours need to). Over `row_devices`
  (data x fsdp) each device holds a block of rows / m / row_devices of them: sharing
  within a device's block needs no communication, sharing across devices would
  gather the frames' features instead, so the runs are cut to what fits a block.
  """
  if group_size % micro_batches:
    return 1
  run = group_size // micro_batches
  if rows is None:
    return run
  per_device = rows // micro_batches // max(row_devices, 1)
  return math.gcd(run, per_device) if per_device else 1


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
