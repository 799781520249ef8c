"""Warm-start step time on CPU: length-grouped batches vs one padded shape for all.

    python benchmarks/warm_start_speed.py [--samples 1536] [--steps 200] [--batch_size 8]

The embedded default's warm start (`configs/okvos.py`): the expert episodes of a
synthetic training set of `--samples` samples, built through the real bridge and
BM25 search (`warm_start.expert_rows`), then `--steps` supervised updates of
`--batch_size` rows, two ways, in one process:

- baseline (the warm start before length grouping): every row cut once to the whole
  set's longest prompt and response (`rows.fit_rows` in quarter-length buckets), random
  batches: one compiled shape.
- ours: the warm start's batches (`warm_start.fitted_batches`): rows of similar
  response length, each batch cut to its own longest row in eighths of the maximum
  lengths: one compilation per length bucket met.

Prints the steady-state seconds a step (compilations excluded: the first step of
each shape is timed apart), the total including compilations, the padded response
tokens a row, and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import operator
import tempfile
import time

import jax
import numpy as np

from segresearch_jax import components, notebook, sharding, steps, warm_start
from segresearch_jax.agent import episodes, rollout
from segresearch_jax.data import synthetic
from segresearch_jax.rl import rows as rows_lib


def _timed_steps(update_fn, state, batches, mesh):
  """(state, steady seconds a step, total seconds, compiled shapes): the first step of each
  shape is timed apart (it compiles)."""
  seen, steady, n_steady = set(), 0.0, 0
  t_total = time.perf_counter()
  for i, batch in enumerate(batches):
    shape = tuple(x.shape for x in jax.tree.leaves(batch))
    t = time.perf_counter()
    state, _ = update_fn(state, sharding.shard_batch(batch, mesh), jax.random.PRNGKey(i))
    jax.block_until_ready(state)
    if shape in seen:
      steady, n_steady = steady + time.perf_counter() - t, n_steady + 1
    else:
      seen.add(shape)
  return state, steady / max(n_steady, 1), time.perf_counter() - t_total, len(seen)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--samples", type=int, default=1536)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args()
  config = notebook.load_config()  # configs/okvos.py, found from the package
  config.sft.steps, config.sft.batch_size = args.steps, args.batch_size
  mesh = sharding.make_mesh(config.mesh)
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    paths = synthetic.build(tmp, seed=config.seed, num_train=args.samples, num_test=2)
    tokenizer = components.load_run_tokenizer(config)
    model_cfg, params = components.build_policy(config, tokenizer, mesh)
    shapes = episodes.EpisodeShapes.from_config(config, model_cfg)
    encoder = episodes.PromptEncoder(tokenizer, model_cfg, shapes)
    bridge = components.make_bridge(
      config, components.make_search_backend(config, paths.kb_dir), tokenizer, shapes
    )
    rcfg = rollout.RolloutConfig.from_config(config, shapes, tokenizer)
    runner = episodes.Runner(model_cfg, rcfg, shapes, tokenizer, bridge)
    dataset, _ = components.make_dataset(
      config, paths.okvos_dir, config.data.train_split, encoder, train=False, batch_size=1
    )
    data = warm_start.expert_rows(config, dataset, runner, model_cfg, shapes)
    print(f"{len(data)} expert rows in {time.perf_counter() - t:.0f}s", flush=True)

  data = data.replace(advantages=np.ones(len(data), np.float32))

  # Baseline: one shape for every batch, random rows.
  optimizer, update_fn = steps.make_update(config, model_cfg, rcfg, sft=True)
  state, state_sharding = steps.sharded_state(params, optimizer, mesh, config)
  update_fn = steps.jit_update(update_fn, mesh, state_sharding)
  whole, whole_shape = rows_lib.fit_rows(data)
  rng = np.random.default_rng(config.seed)
  picks = [rng.choice(len(data), args.batch_size, replace=False) for _ in range(args.steps)]
  batches = (jax.tree.map(operator.itemgetter(i), whole) for i in picks)
  _, base_step, base_total, base_shapes = _timed_steps(update_fn, state, batches, mesh)
  base_tokens = whole_shape.response

  # Ours: the warm start's own batches (`warm_start.fitted_batches`).
  grouped = warm_start.fitted_batches(data, args.batch_size, np.random.default_rng(config.seed))
  ours_batches = [next(grouped) for _ in range(args.steps)]
  ours_tokens = float(np.mean([b.response_ids.shape[1] for b in ours_batches]))
  optimizer, update_fn = steps.make_update(config, model_cfg, rcfg, sft=True)
  state, state_sharding = steps.sharded_state(params, optimizer, mesh, config)
  update_fn = steps.jit_update(update_fn, mesh, state_sharding)
  _, ours_step, ours_total, ours_shapes = _timed_steps(update_fn, state, ours_batches, mesh)

  print(f"\nwarm start, {args.steps} steps of {args.batch_size} rows ({jax.devices()[0].platform})")
  print(f"{'':28s}{'baseline':>12s}{'ours':>12s}{'ours/base':>12s}")
  rows = [
    ("s a step (steady)", base_step, ours_step),
    ("s in all (with compiles)", base_total, ours_total),
    ("response tokens a row", base_tokens, ours_tokens),
    ("compiled shapes", base_shapes, ours_shapes),
  ]
  for name, a, b in rows:
    print(f"{name:28s}{a:12.3f}{b:12.3f}{b / a:12.2f}")


if __name__ == "__main__":
  main()
