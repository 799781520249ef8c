"""The warm start: supervised updates on the expert trajectories (search -> keyframe ->
answer), for a policy that starts from random weights.

    data = warm_start.expert_rows(config, dataset, runner, model_cfg, shapes)
    params = warm_start.warm_start(config, params, data, model_cfg, rcfg, mesh, writer)
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from segresearch_jax import sharding, steps
from segresearch_jax.agent import episodes as episodes_lib
from segresearch_jax.agent import rollout
from segresearch_jax.rl import rows as rows_lib

# The warm start's length buckets: eighths of the maximum prompt and response lengths.
_BUCKETS = 8


def expert_rows(
  config, dataset, runner: episodes_lib.Runner, model_cfg, shapes
) -> rows_lib.TrainingRows:
  """Expert episodes of every training sample, as training rows with group size 1.

  Each sample's reference trajectory (`episodes.expert_turns`) goes through the
  real bridge, so observations are exactly what the rollout would show.
  """
  host_fn = rollout.bridge_host_fn(runner.bridge, shapes.image_cfg, shapes.search_size)
  cfg = dataclasses.replace(runner.cfg, group_size=1)
  rows, skipped = [], 0
  for batch in dataset:
    for i in range(len(batch["id"])):
      sample = {k: batch[k][i] for k in batch}
      runner.bridge.set_shown_frames([episodes_lib.shown_frames(batch, 1)[i]])
      ep = episodes_lib.expert_episode(
        episodes_lib.expert_turns(sample),
        host_fn,
        runner.tokenizer,
        model_cfg,
        cfg,
        shapes.search_patch_shape,
        int(sample["next_pos"]),
      )
      if ep is None:
        skipped += 1
        continue
      row = operator.itemgetter(slice(i, i + 1))
      prompt = jax.tree.map(row, rollout.PromptBatch.from_batch(batch))
      rows.append(rows_lib.training_rows(prompt, ep, 1))
  runner.bridge.pop_records()
  if not rows:
    raise RuntimeError("No expert episode fits the rollout limits; raise rollout.max_* lengths.")
  if skipped:
    print(f"warm start: {skipped} expert episodes did not fit the length limits and were skipped")
  return jax.tree.map(lambda *xs: np.concatenate(xs), *rows)


def length_grouped_batches(
  lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool_batches: int = 16
) -> Iterator[np.ndarray]:
  """Row indices of mini-batches of similar length, forever.

  Each epoch shuffles the rows, sorts every pool of `pool_batches` batches by length,
  cuts the pools into batches and shuffles the batch order: every row is seen once an
  epoch, and a batch padded to its own longest row wastes little (the expert
  episodes run from ~100 to the full response length). An epoch's last rows that do
  not fill a batch wait for the next epoch's shuffle.
  """
  n = len(lengths)
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}] (the rows), got {batch_size}.")
  while True:
    order = rng.permutation(n)
    pool = pool_batches * batch_size
    order = np.concatenate(
      [
        chunk[np.argsort(lengths[chunk], kind="stable")]
        for chunk in np.split(order, range(pool, n, pool))
      ]
    )
    batches = order[: n - n % batch_size].reshape(-1, batch_size)
    yield from batches[rng.permutation(len(batches))]


def fitted_batches(
  data: rows_lib.TrainingRows, batch_size: int, rng: np.random.Generator
) -> Iterator[rows_lib.TrainingRows]:
  """The warm start's mini-batches of `data`, forever: rows of similar response length
  (`length_grouped_batches`), each batch cut to what it uses (`rows.fit_rows` in eighths
  of the maximum lengths). The prompt length and image counts are the whole set's, the
  response length follows the batch, so the update compiles once per length bucket.
  """
  whole = rows_lib.fit_rows(data, buckets=_BUCKETS)[1]
  floor = dataclasses.replace(whole, response=0)
  valid = np.asarray(data.response_valid)
  lengths = np.where(valid.any(axis=1), valid.shape[1] - np.argmax(valid[:, ::-1], axis=1), 0)
  for idx in length_grouped_batches(lengths, batch_size, rng):
    yield rows_lib.fit_rows(jax.tree.map(operator.itemgetter(idx), data), floor, _BUCKETS)[0]


def warm_start(config, params, data: rows_lib.TrainingRows, model_cfg, rcfg, mesh, writer) -> Any:
  """`config.sft.steps` supervised updates on mini-batches of expert rows (`fitted_batches`:
  similar lengths, each cut to its own longest row, so a step costs what its rows need)."""
  optimizer, update_fn = steps.make_update(config, model_cfg, rcfg, sft=True)
  state, state_sharding = steps.sharded_state(params, optimizer, mesh, config)
  update_fn = steps.jit_update(update_fn, mesh, state_sharding)
  n = len(data)  # this process's expert rows
  size = config.sft.batch_size // jax.process_count()
  if jax.process_count() > 1 and n < size:  # Every process must bring the same row count.
    raise ValueError(
      f"Process {jax.process_index()} has {n} expert episodes, fewer than its share "
      f"({size}) of sft.batch_size={config.sft.batch_size}."
    )
  data = data.replace(advantages=np.ones(data.loss_mask.shape[:1], np.float32))
  batches = fitted_batches(data, min(size, n), np.random.default_rng(config.seed))
  writer.start(0)
  for step in range(1, config.sft.steps + 1):
    batch = sharding.shard_batch(next(batches), mesh)
    state, m = update_fn(state, batch, jax.random.PRNGKey(step))
    if step % config.sft.log_every == 0 or step == config.sft.steps:
      m = jax.device_get(m)
      writer.write(
        step,
        m,
        phase="sft",
        console=f"sft {step}/{config.sft.steps} | loss {float(m['loss']):.3f} | "
        f"lr {float(m['lr']):.2e} | grad norm {float(m['grad_norm']):.2f}",
      )
  return state.params
