r"""One real GRPO update step on the machine's accelerators (GPU or TPU VM; CPU for a smoke run).

    python benchmarks/update_step_accel.py --config=configs/okvos.py:paper \
        --config.model.hf_dir= --config.model.require_hf_dir=False

Random weights of the config's preset (Qwen3-VL-4B for `:paper`), its compute dtype,
remat, scan and attention settings, the paper's lengths, and the trainer's own update
function (`steps.make_update` jitted as `steps.jit_update`) on a random batch of
`--rows` trajectories (default: the config's update batch). Prints step time, tokens
per second, MFU (model FLOPs from XLA's cost analysis over the chips' peak) and peak
memory per device. A smoke run on CPU:

    python benchmarks/update_step_accel.py --config=configs/okvos.py \
        --config.model.preset=tiny --rows=4
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from segresearch_jax import components, sharding, steps
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy
from segresearch_jax.rl import rows as rows_lib
from segresearch_jax.rl import update as update_lib
from segresearch_jax.tools import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_ROWS = flags.DEFINE_integer("rows", 0, "Trajectories per update (0: the config's update batch).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.")
# Dense bf16 peak per chip, for MFU; unknown kinds report MFU as n/a.
PEAK_FLOPS = {"TPU v5": 459e12, "TPU v4": 275e12, "NVIDIA H200": 989e12, "NVIDIA H100": 989e12}


def random_batch(
  abstract: rows_lib.TrainingRows, model_cfg: config_lib.ModelConfig, seed: int = 0
) -> rows_lib.TrainingRows:
  """Random rows of the update batch's shapes: valid tokens everywhere, every token trained."""
  rng = np.random.default_rng(seed)
  out = {}
  for field in dataclasses.fields(abstract):
    k, x = field.name, getattr(abstract, field.name)
    if x is None:
      continue
    if x.dtype == bool:
      out[k] = np.ones(x.shape, bool)
    elif k == "token_index":
      out[k] = np.broadcast_to(np.arange(x.shape[1], dtype=np.int32), x.shape).copy()
    elif jnp.issubdtype(x.dtype, jnp.integer):
      high = model_cfg.text.vocab_size // 2 if k.endswith("_ids") else 2
      out[k] = rng.integers(0, high, x.shape).astype(x.dtype)
    else:
      out[k] = rng.standard_normal(x.shape).astype(x.dtype) * (0.1 if "logprobs" in k else 1.0)
  out["old_logprobs"] = -np.abs(out["old_logprobs"]) - 5.0
  return rows_lib.TrainingRows(**out)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  model_cfg = config_lib.with_compute(components.plan_model_config(config), config.model)
  rcfg, shapes = aot.rollout_config(config, model_cfg)
  mesh = sharding.make_mesh(config.mesh)
  rows = _ROWS.value or config.batch_size * config.rollout.group_size // config.loss.mini_batches
  sharding.check_batch_divisible(rows, mesh, "benchmark batch", config.loss.micro_batches)
  optimizer, update_fn = steps.make_update(config, model_cfg, rcfg)
  init_fn = lambda rng: update_lib.init_state(policy.init_params(model_cfg, rng), optimizer)
  abstract_params = jax.eval_shape(lambda: policy.init_params(model_cfg, jax.random.PRNGKey(0)))
  rules = sharding.rules_from_config(config.mesh)
  param_sharding = sharding.param_shardings(abstract_params, rules, mesh)
  state_sharding = sharding.state_shardings(
    jax.eval_shape(init_fn, jax.random.PRNGKey(0)), param_sharding
  )
  state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
  batch = random_batch(aot.batch_shapes(config, shapes, rows), model_cfg)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  step = steps.jit_update(update_fn, mesh, state_sharding)
  rng = jax.random.PRNGKey(0)
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch, rng).compile()
    state, metrics = compiled(state, batch, rng)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / _STEPS.value
  tokens = rows * (config.rollout.max_prompt_length + config.rollout.max_response_length)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  flops = float((cost or {}).get("flops", float("nan")))  # per device
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get("peak_bytes_in_use")
  print(f"| device | {jax.device_count()} x {kind} |")
  print(
    f"| model | {config.model.preset} {model_cfg.dtype} remat={model_cfg.remat} "
    f"scan={model_cfg.scan_layers} attention={model_cfg.attention} |"
  )
  print(f"| rows x tokens | {rows} x {tokens // rows} |")
  print(f"| step time | {seconds:.3f} s |")
  print(f"| tokens/s | {tokens / seconds:,.0f} |")
  mfu = "n/a" if peak is None else f"{100 * flops / seconds / peak:.1f}%"
  print(f"| MFU | {mfu} |")
  peak_text = "n/a" if peak_bytes is None else f"{peak_bytes / aot.GIB:.2f} GiB"
  print(f"| peak memory / device | {peak_text} |")
  print(f"| loss | {float(metrics['loss']):.4f} |")


if __name__ == "__main__":
  app.run(main)
