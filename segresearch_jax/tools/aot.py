r"""Compiles the real GRPO update and rollout ahead of time for a TPU topology, on a CPU.

    python -m segresearch_jax.tools.aot --config=configs/okvos.py:paper --target=v5p-64

XLA's TPU compiler (libtpu: `pip install -e ".[tpu]"`) compiles the trainer's own
update function (`steps.make_update`, jitted as `steps.jit_update` does) for the
devices of a TPU slice that need not exist (`jax.experimental.topologies`, as
maxtext's `train_compile.py`), from abstract arrays laid out by the run's mesh and
partition rules. It prints XLA's per-chip memory analysis, the FLOPs of the cost
analysis and the memory plan's estimate (`sharding.plan`) of the same program, and
exits 1 when a program does not fit in 90% of a chip's HBM. The rollout program
(`compile_rollout`: one host's share of the rows on its own chips, bf16 KV cache of
`rollout.max_episode_tokens` slots a row) is compiled the same way. The last lines,
one per program and then both together, are what scripts read:

    update: 61.2 GiB of 95.7 GiB per chip (64%) fits
    rollout: 20.1 GiB of 95.7 GiB per chip (21%) fits
    rollout + resident training state: 22.0 GiB of 95.7 GiB per chip (23%) fits (...)

The rollout runs while the training state (parameters and AdamW moments, sharded)
stays in HBM; its KV cache and its gathered parameter copy exist only while it runs,
so the update gets that memory back (as verl frees vLLM's cache for training).
`--programs=rollout` compiles one of them only.

Any `--config.*` override works, e.g. `--config.model.remat=full` or
`--config.loss.micro_batches=2`. `model.attention=auto` compiles the TPU kernel
(splash attention).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from segresearch_jax import components, sharding
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy
from segresearch_jax.rl import rows as rows_lib

GIB = sharding.GIB
FIT_FRACTION = sharding.FIT_FRACTION
Target = sharding.Target
TARGETS = sharding.TPU_TARGETS

_FLAGS = {}


def target_devices(target: Target) -> list[Any]:
  """The devices of a TPU topology that need not exist (needs libtpu)."""
  from jax.experimental import topologies

  # libtpu takes a machine-wide lock file on load; other JAX processes on this machine
  # (tests, a trainer on CPU) hold it and no TPU is used here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

  kwargs = {} if target.chip_config == "default" else {"chip_config_name": target.chip_config}
  return list(topologies.get_topology_desc(target.topology, "tpu", **kwargs).devices)


def model_config(config: Any) -> config_lib.ModelConfig:
  """The run's model as the trainer builds it (preset or HF config.json shapes),
  computing as `config.model` asks, with `auto` attention resolved for TPU."""
  from segresearch_jax import components

  model_cfg = config_lib.with_compute(components.plan_model_config(config), config.model)
  if model_cfg.attention == "auto":
    model_cfg = dataclasses.replace(model_cfg, attention="splash")
  return model_cfg


def rollout_config(config: Any, model_cfg: config_lib.ModelConfig):
  """The trainer's `RolloutConfig` without a tokenizer: the model's own special ids."""
  from segresearch_jax.agent import episodes, rollout

  tokens = types.SimpleNamespace(
    im_end_id=151645,
    image_pad_id=model_cfg.image_token_id,
    vision_start_id=model_cfg.vision_start_token_id,
    vision_end_id=model_cfg.vision_end_token_id,
  )
  shapes = episodes.EpisodeShapes.from_config(config, model_cfg)
  return rollout.RolloutConfig.from_config(config, shapes, tokens), shapes


def batch_shapes(config: Any, shapes: Any, rows: int) -> rows_lib.TrainingRows:
  """The update batch of `rows` trajectories (`rl.rows.training_rows` + advantages and
  the widest `token_index`), as abstract arrays (`jax.ShapeDtypeStruct`)."""
  r = config.rollout
  lp, lr, turns = r.max_prompt_length, r.max_response_length, r.max_turns
  frames, pd = config.data.num_frames, shapes.patch_dim
  pf, pk = shapes.num_patches(shapes.frame_size), shapes.num_patches(shapes.keyframe_size)
  ps = shapes.num_patches(shapes.search_size)
  i32, f32 = jnp.int32, jnp.float32
  spec = {
    "prompt_ids": ((rows, lp), i32),
    "prompt_valid": ((rows, lp), bool),
    "prompt_positions": ((rows, 3, lp), i32),
    "frame_patches": ((rows, frames, pf, pd), f32),
    # `rows.fit_rows` keeps the images a batch used: at most one a turn of each kind.
    "keyframe_patches": ((rows, turns, pk, pd), f32),
    "response_ids": ((rows, lr), i32),
    "response_positions": ((rows, 3, lr), i32),
    "response_valid": ((rows, lr), bool),
    "obs_kind": ((rows, turns), i32),
    "obs_image": ((rows, turns), i32),
    "search_patches": ((rows, turns, ps, pd), f32),
    "loss_mask": ((rows, lr), bool),
    "old_logprobs": ((rows, lr), f32),
    "advantages": ((rows,), f32),
    "token_index": ((rows, lr), i32),
  }
  return rows_lib.TrainingRows(**{k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()})


@dataclasses.dataclass(frozen=True)
class Report:
  """One compiled program's per-chip memory (bytes) and work."""

  name: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  flops: float
  hbm_bytes: int
  plan_bytes: int | None
  # Set when XLA refused to compile the program for lack of HBM (its message): the
  # temporaries are then the figure XLA named and the total a lower bound.
  refused: str = ""

  @property
  def total(self) -> int:
    """Peak bytes per chip: arguments + outputs not aliased to (donated) arguments +
    temporaries + code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @property
  def fits(self) -> bool:
    return not self.refused and self.total <= FIT_FRACTION * self.hbm_bytes

  def table(self) -> str:
    g = lambda n: f"{n / GIB:8.2f} GiB"
    if self.refused:
      lines = [
        f"{self.name} per chip: XLA refused to compile it ({self.refused})",
        f"  arguments    {g(self.arguments)}  (the sharded inputs)",
        f"  temporaries  {g(self.temporaries)}  (as XLA reported them)",
        f"  total       >{g(self.total)}  of {g(self.hbm_bytes).strip()} HBM",
      ]
      if self.plan_bytes is not None:
        lines.append(f"  tools.plan   {g(self.plan_bytes)}")
      return "\n".join(lines)
    lines = [
      f"{self.name} per chip (XLA memory analysis):",
      f"  arguments    {g(self.arguments)}",
      f"  outputs      {g(self.outputs)}  ({g(self.aliased).strip()} aliased to donated inputs)",
      f"  temporaries  {g(self.temporaries)}",
      f"  code         {g(self.code)}",
      f"  total        {g(self.total)}  of {g(self.hbm_bytes).strip()} HBM",
      f"  FLOPs        {self.flops:.3e} per chip",
    ]
    if self.plan_bytes is not None:
      ratio = self.plan_bytes / max(self.total, 1)
      lines.append(f"  tools.plan   {g(self.plan_bytes)}  ({ratio:.2f}x the compiler's total)")
    return "\n".join(lines)

  def verdict(self) -> str:
    share = 100 * self.total / self.hbm_bytes
    return (
      f"{self.name}: {self.total / GIB:.1f} GiB of {self.hbm_bytes / GIB:.1f} GiB per chip "
      f"({share:.0f}%) {'fits' if self.fits else 'does not fit'}"
    )


class OutOfMemory(Exception):
  """XLA refused to compile a program for a target: it needs more HBM than a chip has."""

  def __init__(self, message: str, argument_bytes: int):
    super().__init__(message)
    self.message = message
    self.argument_bytes = argument_bytes

  def temporaries(self) -> int:
    """The bytes XLA named (its temporaries or its total use); 0 when it named none."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for pattern in (
      r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)",
      r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm",
    ):
      match = re.search(pattern, self.message)
      if match:
        return int(float(match.group(1)) * units[match.group(2)])
    return 0

  def summary(self) -> str:
    """XLA's first line, without the status prefix."""
    line = self.message.strip().splitlines()[0] if self.message.strip() else "out of memory"
    return line.split("RESOURCE_EXHAUSTED: ")[-1][:240]


def _out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def _sharded_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded abstract arrays."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


def _refused_report(
  name: str, error: OutOfMemory, hbm_bytes: int, plan_bytes: int | None
) -> Report:
  return Report(
    name=name,
    arguments=error.argument_bytes,
    outputs=0,
    aliased=0,
    temporaries=error.temporaries(),
    code=0,
    flops=float("nan"),
    hbm_bytes=hbm_bytes,
    plan_bytes=plan_bytes,
    refused=error.summary(),
  )


def _report(name: str, compiled: Any, hbm_bytes: int, plan_bytes: int | None) -> Report:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return Report(
    name=name,
    arguments=int(memory.argument_size_in_bytes),
    outputs=int(memory.output_size_in_bytes),
    aliased=int(memory.alias_size_in_bytes),
    temporaries=int(memory.temp_size_in_bytes),
    code=int(memory.generated_code_size_in_bytes),
    flops=float((cost or {}).get("flops", float("nan"))),
    hbm_bytes=hbm_bytes,
    plan_bytes=plan_bytes,
  )


def compile_update(config: Any, devices: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles the trainer's update step for `devices` from abstract arrays.

  Returns:
    (the compiled program, or None when XLA refused it for lack of HBM; facts about
    it: mesh sizes, rows, model config, the refusal (an `OutOfMemory`) or None).
  """
  from segresearch_jax import steps
  from segresearch_jax.rl import update as update_lib

  model_cfg = model_config(config)
  rcfg, shapes = rollout_config(config, model_cfg)
  mesh = sharding.make_mesh(config.mesh, devices)
  rows = config.batch_size * config.rollout.group_size // config.loss.mini_batches
  sharding.check_batch_divisible(rows, mesh, "update batch", config.loss.micro_batches)
  optimizer, update_fn = steps.make_update(
    config, model_cfg, rcfg, row_devices=mesh.shape["data"] * mesh.shape["fsdp"]
  )

  rules = sharding.rules_from_config(config.mesh)
  abstract_params = jax.eval_shape(lambda: policy.init_params(model_cfg, jax.random.PRNGKey(0)))
  param_sharding = sharding.param_shardings(abstract_params, rules, mesh)
  abstract_state = jax.eval_shape(lambda p: update_lib.init_state(p, optimizer), abstract_params)
  state_sharding = sharding.state_shardings(abstract_state, param_sharding)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  state = jax.tree.map(with_sharding, abstract_state, state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(
    lambda x: with_sharding(x, batch_sharding), batch_shapes(config, shapes, rows)
  )
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
  jitted = steps.jit_update(update_fn, mesh, state_sharding)
  # The splash kernel runs under shard_map over the mesh in context.
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = jitted.lower(state, batch, rng)
    lowered_s = time.perf_counter() - start
    refused = None
    try:
      compiled = lowered.compile()
    except Exception as e:  # XLA's error type differs between jax versions
      if not _out_of_memory(e):
        raise
      compiled, refused = None, OutOfMemory(str(e), _sharded_bytes((state, batch)))
  facts = {
    "refused": refused,
    "state_bytes": _sharded_bytes(state),
    "mesh": dict(mesh.shape),
    "rows": rows,
    "model_cfg": model_cfg,
    "shapes": shapes,
    "seconds": (lowered_s, time.perf_counter() - start - lowered_s),
  }
  return compiled, facts


def compile_rollout(config: Any, devices: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles the trainer's rollout program for one host of `devices`.

  Each host of the slice rolls out its share of the step's prompts on its own chips
  (`sharding.rollout_mesh`: rows over them, KV heads over `tensor`) with the
  parameters regathered from the training layout (`sharding.rollout_params`); the
  program is the same on every host, so host 0's is compiled. The host callback
  (search, tokenisation) is compiled in and never called.

  Returns:
    (the compiled program, or None when XLA refused it for lack of HBM; facts: mesh
    sizes, hosts, prompts and rows per host, cache slots a row, the refusal or None).
  """
  from segresearch_jax.agent import rollout

  model_cfg = model_config(config)
  rcfg, shapes = rollout_config(config, model_cfg)
  train_mesh = sharding.make_mesh(config.mesh, devices)
  mesh = sharding.rollout_mesh(train_mesh)
  hosts = len({d.process_index for d in devices})
  if config.batch_size % hosts:
    raise ValueError(f"batch_size={config.batch_size} prompts do not split over {hosts} hosts.")
  prompts = config.batch_size // hosts
  r = config.rollout
  lp, frames, pd = r.max_prompt_length, config.data.num_frames, shapes.patch_dim
  pf, pk = shapes.num_patches(shapes.frame_size), shapes.num_patches(shapes.keyframe_size)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  i32 = jnp.int32
  batch = rollout.PromptBatch(
    prompt_ids=abstract((prompts, lp), i32),
    prompt_valid=abstract((prompts, lp), bool),
    prompt_positions=abstract((prompts, 3, lp), i32),
    next_pos=abstract((prompts,), i32),
    frame_patches=abstract((prompts, frames, pf, pd), jnp.float32),
    keyframe_patches=abstract((prompts, frames, pk, pd), jnp.float32),
    prompt_index=abstract((prompts,), i32),
  )
  abstract_params = jax.eval_shape(lambda: policy.init_params(model_cfg, jax.random.PRNGKey(0)))
  specs = sharding.param_specs(abstract_params, sharding.rules_from_config(config.mesh), train_mesh)
  params = jax.tree.map(
    lambda x, spec: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, sharding.rollout_spec(spec))
    ),
    abstract_params,
    specs,
  )

  def host_fn(*args):
    raise RuntimeError("tools.aot compiles the rollout; it never runs it.")

  stop = jnp.full((1, 2), -1, jnp.int32)  # the shape of `rollout.stop_patterns`'s output
  fn = rollout.make_rollout_fn(model_cfg, rcfg, stop, host_fn, shapes.search_patch_shape, mesh=mesh)
  rng = abstract((2,), jnp.uint32)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = fn.lower(params, batch, rng)
    lowered_s = time.perf_counter() - start
    refused = None
    try:
      compiled = lowered.compile()
    except Exception as e:  # XLA's error type differs between jax versions
      if not _out_of_memory(e):
        raise
      compiled, refused = None, OutOfMemory(str(e), _sharded_bytes((params, batch)))
  facts = {
    "refused": refused,
    "mesh": dict(mesh.shape),
    "hosts": hosts,
    "prompts": prompts,
    "rows": prompts * rcfg.group_size,
    "cache_length": rcfg.cache_length(lp),
    "kv_dtype": str(jnp.dtype(model_cfg.compute_dtype)),
    "seconds": (lowered_s, time.perf_counter() - start - lowered_s),
  }
  return compiled, facts


def plan_bytes(config: Any, facts: dict[str, Any]) -> int:
  """`tools/plan`'s per-device total for the same program and mesh, on TPU."""
  return components.plan_run(config, facts["mesh"], platform="tpu").total_bytes_per_device


def run(
  config: Any, target_name: str, programs: Sequence[str] = ("update", "rollout")
) -> list[Report]:
  """Compiles the `programs` of `config` for `target_name`; prints and returns the reports.

  With both programs, a last line checks them together: the rollout runs while the
  training state (parameters and optimizer state, the update's arguments) stays in
  HBM; the rollout's KV cache and its gathered copy of the parameters live only
  while it runs, so the update gets that memory back.
  """
  if target_name not in TARGETS:
    raise ValueError(f"Unknown target {target_name!r}; choose one of {sorted(TARGETS)}.")
  unknown = set(programs) - {"update", "rollout"}
  if unknown or not programs:
    raise ValueError(f"Unknown programs {sorted(unknown)}; choose from update, rollout.")
  target = TARGETS[target_name]
  devices = target_devices(target)
  hbm = int(target.hbm_gib * GIB)
  print(
    f"target {target_name}: {len(devices)} x {devices[0].device_kind} "
    f"({target.topology}, {target.hbm_gib} GiB HBM each)"
  )
  reports, state_bytes = [], None
  if "update" in programs:
    compiled, facts = compile_update(config, devices)
    state_bytes = facts["state_bytes"]
    try:
      estimate = plan_bytes(config, facts)
    except (AttributeError, ValueError) as e:  # the plan refuses some layouts; say why
      print(f"tools.plan estimate unavailable: {e}")
      estimate = None
    mesh = ", ".join(f"{k}={v}" for k, v in facts["mesh"].items())
    m = facts["model_cfg"]
    print(
      f"update: {facts['rows']} rows x "
      f"{config.rollout.max_prompt_length + config.rollout.max_response_length} tokens, "
      f"{config.loss.micro_batches} micro-batches; mesh {mesh}; dtype {m.dtype}, remat "
      f"{m.remat}, scan_layers {m.scan_layers}, attention {m.attention}"
    )
    verb = "refused by XLA after" if compiled is None else "compiled in"
    print(
      "update: traced and lowered in {:.0f} s, {} {:.0f} s".format(
        facts["seconds"][0], verb, facts["seconds"][1]
      )
    )
    if compiled is None:
      reports.append(_refused_report("update", facts["refused"], hbm, estimate))
    else:
      reports.append(_report("update", compiled, hbm, estimate))
  if "rollout" in programs:
    compiled, rfacts = compile_rollout(config, devices)
    mesh = ", ".join(f"{k}={v}" for k, v in rfacts["mesh"].items())
    print(
      f"rollout: {rfacts['prompts']} prompts x {config.rollout.group_size} = "
      f"{rfacts['rows']} rows per host ({rfacts['hosts']} hosts) on the host's chips "
      f"(mesh {mesh}); KV cache {rfacts['cache_length']} slots a row in {rfacts['kv_dtype']}"
    )
    verb = "refused by XLA after" if compiled is None else "compiled in"
    lowered_s, compiled_s = rfacts["seconds"]
    print(f"rollout: traced and lowered in {lowered_s:.0f} s, {verb} {compiled_s:.0f} s")
    if compiled is None:
      reports.append(_refused_report("rollout", rfacts["refused"], hbm, None))
    else:
      reports.append(_report("rollout", compiled, hbm, None))
  for r in reports:
    print(r.table())
  for r in reports:
    print(r.verdict())
  rollout_report = [r for r in reports if r.name == "rollout"]
  if state_bytes is not None and rollout_report:
    together = rollout_report[0].total + state_bytes
    fits = together <= FIT_FRACTION * hbm and not rollout_report[0].refused
    print(
      f"rollout + resident training state: {together / GIB:.1f} GiB of {hbm / GIB:.1f} GiB "
      f"per chip ({100 * together / hbm:.0f}%) {'fits' if fits else 'does not fit'} "
      f"(state {state_bytes / GIB:.1f} GiB)"
    )
  return reports


def main(argv: Sequence[str]) -> None:
  del argv
  reports = run(_FLAGS["config"].value, flags.FLAGS.target, flags.FLAGS.programs)
  sys.exit(0 if all(r.fits for r in reports) else 1)


def define_flags() -> None:
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", None, "Run config file.", lock_config=True
  )
  flags.DEFINE_string("target", "v5p-64", f"TPU slice: {', '.join(sorted(TARGETS))}.")
  flags.DEFINE_list("programs", ["update", "rollout"], "Programs to compile: update, rollout.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
