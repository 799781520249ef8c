r"""Evaluation: greedy episodes on a held-out split -> predictions -> masks -> J&F.

    python -m segresearch_jax.evaluate --config=configs/okvos.py \
        --checkpoint=runs/okvos/checkpoints [--step=N] [--out=DIR] [--nosearch]

1. Greedy episodes (temperature 0, one per sample) with the run's search backend,
   or with search detached (`--nosearch`: every search returns an error).
2. Each response becomes a prediction record (`eval.predictions`: first keyframe,
   first answer, the search calls and their results), written to predictions.jsonl
   together with its docs/method.md §3.1 reward terms.
3. The video segmenter of `config.eval` (SAM2's video predictor, or the weight-free
   one) is prompted on the keyframe with the box AND the point; masks are written as
   PNGs; J, F and J&F per ability and overall go to results.json, a printed table
   and an HTML report (docs/method.md §7).

The trainer runs steps 1-3 at the end of training (and `--config.total_steps=0`
evaluates the initial or warm-started policy the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segresearch_jax import checkpoint as checkpoint_lib
from segresearch_jax import components as components_lib
from segresearch_jax import config_checks, protocol, runtime, sharding
from segresearch_jax.agent import episodes as episodes_lib
from segresearch_jax.agent import rollout
from segresearch_jax.data import okvos as okvos_lib
from segresearch_jax.data import pipeline
from segresearch_jax.data import reasoning as reasoning_data
from segresearch_jax.eval import predictions as predictions_lib
from segresearch_jax.eval import reasoning
from segresearch_jax.models import policy
from segresearch_jax.models import tokenizer as tokenizer_lib
from segresearch_jax.rewards import okvos as okvos_reward
from segresearch_jax.rewards import scoring

# ----------------------------------------------------------------------------
# Greedy episodes.
# ----------------------------------------------------------------------------


def pad_batch(batch: Mapping[str, Any], size: int) -> tuple[dict, int]:
  """Repeats the last sample so a short final batch keeps the compiled shape."""
  real = len(batch["id"])
  if real == size:
    return dict(batch), real
  idx = np.minimum(np.arange(size), real - 1)
  return {k: np.asarray(v)[idx] for k, v in batch.items()}, real


# The reward terms a failed sample scores 0 in when no sample ran to name them.
FAILED_TERMS = (*okvos_reward.OUTCOME_TERMS, "process_score", "score", "num_search")


def greedy_episodes(
  config, params, dataset, runner, scorer, *, search: bool = True, source=None
) -> tuple[dict, list[predictions_lib.Prediction]]:
  """Greedy episodes over a held-out split, `config.eval.num_samples` at most (0 = all).

  Every sample of the evaluated prefix of the split counts: one the pipeline skipped
  as broken (which `source` tells) gets a failed prediction that scores 0.

  Args:
    config: the run config.
    params: the policy's parameters.
    dataset: batches of `config.batch_size` prompts in split order (the last may be
      short).
    runner: an `episodes.Runner` with group size 1 and temperature 0.
    scorer: a `rewards.scoring.Scorer` for group size 1 (docs/method.md §3.1 terms).
    search: False detaches the search backend (the no-search ablation).
    source: the dataset's `okvos.OkvosDataSource` (its rows and skipped samples'
      errors); None evaluates what the dataset yields.

  Returns:
    (mean reward terms with `outcome` = the sum of the outcome terms and
    `val/reward` = the official validation reward, one `Prediction` per sample with
    its reward terms and tool calls).
  """
  limit = config.eval.num_samples or None
  preds: list[predictions_lib.Prediction] = []
  chains: dict[str, str] = {}  # sample id -> its reference chain (JSON; "" = none)
  for batch in dataset:
    batch, real = pad_batch(batch, config.batch_size)
    episodes = runner(params, batch, jax.random.PRNGKey(0), search=search)
    scores = scorer(batch, episodes)
    for r in range(real):
      chains[str(batch["id"][r])] = str(batch["reference_chain"][r])
      reward = {k: float(v[r]) for k, v in scores.items() if v.dtype.kind == "f"}
      reward["validation"] = okvos_reward.validation_reward(
        episodes.responses[r], str(batch["ground_truth"][r])
      )
      preds.append(
        predictions_lib.parse_response(
          str(batch["id"][r]),
          str(batch["ability"][r]),
          episodes.responses[r],
          stop_reason=protocol.STOP_REASONS[int(episodes.out.stop_reason[r])],
          tool_calls=[dataclasses.asdict(c) for c in episodes.tool_calls[r]],
          reward=reward,
        )
      )
    if limit and len(preds) >= limit:
      break
  if source is not None:
    preds = with_failed_samples(preds, source, limit)
  if not preds:
    raise RuntimeError("The evaluation split is empty.")
  preds = preds[:limit]
  ran = [p.reward for p in preds if p.failure is None]
  keys = list(ran[0]) if ran else [*FAILED_TERMS, "validation"]
  m = {k: float(np.mean([(p.reward or {}).get(k, 0.0) for p in preds])) for k in keys}
  m["outcome"] = sum(m[k] for k in okvos_reward.OUTCOME_TERMS)
  m["search/per_trajectory"] = m.pop("num_search")
  m.update(search_metrics(preds, chains))
  m["val/reward"] = m.pop("validation")
  m["samples"] = len(preds)
  m["failed"] = sum(p.failure is not None for p in preds)
  return m, preds


SEARCH_TOOLS = ("text_search", "image_search")


def search_metrics(
  preds: list[predictions_lib.Prediction], chains: Mapping[str, str]
) -> dict[str, float]:
  """Searches per episode by tool, and how often the first search finds the answer.

  `search/first_query_hit` is the share of the episodes whose sample has a reference
  chain (`chains`: sample id -> the chain's JSON, as the synthetic set writes it) in
  which the FIRST search uses the chain's first tool and retrieves the document (or
  image) that the chain's first step names (by title); an episode that never searches
  misses. Absent when no sample has a chain with titles (e.g. the real OK-VOS).
  """
  m = {
    f"search/{tool.split('_')[0]}_per_trajectory": float(
      np.mean([sum(c.get("tool") == tool for c in p.search_calls) for p in preds])
    )
    for tool in SEARCH_TOOLS
  }
  hits = []
  for p in preds:
    chain = json.loads(chains.get(p.id) or "[]")
    if not chain or "title" not in chain[0]:
      continue
    first = p.search_calls[0] if p.search_calls else {}
    titles = [r.get("title", r.get("name")) for r in first.get("results") or []]
    hits.append(first.get("tool") == chain[0]["tool"] and chain[0]["title"] in titles)
  if hits:
    m["search/first_query_hit"] = float(np.mean(hits))
  return m


def with_failed_samples(
  preds: list[predictions_lib.Prediction], source, limit: int | None
) -> list[predictions_lib.Prediction]:
  """`preds` in split order with a failed prediction for each sample of the split's
  first `limit` (None = all) that the pipeline skipped; predictions past that prefix
  (read in place of the skipped ones) are dropped."""
  by_id = {p.id: p for p in preds}
  errors = list(getattr(source, "errors", []))
  out = []
  for index, row in enumerate(source.rows[:limit]):
    sid = okvos_lib.sample_id(row, source.split, index)
    if sid in by_id:
      out.append(by_id[sid])
      continue
    reason = next(
      (e for e in errors if e.startswith(f"Sample {sid}:")), "skipped as broken (see the log)"
    )
    ability = str(row.get("ability"))
    out.append(predictions_lib.failed_prediction(sid, ability, reason, FAILED_TERMS))
  return out


def format_comparison(with_search: Mapping[str, float], without: Mapping[str, float]) -> str:
  """A table of the evaluation terms (and J&F when present) with and without search."""
  keys = (*okvos_reward.OUTCOME_TERMS, "outcome", "process_score", "score", "search/per_trajectory")
  keys += ("search/text_per_trajectory", "search/image_per_trajectory", "search/first_query_hit")
  keys += tuple(k for k in ("J", "F", "J&F") if k in with_search)
  width = max(map(len, keys)) + 2
  lines = [f"{'term':<{width}}{'with search':>14}{'search off':>14}{'diff':>10}"]
  for k in keys:
    a, b = with_search.get(k, float("nan")), without.get(k, float("nan"))
    lines.append(f"{k:<{width}}{a:>14.3f}{b:>14.3f}{a - b:>+10.3f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Masks and J&F.
# ----------------------------------------------------------------------------


def segment_and_score(
  config, preds, okvos_dir: str, convention: str, out_dir, *, print_table: bool = True
) -> dict[str, Any]:
  """Masks from the predictions with `config.eval`'s segmenter, then J&F and the report.

  Only the predicted samples are scored (a `num_samples` limit evaluates a prefix);
  within them a missing or unusable answer scores empty masks, never skipped.
  """
  from segresearch_jax.segmentation import video

  ids = {p.id for p in preds}
  samples = [
    s for s in predictions_lib.load_eval_samples(okvos_dir, config.data.eval_split) if s.id in ids
  ]
  segment_fn = functools.partial(video.segment_video, segmenter=video.from_config(config.eval))
  size = config.data.frame_size
  return predictions_lib.evaluate_predictions(
    preds,
    samples,
    segment_fn,
    convention,
    out_dir,
    resized=(size, size),
    report=True,
    report_samples=config.eval.report_samples,
    print_table=print_table,
  )


def evaluate(
  config,
  params,
  components: components_lib.Components,
  out_dir: str | os.PathLike,
  *,
  search: bool = True,
  masks: bool = True,
) -> dict[str, Any]:
  """Greedy episodes, predictions.jsonl, then (with `masks`) segmentation and J&F.

  Args:
    config: the run config.
    params: the policy's parameters.
    components: the run's `components.Components`; evaluation uses its eval_dataset,
      eval_runner (greedy, with evaluation's search backend), eval_scorer (group 1),
      okvos_dir and model_cfg.
    out_dir: predictions.jsonl, results.json, masks/ and report.html go here.
    search: False evaluates with search detached.
    masks: also segment and compute J&F.

  Returns:
    The mean reward terms (`outcome` and, with masks, "J", "F", "J&F" overall) and
    "failures": [{"id", "error"}] of the samples whose data was broken (scored 0).
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dataset, source = components.eval_dataset()
  m, preds = greedy_episodes(
    config,
    params,
    dataset,
    components.eval_runner,
    components.eval_scorer,
    search=search,
    source=source,
  )
  m["failures"] = [{"id": p.id, "error": p.failure} for p in preds if p.failure is not None]
  predictions_lib.write_predictions(out / predictions_lib.PREDICTIONS_FILE, preds)
  if masks:
    results = segment_and_score(
      config,
      preds,
      components.okvos_dir,
      components.model_cfg.coord_convention,
      out,
      print_table=False,
    )
    overall = results["summary"]["overall"]
    m.update({"J": overall["J"], "F": overall["F"], "J&F": overall["JF"]})
    m["failures"] = results["failures"]
    m["failed"] = len(m["failures"])
  (out / "eval_metrics.json").write_text(json.dumps(m, indent=1))
  return m


# ----------------------------------------------------------------------------
# ReasonSeg, ReasonVOS, ReVOS: their own samples and tables (`eval.reasoning`).
# ----------------------------------------------------------------------------


def benchmark_dir(config) -> str:
  """The raw folder of `config.data.benchmark` (`config.data.<benchmark>_dir`)."""
  name = config.data.benchmark
  if name not in reasoning_data.BENCHMARKS:
    raise ValueError(f"config.data.benchmark={name!r} is not one of {reasoning_data.BENCHMARKS}.")
  root = config.data[f"{name}_dir"]
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(
      f"config.data.{name}_dir={root!r} is not a directory; point it at the raw "
      f"{reasoning_data.TITLES[name]}."
    )
  return root


@dataclasses.dataclass(frozen=True)
class EvalComponents:
  """What a benchmark evaluation is built from: `components.build_components`'s greedy
  runner, scorer and prompt encoder, without the OK-VOS data."""

  model_cfg: Any  # models.config.ModelConfig
  encoder: episodes_lib.PromptEncoder
  eval_runner: episodes_lib.Runner  # group size 1, temperature 0, evaluation's search
  eval_scorer: scoring.Scorer  # group size 1


def eval_components(config, tokenizer, model_cfg) -> EvalComponents:
  """The greedy runner, scorer and prompt encoder of `components.build_components`, without
  data."""
  shapes = episodes_lib.EpisodeShapes.from_config(config, model_cfg)
  # Evaluation's search backend (`eval.search`), as `components.build_components` picks it.
  eval_config = components_lib.eval_search_config(config)
  backend = components_lib.make_search_backend(eval_config, config.search.kb_dir)
  bridge = components_lib.make_bridge(config, backend, tokenizer, shapes)
  rcfg = rollout.RolloutConfig.from_config(config, shapes, tokenizer, group_size=1, temperature=0.0)
  return EvalComponents(
    model_cfg=model_cfg,
    encoder=episodes_lib.PromptEncoder(tokenizer, model_cfg, shapes),
    eval_runner=episodes_lib.Runner(model_cfg, rcfg, shapes, tokenizer, bridge),
    eval_scorer=scoring.Scorer(config, 1, model_cfg.coord_convention),
  )


def evaluate_benchmark(
  config,
  params,
  components: EvalComponents,
  out_dir: str | os.PathLike,
  *,
  search: bool = True,
  segmenter_fn: Callable | None = None,
) -> dict[str, Any]:
  """Greedy episodes on `config.data.benchmark`, then masks and its table.

  Args:
    config: the run config (`data.benchmark` one of `data.reasoning.BENCHMARKS`,
      `data.<benchmark>_dir`, `data.eval_split`).
    params: the policy's parameters.
    components: `eval_components(...)`.
    out_dir: predictions.jsonl, results.json, masks/, report.html and benchmark/ go here.
    search: False evaluates with search detached.
    segmenter_fn: the video segmenter; default `config.eval`'s.

  Returns:
    The results dict (see `eval.reasoning.score_predictions`) with "episodes": the mean
    reward terms.
  """
  from segresearch_jax.segmentation import video

  root = benchmark_dir(config)
  benchmark, split = config.data.benchmark, config.data.eval_split
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  samples = reasoning.prepare_samples(benchmark, root, split, out / reasoning.BENCHMARK_DIR)
  model_cfg = components.model_cfg
  dataset = pipeline.make_dataset(
    reasoning.PromptSource(samples, config.data.num_frames),
    batch_size=config.batch_size,
    shuffle=False,
    num_epochs=1,
    drop_remainder=False,
    frame_size=config.data.frame_size,
    num_frames=config.data.num_frames,
    convention=model_cfg.coord_convention,
    template_dir=config.data.templates or None,
    encode_fn=components.encoder,
    shard_index=0,
    shard_count=1,
  )
  m, preds = greedy_episodes(
    config, params, dataset, components.eval_runner, components.eval_scorer, search=search
  )
  predictions_lib.write_predictions(out / predictions_lib.PREDICTIONS_FILE, preds)
  if segmenter_fn is None:
    segmenter_fn = functools.partial(video.segment_video, segmenter=video.from_config(config.eval))
  size = config.data.frame_size
  results = reasoning.score_predictions(
    benchmark,
    preds,
    samples,
    segmenter_fn,
    model_cfg.coord_convention,
    out,
    split=split,
    resized=(size, size),
    report_samples=config.eval.report_samples,
  )
  results["episodes"] = m
  (out / "eval_metrics.json").write_text(
    json.dumps({"episodes": m, "table": results["benchmark"]["table"]}, indent=1)
  )
  return results


def run_benchmark(
  config, params, model_cfg, tokenizer, out_dir, *, search: bool = True
) -> dict[str, Any]:
  """`main`'s path for a benchmark config: components, episodes, table, report."""
  benchmark_dir(config)  # A wrong name or folder fails before anything is built.
  components = eval_components(config, tokenizer, model_cfg)
  return evaluate_benchmark(config, params, components, out_dir, search=search)


# ----------------------------------------------------------------------------
# Command line: evaluate a checkpoint.
# ----------------------------------------------------------------------------


def _define_flags() -> None:
  runtime.define_config_flag()
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory of a run.")
  flags.DEFINE_integer("step", None, "Step to evaluate (default: the latest).")
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval_<step>).")
  flags.DEFINE_bool("search", True, "Evaluate with search (--nosearch detaches it).")


def load_checkpoint(directory: str, step: int | None, tokenizer_dir: str = ""):
  """(step, model config, tokenizer, params) of a saved run, params only."""
  step, metadata = checkpoint_lib.read_metadata(directory, step)
  model_cfg = checkpoint_lib.model_config_from_dict(metadata["model_config"])
  tok_meta = metadata.get("tokenizer") or {}
  tokenizer = tokenizer_lib.load_tokenizer(
    tokenizer_dir or (tok_meta.get("dir") if tok_meta.get("kind") == "hf" else None)
  )
  abstract = jax.eval_shape(functools.partial(policy.init_params, model_cfg), jax.random.PRNGKey(0))
  if jax.process_count() > 1:  # Restored by every process (collective), replicated everywhere.
    everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), abstract
    )
  params = checkpoint_lib.restore_params(directory, step, abstract)
  return step, model_cfg, tokenizer, sharding.local_copy(params)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  config = f.config
  if config is None or not f.checkpoint:
    raise app.UsageError("--config and --checkpoint are required.")
  config_checks.validate_config(config, training=False)
  runtime.setup(config)
  step, model_cfg, tokenizer, params = load_checkpoint(
    f.checkpoint, f.step, config.model.tokenizer_dir
  )
  if jax.process_index() != 0:  # Evaluation runs on process 0 (as in `train.train`).
    return
  print(f"evaluating step {step} of {f.checkpoint}", flush=True)
  if config.data.benchmark:  # ReasonSeg / ReasonVOS / ReVOS: their own driver.
    out = f.out or os.path.join(config.workdir, f"eval_{config.data.benchmark}_{step}")
    run_benchmark(config, params, model_cfg, tokenizer, out, search=f.search)
    print(f"results in {out}")
    return
  c = components_lib.build_components(config, tokenizer, model_cfg)
  out = f.out or os.path.join(config.workdir, f"eval_{step}")
  m = evaluate(config, params, c, out, search=f.search)
  print(json.dumps(m, indent=1))
  print(f"results in {out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
