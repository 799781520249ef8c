"""GRPO training throughput on CPU: our jitted update step vs a PyTorch reference step.

    python benchmarks/train_speed.py [--prompts 4] [--group_size 2] [--steps 10]
        [--torch_threads 2] [--embedded_steps 2]

One realistic GRPO batch for the embedded config (`configs/okvos.py` with no
argument): P prompts of the synthetic OK-VOS set x n rows each, every row an expert
episode (search -> keyframe -> answer) run through the real bridge and BM25 search,
random advantages, old log-probs = our current log-probs plus a little noise (so the
clip and the dual clip both fire).

- Ours: the trainer's own step, `steps.make_update` jitted by `steps.jit_update` on
  the config's mesh (state donated), on the rows the training loop hands it
  (`rows.fit_rows`: prompts and responses cut to their used lengths in quarter-length
  buckets, only the images the rows used, the LM head at the generated tokens only;
  the shown frames encoded once per group); it also computes the per-token entropy
  metric.
- Reference: the transformers model with the same weights (exported through our
  safetensors writer) on the same sequences and images (the prompt + response of
  each row, right-padded; the shown frames and the keyframe / search images that the
  row's observations contain), the same loss (PPO clip 0.2 / 0.2, dual clip 3,
  log-ratio clamp 20, token-mean over generated tokens, temperature 1, banned ids'
  logits at -inf), backward, `clip_grad_norm_(1.0)` and `torch.optim.AdamW` with the
  same hyper-parameters and warmup.

Both losses are printed for the first step: same weights, same sequences, same loss,
so they must agree to ~1e-5, which keeps the speed comparison honest. Tokens/s
counts the real tokens of the sequences (valid prompt tokens + valid response tokens,
observations and images included, padding excluded), the same number on both sides.
`--embedded_steps N` also runs the embedded trainer for N supervised + N GRPO steps
in a subprocess and reports its peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

# torch before anything that may pull in TensorFlow (the import order can segfault).
import torch  # isort: skip

import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax import components, protocol, sharding, warm_start
from segresearch_jax import steps as steps_lib
from segresearch_jax.agent import episodes, rollout
from segresearch_jax.data import synthetic
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import tokenizer as tokenizer_lib
from segresearch_jax.models import weights
from segresearch_jax.rl import rows as rows_lib

_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
  lambda name, *a, **k: (
    _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
  )
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# The batch: expert episodes of the synthetic set.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class World:
  """Everything one benchmark batch is built from (the trainer's own setup pieces)."""

  config: Any
  tokenizer: Any
  model_cfg: config_lib.ModelConfig
  params: Any
  shapes: episodes.EpisodeShapes
  rcfg: rollout.RolloutConfig
  samples: list[dict[str, Any]]
  bridge: Any


def build_world(config: Any, data_dir: str, num_samples: int) -> World:
  """The policy, shapes and the first `num_samples` encoded training samples of a config.

  Builds a synthetic OK-VOS set (with its knowledge base) under `data_dir`; search
  is the config's backend over that knowledge base, through the real bridge.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  paths = synthetic.build(data_dir, seed=config.seed, num_train=max(8, 2 * num_samples), num_test=2)
  tok = tokenizer_lib.load_tokenizer(config.model.tokenizer_dir or None)
  model_cfg, params = components.build_policy(config, tok)
  shapes = episodes.EpisodeShapes.from_config(config, model_cfg)
  encoder = episodes.PromptEncoder(tok, model_cfg, shapes)
  backend = components.make_search_backend(config, paths.kb_dir)
  bridge = components.make_bridge(config, backend, tok, shapes)
  dataset, _ = components.make_dataset(
    config, paths.okvos_dir, config.data.train_split, encoder, train=False, batch_size=1
  )
  samples = []
  for batch in dataset:
    samples.append({k: v[0] for k, v in batch.items()})
    if len(samples) == 2 * num_samples:  # spares for episodes that do not fit
      break
  rcfg = rollout.RolloutConfig.from_config(config, shapes, tok)
  return World(config, tok, model_cfg, params, shapes, rcfg, samples, bridge)


def expert_rows(world: World, num_prompts: int, group_size: int) -> rows_lib.TrainingRows:
  """Rows of expert episodes, row-major ([B, ...], B = P x n) as the trainer lays them out.

  The warm start's rows (`warm_start.expert_rows`: search -> keyframe -> answer,
  observations from the real bridge; samples whose episode does not fit the rollout
  limits are skipped), the first P of them, each repeated for its n rows.
  """
  if num_prompts < 1 or group_size < 1:
    raise ValueError(f"Need prompts >= 1 and group_size >= 1, got {num_prompts}, {group_size}.")
  runner = episodes.Runner(world.model_cfg, world.rcfg, world.shapes, world.tokenizer, world.bridge)
  dataset = [{k: np.asarray(v)[None] for k, v in sample.items()} for sample in world.samples]
  rows = warm_start.expert_rows(world.config, dataset, runner, world.model_cfg, world.shapes)
  found = len(rows)
  if found < num_prompts:
    raise RuntimeError(
      f"Only {found} of {num_prompts} expert episodes fit the rollout limits; "
      "raise rollout.max_response_length or lower --prompts."
    )
  return jax.tree.map(lambda v: np.repeat(v[:num_prompts], group_size, axis=0), rows)


def current_logprobs(world: World, rows: rows_lib.TrainingRows) -> np.ndarray:
  """[B, R] log-probs of the response tokens under the current weights (the trainer's fn)."""
  logprob_fn = jax.jit(steps_lib.make_logprob_fn(world.model_cfg, world.rcfg))
  return np.asarray(logprob_fn(world.params, rows)[0])


def with_grpo_fields(
  rows: rows_lib.TrainingRows, logp: np.ndarray, seed: int = 0, noise: float = 0.1
) -> rows_lib.TrainingRows:
  """Adds `advantages` ~ N(0, 1) [B] and `old_logprobs` = logp + N(0, noise) on generated
  tokens (0 elsewhere): ratios away from 1, so the clip and the dual clip both fire."""
  rng = np.random.default_rng(seed)
  advantages = rng.standard_normal(len(logp)).astype(np.float32)
  jitter = noise * rng.standard_normal(logp.shape).astype(np.float32)
  old_logprobs = np.where(rows.loss_mask, logp + jitter, 0.0).astype(np.float32)
  return rows.replace(advantages=advantages, old_logprobs=old_logprobs)


def expert_batch(
  world: World, num_prompts: int, group_size: int, seed: int = 0, noise: float = 0.1
) -> rows_lib.TrainingRows:
  """One GRPO update batch: `expert_rows` with advantages and old log-probs."""
  rows = expert_rows(world, num_prompts, group_size)
  return with_grpo_fields(rows, current_logprobs(world, rows), seed, noise)


def real_tokens(rows: rows_lib.TrainingRows) -> int:
  """Valid prompt + response tokens over all rows (what tokens/s counts on both sides)."""
  return int(rows.prompt_valid.sum() + rows.response_valid.sum())


# ----------------------------------------------------------------------------
# The PyTorch reference.
# ----------------------------------------------------------------------------


def hf_inputs(
  rows: rows_lib.TrainingRows, world: World
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
  """The batch in transformers' layout, and what the loss needs.

  Every row is its valid prompt tokens followed by its valid response tokens,
  right-padded to the longest row. Images per row in sequence order: the shown
  frames, then each observation's keyframe (high-res copy of the chosen frame) or
  search result; pixel values are our patches (HF layout) concatenated over rows.

  Returns:
    (model kwargs, loss inputs: `select` [B, L-1] bool of logit positions that
    predict a generated token, `targets`, `old_logprobs`, `advantages` (per selected
    token, in the same order)).
  """
  s, cfg = world.shapes, world.model_cfg
  image_id = cfg.image_token_id
  grid_of = {
    "frame": s.patch_grid(s.frame_size),
    "keyframe": s.patch_grid(s.keyframe_size),
    "search": s.patch_grid(s.search_size),
  }
  frame_tokens = s.tokens(s.frame_size)
  seqs, masks, pixels, grids = [], [], [], []
  old, adv = [], []
  for r in range(len(rows)):
    prompt = rows.prompt_ids[r][rows.prompt_valid[r]]
    image_tokens = int(np.sum(prompt == image_id))
    if image_tokens % frame_tokens:
      raise ValueError(f"Row {r}: {image_tokens} prompt image tokens are not whole frames.")
    valid = rows.response_valid[r]
    trains = rows.loss_mask[r][valid]
    seqs.append(np.concatenate([prompt, rows.response_ids[r][valid]]))
    masks.append(np.concatenate([np.zeros(len(prompt), bool), trains]))  # prompts never train
    old.append(rows.old_logprobs[r][valid][trains])
    adv.append(np.full(int(trains.sum()), rows.advantages[r], np.float32))
    for f in range(image_tokens // frame_tokens):
      pixels.append(rows.frame_patches[r, f])
      grids.append(grid_of["frame"])
    for t, kind in enumerate(rows.obs_kind[r]):
      if kind == protocol.KEYFRAME_IMAGE:
        pixels.append(rows.keyframe_patches[r, rows.obs_image[r, t]])
        grids.append(grid_of["keyframe"])
      elif kind == protocol.SEARCH_IMAGE:
        pixels.append(rows.search_patches[r, rows.obs_image[r, t]])
        grids.append(grid_of["search"])
  width = max(map(len, seqs))
  pad_id = world.tokenizer.pad_id
  ids = np.stack([np.pad(x, (0, width - len(x)), constant_values=pad_id) for x in seqs])
  attention = np.stack([np.arange(width) < len(x) for x in seqs])
  loss_mask = np.stack([np.pad(m, (0, width - len(m))) for m in masks])
  merge = cfg.vision.spatial_merge_size
  expected = sum(h * w // merge**2 for h, w in grids)
  if expected != int(np.sum(ids == image_id)):
    raise ValueError(f"{int(np.sum(ids == image_id))} image tokens but {expected} image features.")
  model_kwargs = {
    "input_ids": torch.from_numpy(ids.astype(np.int64)),
    "attention_mask": torch.from_numpy(attention.astype(np.int64)),
    "pixel_values": torch.from_numpy(np.concatenate(pixels).astype(np.float32)),
    "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]),
    "mm_token_type_ids": torch.from_numpy((ids == image_id).astype(np.int64)),
  }
  loss_inputs = {
    "select": torch.from_numpy(loss_mask[:, 1:]),  # logits at t predict token t + 1
    "targets": torch.from_numpy(ids[:, 1:][loss_mask[:, 1:]].astype(np.int64)),
    "old_logprobs": torch.from_numpy(np.concatenate(old)),
    "advantages": torch.from_numpy(np.concatenate(adv)),
  }
  return model_kwargs, loss_inputs


def load_hf_model(params: Any, model_cfg: config_lib.ModelConfig) -> torch.nn.Module:
  """The transformers model of `model_cfg` holding exactly `params` (through our exporter)."""
  import transformers

  with tempfile.TemporaryDirectory() as tmp:
    weights.save_hf_checkpoint(params, model_cfg, tmp)
    cls = getattr(transformers, config_lib.to_hf_config(model_cfg)["architectures"][0])
    model = cls.from_pretrained(tmp, dtype=torch.float32)
  return model.train()


def reference_logprobs(
  model: torch.nn.Module,
  model_kwargs: Mapping[str, torch.Tensor],
  loss_inputs: Mapping[str, torch.Tensor],
  banned_ids: tuple[int, ...],
  temperature: float = 1.0,
) -> torch.Tensor:
  """[T] log-probs of the generated tokens, as the sampler defines them (docs/method.md §6)."""
  logits = model(**model_kwargs).logits[:, :-1]  # [B, L-1, V]
  logits = logits[loss_inputs["select"]].float()  # [T, V]: only positions that train
  if banned_ids:  # never sampled, so never in the normaliser (the sampler's -inf)
    logits = logits.index_fill(-1, torch.tensor(banned_ids), float("-inf"))
  logp = torch.log_softmax(logits / temperature, dim=-1)
  return logp.gather(-1, loss_inputs["targets"][:, None])[:, 0]


def reference_loss(
  logp: torch.Tensor, loss_inputs: Mapping[str, torch.Tensor], loss_cfg: Any
) -> torch.Tensor:
  """`losses.grpo_loss` with token-mean aggregation, in PyTorch, over [T] generated tokens."""
  adv = loss_inputs["advantages"]
  c = loss_cfg.log_ratio_clamp
  ratio = torch.exp(torch.clamp(logp - loss_inputs["old_logprobs"], -c, c))
  unclipped = -adv * ratio
  clipped = -adv * torch.clamp(ratio, 1.0 - loss_cfg.clip_low, 1.0 + loss_cfg.clip_high)
  loss = torch.maximum(unclipped, clipped)
  if loss_cfg.dual_clip > 0:
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * loss_cfg.dual_clip), loss)
  return loss.mean()  # token-mean over the generated tokens of the whole batch


def make_reference_step(
  model: torch.nn.Module,
  config: Any,
  loss_cfg: Any,
  banned_ids: tuple[int, ...],
  temperature: float,
) -> Any:
  """`step(model_kwargs, loss_inputs) -> loss`: forward, backward, clip, AdamW (with warmup)."""
  o = config.optim
  optimizer = torch.optim.AdamW(
    model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
  )
  # Our schedule: lr * min(1, (step + 1) / warmup) from the first update on.
  warmup = max(o.warmup_steps, 1)
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

  def step(model_kwargs, loss_inputs) -> float:
    optimizer.zero_grad(set_to_none=True)
    logp = reference_logprobs(model, model_kwargs, loss_inputs, banned_ids, temperature)
    loss = reference_loss(logp, loss_inputs, loss_cfg)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())

  return step


# ----------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class StepTimes:
  losses: list[float]  # first (warm-up) step, then each timed step
  times: list[float]  # wall seconds of each timed step
  first_seconds: float  # the warm-up step (our compilation included)
  warmup_compiles: int = 0
  later_compiles: int = 0

  @property
  def median(self) -> float:
    return float(np.median(self.times))

  @property
  def mean(self) -> float:
    return float(np.mean(self.times))


def ours_step_fn(world: World, rows: rows_lib.TrainingRows) -> Callable[[], float]:
  """The trainer's update as the trainer jits it; each call runs one step, returns its loss."""
  config = world.config
  mesh = sharding.make_mesh(config.mesh)
  optimizer, update_fn = steps_lib.make_update(config, world.model_cfg, world.rcfg)
  # A copy of the weights: the state is donated and the reference starts from them too.
  params = jax.tree.map(jnp.array, world.params)
  state, state_sharding = steps_lib.sharded_state(params, optimizer, mesh, config)
  update_fn = steps_lib.jit_update(update_fn, mesh, state_sharding)
  batch = sharding.shard_batch(rows_lib.fit_rows(rows)[0], mesh)  # as the training loop
  rng = jax.random.PRNGKey(0)

  def step() -> float:
    nonlocal state
    state, m = update_fn(state, batch, rng)
    return float(m["loss"])  # float() waits for the step

  return step


def reference_step_fn(world: World, rows: rows_lib.TrainingRows) -> Callable[[], float]:
  """The PyTorch reference step; each call runs one step, returns its loss."""
  loss_cfg = world.config.loss
  if loss_cfg.aggregation != "token-mean" or loss_cfg.kl_coef or loss_cfg.entropy_coef:
    raise ValueError("The reference implements token-mean PPO-clip without KL or entropy terms.")
  model = load_hf_model(world.params, world.model_cfg)
  model_kwargs, loss_inputs = hf_inputs(rows, world)
  temperature = world.rcfg.temperature if world.rcfg.temperature > 0 else 1.0
  step = make_reference_step(model, world.config, loss_cfg, world.rcfg.banned_ids, temperature)
  return lambda: step(model_kwargs, loss_inputs)


def time_interleaved(
  ours_step: Callable[[], float], ref_step: Callable[[], float], steps: int
) -> tuple[StepTimes, StepTimes]:
  """One warm-up step each, then `steps` timed steps of each side, alternating.

  Alternating the two sides step by step puts both under the same background load at
  the same moments, so a load change on a shared machine moves both sides together
  instead of one; the tables report the median step.
  """
  n0 = len(_COMPILES)
  t0 = time.perf_counter()
  ours = StepTimes([ours_step()], [], time.perf_counter() - t0)
  ours.warmup_compiles = len(_COMPILES) - n0
  t0 = time.perf_counter()
  ref = StepTimes([ref_step()], [], time.perf_counter() - t0)
  n0 = len(_COMPILES)
  for _ in range(steps):
    for side, fn in ((ours, ours_step), (ref, ref_step)):
      t0 = time.perf_counter()
      side.losses.append(fn())
      side.times.append(time.perf_counter() - t0)
  ours.later_compiles = len(_COMPILES) - n0
  return ours, ref


def run_embedded(steps: int, workdir: str, timeout_s: float = 3600.0) -> tuple[float, float]:
  """Runs the embedded trainer for `steps` SFT + GRPO steps; (peak RSS MiB, wall seconds)."""
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.train",
    "--config=configs/okvos.py",
    f"--config.total_steps={steps}",
    f"--config.sft.steps={steps}",
    "--config.eval.num_samples=4",
    f"--config.workdir={workdir}",
  ]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"The embedded run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  # ru_maxrss is KiB on Linux: the largest child waited for, i.e. this run.
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, wall


def load_config(arg: str | None = None) -> Any:
  """`configs/okvos.py`'s `get_config(arg)`, found from this file (the script runs from anywhere)."""
  spec = importlib.util.spec_from_file_location(
    "okvos_config", os.path.join(REPO_ROOT, "configs", "okvos.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def benchmark_config(args: argparse.Namespace) -> Any:
  """The embedded config with the benchmark's group size and batch (one update per step)."""
  config = load_config()
  config.rollout.group_size = args.group_size
  config.batch_size = args.prompts
  config.loss.mini_batches = 1
  config.model.preset = args.preset
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="embedded", help="model preset of the policy")
  parser.add_argument("--prompts", type=int, default=4, help="P, prompts in the batch")
  parser.add_argument("--group_size", type=int, default=2, help="n, rows per prompt")
  parser.add_argument("--steps", type=int, default=10, help="K, timed steps a side after a warm-up")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--embedded_steps", type=int, default=0, help="0 = skip the embedded run")
  args = parser.parse_args()
  if min(args.prompts, args.group_size, args.steps) < 1:
    parser.error("--prompts, --group_size and --steps must be >= 1")
  torch.set_num_threads(args.torch_threads)

  config = benchmark_config(args)
  with tempfile.TemporaryDirectory() as tmp:
    config.workdir = os.path.join(tmp, "run")
    t0 = time.perf_counter()
    world = build_world(config, os.path.join(tmp, "synthetic"), args.prompts)
    rows = expert_batch(world, args.prompts, args.group_size)
    tokens = real_tokens(rows)
    generated = int(rows.loss_mask.sum())
    b_rows, r = rows.loss_mask.shape
    lp = rows.prompt_ids.shape[1]
    print(
      f"batch: {args.prompts} prompts x {args.group_size} rows of expert episodes "
      f"({time.perf_counter() - t0:.1f}s to build); {tokens} real tokens "
      f"({generated} generated), padded to {b_rows} x {lp + r} on our side; preset {args.preset}, "
      f"{sum(x.size for x in jax.tree.leaves(world.params)) / 1e6:.2f}M params; "
      f"jax {jax.devices()[0].platform}, torch {torch.get_num_threads()} threads",
      flush=True,
    )
    ours, ref = time_interleaved(
      ours_step_fn(world, rows), reference_step_fn(world, rows), args.steps
    )
    delta = abs(ours.losses[0] - ref.losses[0])
    print(
      f"first-step loss: ours {ours.losses[0]:+.7f}, reference {ref.losses[0]:+.7f}, "
      f"|dloss| {delta:.2e}; after one update: ours {ours.losses[1]:+.7f}, "
      f"reference {ref.losses[1]:+.7f}",
      flush=True,
    )
    rss = wall = None
    if args.embedded_steps:
      rss, wall = run_embedded(args.embedded_steps, os.path.join(tmp, "embedded"))

  ours_tps = tokens / ours.median
  ref_tps = tokens / ref.median
  table = [
    (
      "train tokens/s (real tokens)",
      f"{ours_tps:.1f}",
      f"{ref_tps:.1f}",
      ours_tps / ref_tps,
      ">= 1.0x",
    ),
    (
      f"step s (median of {args.steps})",
      f"{ours.median:.3f}",
      f"{ref.median:.3f}",
      ref.median / ours.median,
      "",
    ),
    (
      f"step s (mean of {args.steps})",
      f"{ours.mean:.3f}",
      f"{ref.mean:.3f}",
      ref.mean / ours.mean,
      "",
    ),
    (
      "first step s (compile incl.)",
      f"{ours.first_seconds:.1f}",
      f"{ref.first_seconds:.1f}",
      None,
      "",
    ),
    (
      "compilations: first step / later",
      f"{ours.warmup_compiles} / {ours.later_compiles}",
      "-",
      None,
      "- / 0",
    ),
    ("|loss ours - reference| step 1", f"{delta:.1e}", "-", None, "~1e-5"),
  ]
  if rss is not None:
    n = args.embedded_steps
    table.append((f"embedded run peak RSS MiB ({n}+{n} st)", f"{rss:.0f}", "-", None, ""))
    table.append(("embedded run wall s", f"{wall:.1f}", "-", None, ""))
  print(f"\n{'metric':<38}{'ours (jax)':>12}{'reference':>12}{'ratio':>9}{'goal':>10}")
  for metric, ours_v, ref_v, ratio, goal in table:
    r = f"{ratio:.2f}x" if ratio is not None else "-"
    print(f"{metric:<38}{ours_v:>12}{ref_v:>12}{r:>9}{goal:>10}")
  print(
    f"tokens = valid prompt + response tokens of all {b_rows} rows (image tokens included, "
    "padding excluded), the same count on both sides; ratio = ours / reference speed; "
    "reference = transformers eager + torch.optim.AdamW; the two sides' steps alternate, "
    "tokens/s from the median step"
  )


if __name__ == "__main__":
  main()
