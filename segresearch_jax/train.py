r"""Seg-ReSearch GRPO trainer.

    python -m segresearch_jax.train --config=configs/okvos.py

One step (docs/method.md §6): draw a batch of prompts -> run `group_size` episodes per prompt
in the jitted rollout (searches served by the host bridge) -> score them (docs/method.md §3.1,
plus the mask-cache term) -> group advantages -> `mini_batches` PPO-clip updates
-> log, trajectory records, checkpoint, periodic validation (greedy, held-out split).

The file reads top to bottom: logging a rollout batch, the GRPO step, evaluation, and
the loop. Library code lives in the package: what a run is built from (policy, data,
search, runners, scorers) in `components.py`, the jitted update in `steps.py`, the
warm start (supervised, on expert trajectories, for policies that start from random
weights) in `warm_start.py`, config checks in `config_checks.py`, process plumbing in
`runtime.py`, rollout in `agent/`, rewards and the `Scorer` in `rewards/`, losses and
the training-row layout in `rl/`, the reward curve in `eval/curves.py`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from segresearch_jax import checkpoint as checkpoint_lib
from segresearch_jax import components as components_lib
from segresearch_jax import config_checks, evaluate, protocol, runtime, sharding, steps
from segresearch_jax import metrics as metrics_lib
from segresearch_jax import warm_start as warm_start_lib
from segresearch_jax.agent import episodes as episodes_lib
from segresearch_jax.agent import records as records_lib
from segresearch_jax.agent import rollout
from segresearch_jax.data import pipeline
from segresearch_jax.eval import curves
from segresearch_jax.rewards import okvos as okvos_reward
from segresearch_jax.rl import rows as rows_lib

# ----------------------------------------------------------------------------
# Logging a rollout batch.
# ----------------------------------------------------------------------------


def episode_metrics(
  episodes: episodes_lib.Episodes, scores: Mapping[str, np.ndarray], slots: int | None = None
) -> dict:
  """Means of the reward terms, searches, lengths and stop reasons of a batch.

  With the rollout's decode `slots`, also `rollout/useful_fraction`: the tokens the
  episodes generated over the slot-steps the decode loop computed (decode steps x
  slots; 1 when every slot decodes a live episode at every step).
  """
  out = episodes.out
  m = {f"reward/{k}": float(np.mean(v)) for k, v in scores.items() if v.dtype.kind == "f"}
  m["search/per_trajectory"] = float(np.mean(scores["num_search"]))
  calls = [c for row in episodes.tool_calls for c in row]
  m["search/errors"] = float(np.mean([c.error is not None for c in calls])) if calls else 0.0
  m["response_length"] = float(np.mean(out.response_length))
  m["generated_tokens"] = float(np.mean(np.sum(out.loss_mask, axis=1)))
  m["turns"] = float(np.mean(out.num_turns))
  if slots and out.decode_steps is not None and int(np.max(out.decode_steps)) > 0:
    computed = int(np.max(out.decode_steps)) * slots
    m["rollout/useful_fraction"] = float(np.sum(out.loss_mask)) / computed
  for i, name in enumerate(protocol.STOP_REASONS):
    m[f"stop/{name}"] = float(np.mean(out.stop_reason == i))
  return m


def write_records(directory, step, tokenizer, batch, episodes, scores, group_size) -> None:
  """Trajectory records of one step (`agent.records`), rewards included."""
  samples = [
    {"id": i, "ability": a, "question": q}
    for i, a, q in zip(
      rows_lib.per_row(batch, "id", group_size),
      rows_lib.per_row(batch, "ability", group_size),
      rows_lib.per_row(batch, "question", group_size),
    )
  ]
  rewards = [
    {k: float(v[r]) for k, v in scores.items() if v.dtype.kind == "f"} for r in range(len(samples))
  ]
  recs = records_lib.episode_records(tokenizer, episodes.out, samples, episodes.tool_calls, rewards)
  process = jax.process_index() if jax.process_count() > 1 else None
  records_lib.write_step(directory, step, recs, process=process)


# ----------------------------------------------------------------------------
# The GRPO step.
# ----------------------------------------------------------------------------


def rollout_and_score(config, batch, runner, scorer, params, rng, attempt: int = 0):
  """(episodes, scores) of one prompt batch; `attempt` picks the sampling streams, so
  two calls with the same batch, rng and attempt draw alike (the frozen control)."""
  p = rows_lib.prompts_per_process(config)
  episodes = runner(
    params, batch, jax.random.fold_in(rng, attempt), prompt_index=pipeline.global_positions(p)
  )
  return episodes, scorer(batch, episodes)


def collect_rollouts(config, first_batch, data_iter, runner, scorer, params, rng):
  """This process's episodes for one step; with DAPO dynamic sampling, extra batches
  until enough groups have reward variance (at most `dapo.max_refills` extra)."""
  n, p = config.rollout.group_size, rows_lib.prompts_per_process(config)
  drawn = []
  for attempt in range(1 + (config.dapo.max_refills if config.dapo.filter_groups else 0)):
    batch = first_batch if attempt == 0 else next(data_iter)
    drawn.append((batch, *rollout_and_score(config, batch, runner, scorer, params, rng, attempt)))
    useful = sum(int(np.sum(~s["zero_variance"])) // n for _, _, s in drawn)
    if not config.dapo.filter_groups or useful >= p:
      break
  return drawn


def initial_params(ckpt, state, state_sharding, start: int) -> Any | None:
  """The warm-start parameters (checkpoint step 0): a copy of the state's at step 0,
  else restored from the checkpoint; None when step 0 is no longer kept."""
  if start == 0:
    return jax.tree.map(jnp.copy, state.params)
  if 0 not in ckpt.all_steps():
    return None
  abstract = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
    state.params,
    state_sharding.params,
  )
  return checkpoint_lib.restore_params(ckpt.directory, 0, abstract)


def frozen_control(config, batch, runner, scorer, params, rng) -> dict[str, float]:
  """`control/*` reward means of the step's first prompt batch rolled out with the
  frozen warm start and the same sampling streams as the policy's rollout, so the
  per-step difference to `reward/*` cancels which prompts were drawn."""
  _, scores = rollout_and_score(config, batch, runner, scorer, params, rng)
  return {f"control/{k}": float(np.mean(v)) for k, v in scores.items() if v.dtype.kind == "f"}


def grpo_step(
  config, state, rows: rows_lib.TrainingRows, update_fn, rng, mesh, ref=None
) -> tuple[Any, dict]:
  """`loss.mini_batches` updates over the rows; metrics averaged over them."""
  if ref is not None:  # KL to the frozen reference policy.
    ref_params, ref_fn = ref
    rows = rows.replace(
      ref_logprobs=np.concatenate(
        [
          sharding.local_rows(ref_fn(ref_params, sharding.shard_batch(mb, mesh)))
          for mb in rows_lib.split_mini_batches(rows, config.loss.mini_batches)
        ]
      )
    )
  metrics = []
  for i, mb in enumerate(rows_lib.split_mini_batches(rows, config.loss.mini_batches)):
    state, m = update_fn(state, sharding.shard_batch(mb, mesh), jax.random.fold_in(rng, i))
    metrics.append(m)
  metrics = jax.device_get(metrics)
  out = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
  skipped = sum(float(m["skipped"]) for m in metrics)
  if skipped == len(metrics):
    raise FloatingPointError(
      f"Every update of this step had a non-finite gradient norm ({metrics[0]['grad_norm']})."
    )
  return state, out


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def final_evaluation(
  config, params, c: components_lib.Components, writer, n_params: int, t_start: float
) -> dict:
  """Greedy evaluation on the held-out split with and without search, the paired gain
  over the frozen control, the reward curve; writes and returns `summary.json`."""
  workdir = pathlib.Path(config.workdir)
  summary = {"steps": config.total_steps, "parameters": int(n_params)}
  final = config.total_steps
  with_search = evaluate.evaluate(config, params, c, workdir / "eval", masks=config.eval.masks)
  without = evaluate.evaluate(
    config, params, c, workdir / "eval_no_search", search=False, masks=config.eval.masks
  )
  writer.write(final, with_search, phase="eval")
  writer.write(final, without, phase="eval_no_search")
  print(
    f"evaluation on {config.data.eval_split} ({with_search['samples']} samples, greedy, "
    f"segmenter {config.eval.segmenter}):"
  )
  print(evaluate.format_comparison(with_search, without), flush=True)
  for failure in with_search["failures"]:
    print(f"failed (scored 0): {failure['id']}: {failure['error']}", flush=True)
  train_rows = writer.read("train")
  if train_rows:
    summary["reward_first_steps"] = float(np.mean([r["reward/score"] for r in train_rows[:5]]))
    summary["reward_last_steps"] = float(np.mean([r["reward/score"] for r in train_rows[-5:]]))
    paired = [r for r in train_rows if "control/score" in r]
    if len(paired) > 1:
      gain = curves.paired_gain(paired)
      summary["reward_minus_frozen"] = gain
      text = ", ".join(f"{k} {mean:+.3f} +- {se:.3f}" for k, (mean, se) in gain.items())
      print(f"reward - frozen warm start on the same prompts (mean +- se): {text}", flush=True)
    curves.plot_rewards(train_rows, workdir / "reward_curve.png", writer.read("eval"))
  summary.update(
    eval_with_search=with_search,
    eval_without_search=without,
    wall_time_s=time.time() - t_start,
  )
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  writer.close()
  print(f"done in {metrics_lib.format_duration(time.time() - t_start)}; outputs in {workdir}")
  return summary


def _short(m: Mapping[str, float]) -> str:
  return ", ".join(
    f"{k} {m[k]:.3f}" for k in ("score", "outcome", "val/reward", "search/per_trajectory") if k in m
  )


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def train(config) -> dict:
  """Runs the configured job; returns the summary it also writes to `workdir/summary.json`."""
  if config.dry_run:  # Abstract arrays only: the plan of the configured mesh.
    text = components_lib.run_plan(config)
    print(text)
    return {"plan": text}
  mesh = sharding.make_mesh(config.mesh)
  config_checks.check_config(config, mesh)
  t_start = time.time()
  # Several processes: each rolls out its share of the prompts on its own devices,
  # updates run over the global mesh, process 0 logs and evaluates.
  main = jax.process_index() == 0
  log = functools.partial(print, flush=True) if main else lambda *a, **k: None
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  # 1. Policy, data, search.
  with sharding.main_process_first("tokenizer"):  # The embedded tokenizer is cached on disk.
    tokenizer = components_lib.load_run_tokenizer(config)
  model_cfg, params = components_lib.build_policy(config, tokenizer, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(
    f"policy {model_cfg.family} ({config.model.hf_dir or config.model.preset}): "
    f"{n_params / 1e6:.2f}M parameters, vocab {model_cfg.text.vocab_size}; mesh "
    f"{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)"
    + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
  )
  with sharding.main_process_first("components"):  # Synthetic data and mask cache files.
    c = components_lib.build_components(config, tokenizer, model_cfg, mesh)
  n, rcfg, runner = config.rollout.group_size, c.rcfg, c.runner
  train_ds, train_source = components_lib.make_dataset(
    config,
    c.okvos_dir,
    config.data.train_split,
    c.encoder,
    train=True,
    batch_size=rows_lib.prompts_per_process(config),
    mask_cache_dir=c.mask_cache_dir,
  )
  log(
    f"data: {len(train_source)} {config.data.train_split} samples in {c.okvos_dir}; "
    f"search: {config.search.backend} over {config.search.kb_dir or c.kb_dir or '-'}"
  )
  data_iter = iter(train_ds)
  optimizer, update_fn = steps.make_update(config, model_cfg, rcfg)
  writer = metrics_lib.MetricsWriter(workdir, config.total_steps)
  ckpt = checkpoint_lib.Checkpointer(
    workdir / "checkpoints", keep=config.checkpoint.keep, save_every=config.checkpoint.every_steps
  )
  metadata = checkpoint_lib.make_metadata(model_cfg, config, tokenizer)
  rng = jax.random.PRNGKey(config.seed)

  # 2. Resume from the latest checkpoint, or warm-start and save step 0.
  latest = ckpt.latest_step()
  if latest is None:
    if config.sft.steps > 0:
      t0 = time.time()
      expert_ds, _ = components_lib.make_dataset(
        config, c.okvos_dir, config.data.train_split, c.encoder, train=False, batch_size=1
      )
      data = warm_start_lib.expert_rows(config, expert_ds, runner, model_cfg, c.shapes)
      log(
        f"warm start: {len(data)} expert episodes "
        f"({time.time() - t0:.1f}s), {config.sft.steps} supervised steps"
      )
      params = warm_start_lib.warm_start(config, params, data, model_cfg, rcfg, mesh, writer)
    state, state_sharding = steps.sharded_state(params, optimizer, mesh, config)
    ckpt.save(0, state, rng, data_iter, metadata, force=True)
    start = 0
  else:
    state, state_sharding = steps.sharded_state(params, optimizer, mesh, config)
    abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sharding
    )
    del state
    start, state, rng, _ = ckpt.restore_latest(abstract, data_iter, log=log)
    writer.truncate_after(start)
    log(f"resumed from step {start} in {ckpt.directory}")
  params = None  # The train state owns the parameters from here on.
  update_fn = steps.jit_update(update_fn, mesh, state_sharding)
  # The warm start (step 0): the KL reference and the frozen control policy.
  initial = None
  if config.loss.kl_coef > 0 or config.eval.frozen_control:
    initial = initial_params(ckpt, state, state_sharding, start)
    if initial is None:
      where = f"step 0 is no longer in {ckpt.directory}"
      log(f"{where}: the KL reference and the frozen control start from step {start}")
      initial = jax.tree.map(jnp.copy, state.params)
  ref = None
  if config.loss.kl_coef > 0:
    # Rows out as they came in: `sharding.local_rows` reads this process's share back.
    ref_fn = jax.jit(
      steps.make_logprob_fn(model_cfg, rcfg), out_shardings=sharding.batch_sharding(mesh)
    )
    ref = (initial, lambda p, mb: ref_fn(p, mb)[0])
  # The rollouts' parameters: regathered on device over this process's devices.
  rollout_params = lambda p: sharding.rollout_params(p, runner.mesh)
  control_params = rollout_params(initial) if config.eval.frozen_control else None

  # 3. GRPO steps.
  writer.start(start)
  # The largest update sizes so far (see `rows.fit_rows`): they only grow, so the update
  # compiles once per size bucket it reaches.
  update_shape = rows_lib.UpdateShape()
  for step in range(start + 1, config.total_steps + 1):
    t0 = time.time()
    step_rng = jax.random.fold_in(rng, step)
    drawn = collect_rollouts(
      config,
      next(data_iter),
      data_iter,
      runner,
      c.scorer,
      rollout_params(state.params),
      step_rng,
    )
    t_rollout = time.time() - t0
    rows, trains = rows_lib.assemble_rows(
      config, [(rollout.PromptBatch.from_batch(b), episodes.out, s) for b, episodes, s in drawn]
    )
    rows, shape = rows_lib.fit_rows(rows, update_shape)
    update_shape = update_shape.union(shape)
    state, m = grpo_step(config, state, rows, update_fn, step_rng, mesh, ref)
    batch, episodes, scores = drawn[0]
    local = episode_metrics(episodes, scores, rcfg.slot_count(len(episodes.responses)))
    local.update({"dapo/rollout_batches": len(drawn), "dapo/groups_trained": np.mean(trains)})
    if control_params is not None:
      local.update(frozen_control(config, batch, runner, c.scorer, control_params, step_rng))
    m.update(sharding.process_mean(local))
    m.update({"time/step_s": time.time() - t0, "time/rollout_s": t_rollout})
    write_records(workdir / "trajectories", step, tokenizer, batch, episodes, scores, n)
    if step % config.log_every == 0 or step == config.total_steps:
      writer.write(
        step,
        m,
        console=(
          f"step {step}/{config.total_steps} | reward {m['reward/score']:.3f} "
          + (f"(frozen {m['control/score']:.3f}) " if "control/score" in m else "")
          + f"(outcome {sum(m['reward/' + k] for k in okvos_reward.OUTCOME_TERMS):.2f}, "
          f"process {m['reward/process_score']:.2f}) | search/traj "
          f"{m['search/per_trajectory']:.2f} | len {m['response_length']:.0f} | "
          f"loss {m['loss']:+.4f} | clip {m['clip_fraction']:.3f} | "
          f"{m['time/step_s']:.1f}s/step | ETA {writer.eta(step)}"
        ),
      )
    ckpt.save(step, state, rng, data_iter, metadata, force=step == config.total_steps)
    if (
      config.eval.every_steps and step % config.eval.every_steps == 0 and step < config.total_steps
    ):
      params = rollout_params(state.params)  # Collective; then process 0 evaluates.
      if main:
        dataset, source = c.eval_dataset()
        val, _ = evaluate.greedy_episodes(
          config, params, dataset, c.eval_runner, c.eval_scorer, source=source
        )
        writer.write(step, val, phase="eval", console=f"eval @ {step}: {_short(val)}")
      sharding.barrier(f"eval {step}")
  ckpt.close()  # Collective: before process 0 goes on alone.

  # 4. Final evaluation on the held-out split, with and without search (process 0, on
  # its own devices: the parameters regathered on device as for the rollouts).
  params = rollout_params(state.params)
  if not main:
    return {}
  return final_evaluation(config, params, c, writer, n_params, t_start)


def main(argv: list[str]) -> None:
  del argv
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/okvos.py")
  runtime.setup(config)
  train(config)


if __name__ == "__main__":
  runtime.define_config_flag()
  app.run(main)
