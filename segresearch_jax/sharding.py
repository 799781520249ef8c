"""Device mesh, regex partition rules, sharded creation and the memory plan.

The trainer runs one program over a 3-axis mesh:

  data    pure data parallelism: batch rows split, parameters replicated;
  fsdp    batch rows split AND parameters / optimizer state split (ZeRO-3 style);
  tensor  the heads / intermediate / vocab dimension of each matmul split.

Parameters get their layout from an ordered list of (regex, spec) rules over the
'/'-joined parameter path; the first rule whose regex `re.search`-matches wins. A
spec is a tuple with one entry per array dimension: an axis name, None, or a tuple
of axis names (the dimension is split over their product). A dimension that an
axis does not divide stays unsplit (logged), so one rule set serves every mesh.
Optimizer state follows the parameters (Adam's moments are parameter-shaped),
batches are split along their leading row axis over ("data", "fsdp").

Typical use in a trainer:

    mesh = sharding.make_mesh(config.mesh)
    init_fn = functools.partial(policy.init_params, model_cfg)
    abstract = jax.eval_shape(init_fn, rng)
    param_sharding = sharding.param_shardings(abstract, rules, mesh)
    params = sharding.create_sharded(init_fn, rng, shardings=param_sharding)

`plan` does the same with abstract arrays and an `AbstractMesh` (no devices), and
reports per-device memory and the layout of every parameter; the `plan` tool and
`train.py --config.dry_run=True` print it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from segresearch_jax.models.config import ModelConfig

logger = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
# The axes a batch's rows are split over (in this order, so that a data x fsdp block
# of devices holds consecutive rows).
BATCH_AXES = ("data", "fsdp")

SpecEntry = str | tuple[str, ...] | None
Rule = tuple[str, Sequence[SpecEntry]]
AnyMesh = Mesh | AbstractMesh

# Rules for both Qwen3-VL and Qwen2.5-VL (parameter names mirror the HF checkpoints,
# see `models/weights.py`). Flax kernels are [in, out]. Per matmul one dimension goes
# over `fsdp` (storage; gathered for the matmul) and the heads / intermediate / vocab
# dimension over `tensor`, so column-parallel and row-parallel layers pair up as in
# Megatron: q/k/v, gate/up and fc1 split their output, o/down/fc2 their input.
DEFAULT_RULES: tuple[Rule, ...] = (
  # Embedding [V, D] and untied head [D, V]: vocab over tensor, hidden over fsdp.
  (r"(^|/)embed_tokens/embedding$", ("tensor", "fsdp")),
  (r"(^|/)lm_head/kernel$", ("fsdp", "tensor")),
  # Vision tower. The fused qkv output is laid out [3, heads, head_dim], which a flat
  # split does not cut along heads, so both axes go on its input dimension instead.
  (r"visual/blocks_\d+/qkv/kernel$", (("fsdp", "tensor"), None)),
  (r"visual/blocks_\d+/proj/kernel$", ("tensor", "fsdp")),
  (r"visual/patch_embed/kernel$", (None, ("fsdp", "tensor"))),
  (r"visual/pos_embed$", (None, ("fsdp", "tensor"))),
  # Qwen2.5-VL merger MLP (Qwen3-VL mergers use linear_fc1/2 below).
  (r"visual/merger/mlp_0/kernel$", ("fsdp", "tensor")),
  (r"visual/merger/mlp_2/kernel$", ("tensor", "fsdp")),
  # Attention projections: heads over tensor.
  (r"(q_proj|k_proj|v_proj)/kernel$", ("fsdp", "tensor")),
  (r"o_proj/kernel$", ("tensor", "fsdp")),
  # MLPs: the LM's and Qwen2.5-VL vision SwiGLU, Qwen3-VL vision GELU MLP and mergers.
  (r"(gate_proj|up_proj|linear_fc1)/kernel$", ("fsdp", "tensor")),
  (r"(down_proj|linear_fc2)/kernel$", ("tensor", "fsdp")),
  # Norm scales, biases, q/k norms: a few thousand values each, replicated.
  (r".*", ()),
)

DEFAULT_MAX_REPLICATED_ELEMENTS = 2**20
GIB = 1024**3
# A program fits a chip when its peak is at most this share of the chip's HBM: the
# rest is for the runtime, fragmentation and the rollout's buffers in between.
FIT_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice: its topology name for libtpu and the HBM of one chip (what one JAX
  device sees: v4 runs its two cores as one megacore device)."""

  topology: str
  hbm_gib: float
  chip_config: str = "default"

  @property
  def chips(self) -> int:
    """Chips (JAX devices) of the slice: the product of the topology's dimensions."""
    return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))


# The slices `tools/aot.py` compiles for and `tools/plan.py` plans for.
TPU_TARGETS = {
  "v5p-64": Target("v5p:2x4x4", 95.74),  # 32 chips
  "v5p-8": Target("v5p:2x2x1", 95.74),  # 4 chips
  "v4-32": Target("v4:2x2x4", 30.75, "megacore"),  # 16 chips
  "v4-8": Target("v4:2x2x1", 30.75, "megacore"),  # 4 chips
}

# The stacked decoder layers and vision blocks of a scanned model (see `_resolve`).
_STACKED_LAYERS = r"(^|/)(layers|blocks)/"


# ----------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------


def mesh_shape(mesh_config: Any, num_devices: int) -> dict[str, int]:
  """Resolves the axis sizes of `mesh_config` (data / fsdp / tensor: a run config's `mesh`
  or a dict with every axis) for a device count.

  One axis may be -1: it takes the devices the others leave.

  Raises:
    ValueError: a missing axis, sizes that are not positive (or -1), more than one -1, or
      sizes that do not multiply to `num_devices`.
  """
  missing = [axis for axis in AXES if axis not in mesh_config]
  if missing:
    raise ValueError(
      f"Mesh {dict(mesh_config)} lacks the axes {missing}; give every one of {AXES}."
    )
  sizes = {}
  for axis in AXES:
    size = mesh_config[axis]
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size == 0 or size < -1:
      raise ValueError(f"Mesh axis {axis!r} must be a positive int or -1, got {size!r}.")
    sizes[axis] = int(size)
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"Only one mesh axis may be -1 (the remaining devices), got {free}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  described = " x ".join(f"{a}={s}" for a, s in sizes.items())
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"Mesh {described}: the fixed axes use {fixed} devices, which does not divide the "
        f"{num_devices} available devices."
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f"Mesh {described} has {fixed} devices but {num_devices} are available; the sizes "
      "must multiply to the device count (set one axis to -1 for 'all remaining devices')."
    )
  return sizes


def parse_mesh(text: str) -> dict[str, int]:
  """Parses 'data:1,fsdp:16,tensor:4' into every axis's size (axes left out of the text
  are 1; -1 allowed)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition(":")
    name = name.strip()
    if not sep or name not in AXES:
      raise ValueError(f"Bad mesh entry {part!r} in {text!r}; expected e.g. 'data:1,fsdp:16'.")
    if name in sizes:
      raise ValueError(f"Mesh axis {name!r} given twice in {text!r}.")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"Mesh axis {name!r} size {value!r} is not an int.") from None
  return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices).

  Axes are `Auto`: the compiler places the collectives from the in/out shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    tuple(sizes[a] for a in AXES),
    AXES,
    axis_types=(AxisType.Auto,) * len(AXES),
    devices=devices,
  )


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
  """A device-free mesh of fixed `sizes` (for plans of meshes larger than this machine)."""
  if any(int(sizes[a]) == -1 for a in AXES):
    raise ValueError(
      f"An abstract mesh needs every axis size, got {dict(sizes)}; resolve -1 first with "
      "mesh_shape(mesh_config, num_devices)."
    )
  total = math.prod(int(sizes[a]) for a in AXES)
  resolved = mesh_shape(sizes, total)
  return AbstractMesh(
    tuple(resolved[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES)
  )


# ----------------------------------------------------------------------------
# Partition rules.
# ----------------------------------------------------------------------------


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined names of a pytree key path (dict keys, attributes, sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _entry_axes(entry: SpecEntry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def parse_spec(spec: Any) -> tuple[SpecEntry, ...]:
  """A rule's spec as a tuple of entries.

  Accepts a PartitionSpec, a tuple / list of entries, or a string such as
  'fsdp,tensor', 'None,fsdp+tensor' ('+' joins axes on one dimension) or '' (replicated),
  which is convenient on a command line.
  """
  if isinstance(spec, str):
    entries: list[SpecEntry] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
      axes = tuple(a.strip() for a in part.split("+"))
      entries.append(None if axes == ("None",) else axes[0] if len(axes) == 1 else axes)
    return tuple(entries)
  out: list[SpecEntry] = []
  for entry in spec:
    if entry is None or isinstance(entry, str):
      out.append(entry)
    elif isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
      out.append(tuple(entry))
    else:
      raise ValueError(f"Bad spec entry {entry!r} in {spec!r}: use an axis name, None or a tuple.")
  return tuple(out)


def normalize_rules(rules: Sequence[Any]) -> tuple[tuple[str, tuple[SpecEntry, ...]], ...]:
  """Validates (regex, spec) pairs: compilable regex, known axes, no axis used twice."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"A partition rule is a (regex, spec) pair, got {rule!r}.")
    pattern, spec = rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Partition rule regex {pattern!r} does not compile: {e}.") from None
    entries = parse_spec(spec)
    used = [a for entry in entries for a in _entry_axes(entry)]
    unknown = sorted(set(used) - set(AXES))
    if unknown:
      raise ValueError(f"Rule {pattern!r} uses unknown mesh axes {unknown}; axes are {AXES}.")
    if len(used) != len(set(used)):
      raise ValueError(f"Rule {pattern!r} uses a mesh axis on two dimensions: {entries}.")
    out.append((pattern, entries))
  return tuple(out)


def rules_from_config(mesh_config: Any) -> tuple[tuple[str, tuple[SpecEntry, ...]], ...]:
  """The run's rules: `mesh_config.rules` (if any) tried first, then `DEFAULT_RULES`."""
  return normalize_rules(tuple(mesh_config.rules) + DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class _Resolved:
  spec: PartitionSpec
  rule: str
  dropped: tuple[str, ...]  # Human-readable notes on dimensions that fell back to None.


def _resolve(
  path: str, shape: tuple[int, ...], rules: Sequence[tuple[str, tuple[SpecEntry, ...]]], sizes
) -> _Resolved:
  """The spec of one array: first matching rule, unsplittable dimensions set to None.

  Stacked decoder layers and vision blocks (`ModelConfig.scan_layers`: `layers/...`,
  `visual/blocks/...` with a leading layer axis) follow the rule of one layer (block);
  the layer axis is never split (the scan slices it).
  """
  if re.search(_STACKED_LAYERS, path) and len(shape) > 1:
    one = _resolve(re.sub(_STACKED_LAYERS, r"\1\2_0/", path), shape[1:], rules, sizes)
    return _Resolved(PartitionSpec(None, *one.spec), one.rule, one.dropped)
  for pattern, entries in rules:
    if not re.search(pattern, path):
      continue
    if len(entries) > len(shape):
      raise ValueError(
        f"Rule {pattern!r} gives {len(entries)} dimensions {entries} but {path} has shape "
        f"{shape}; make the regex more specific or add a rule before it."
      )
    resolved, dropped = [], []
    for dim, entry in enumerate(entries):
      split = math.prod(sizes[a] for a in _entry_axes(entry))
      if entry is not None and shape[dim] % split:
        dropped.append(f"{path} dim {dim} ({shape[dim]}) over {entry} ({split})")
        entry = None
      resolved.append(entry)
    while resolved and resolved[-1] is None:  # P('fsdp', None) == P('fsdp'); keep it short.
      resolved.pop()
    return _Resolved(PartitionSpec(*resolved), pattern, tuple(dropped))
  raise ValueError(f"No partition rule matches parameter {path} {shape}; add a catch-all '.*'.")


def _resolve_tree(abstract_params: Any, rules: Sequence[Rule], mesh: AnyMesh) -> Any:
  rules = normalize_rules(rules)
  sizes = dict(mesh.shape)
  resolved = jax.tree_util.tree_map_with_path(
    lambda p, x: _resolve(path_str(p), tuple(x.shape), rules, sizes), abstract_params
  )
  dropped = [d for r in jax.tree.leaves(resolved, is_leaf=_is_resolved) for d in r.dropped]
  if dropped:
    logger.warning(
      "%d parameter dimensions stay unsplit because the mesh axis does not divide them: %s%s",
      len(dropped),
      "; ".join(dropped[:8]),
      " ..." if len(dropped) > 8 else "",
    )
  return resolved


def _is_resolved(x: Any) -> bool:
  return isinstance(x, _Resolved)


def param_specs(abstract_params: Any, rules: Sequence[Rule], mesh: AnyMesh) -> Any:
  """A PartitionSpec per parameter (same tree as `abstract_params`).

  Args:
    abstract_params: a pytree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape).
    rules: ordered (regex, spec) pairs; the first whose regex searches the '/'-joined
      path wins. A dimension that its axes do not divide is left unsplit (logged).
    mesh: a Mesh or AbstractMesh with the axes of `AXES`.

  Raises:
    ValueError: a bad rule, a parameter no rule matches, or a spec longer than the rank.
  """
  resolved = _resolve_tree(abstract_params, rules, mesh)
  return jax.tree.map(lambda r: r.spec, resolved, is_leaf=_is_resolved)


def param_shardings(abstract_params: Any, rules: Sequence[Rule], mesh: AnyMesh) -> Any:
  """`param_specs` as NamedShardings on `mesh` (for jit in/out_shardings, device_put)."""
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s),
    param_specs(abstract_params, rules, mesh),
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
  """Whether `sharding` can lay out an array of `shape` (rank and divisibility)."""
  sizes = dict(sharding.mesh.shape)
  spec = tuple(sharding.spec)
  if len(spec) > len(shape):
    return False
  return all(d % math.prod(sizes[a] for a in _entry_axes(e)) == 0 for d, e in zip(shape, spec))


def state_shardings(abstract_state: Any, param_sharding: Any) -> Any:
  """Shardings of a state tree whose leaves are parameter-shaped copies or scalars.

  Optimizer states (optax) hold copies of the parameter tree (Adam's mu and nu) next
  to scalars (step counts). Every subtree with the parameters' tree structure takes
  the parameters' shardings (a leaf whose shape the sharding cannot lay out, e.g. a
  factored second moment, is replicated instead); every other leaf is replicated.
  Works on a whole TrainState (params, opt_state, step) as well as on an optax state.

  Args:
    abstract_state: e.g. `jax.eval_shape(lambda p: update.init_state(p, opt), abstract)`.
    param_sharding: NamedSharding tree from `param_shardings` (same tree as the params).
  """
  is_sharding = lambda x: isinstance(x, NamedSharding)
  treedef = jax.tree.structure(param_sharding, is_leaf=is_sharding)
  leaves = jax.tree.leaves(param_sharding, is_leaf=is_sharding)
  if not leaves:
    raise ValueError("param_sharding has no NamedSharding leaves.")
  replicated = NamedSharding(leaves[0].mesh, PartitionSpec())
  is_params = lambda node: jax.tree.structure(node) == treedef

  def assign(node):
    if not is_params(node):
      return replicated
    return jax.tree.unflatten(
      treedef,
      [
        s if _fits(s, tuple(x.shape)) else replicated for s, x in zip(leaves, jax.tree.leaves(node))
      ],
    )

  return jax.tree.map(assign, abstract_state, is_leaf=is_params)


def create_sharded(init_fn: Callable[..., Any], *args: Any, shardings: Any) -> Any:
  """Runs `init_fn(*args)` under jit so its outputs are born sharded.

  The unsharded result never exists: each device computes only its shards.

  Args:
    init_fn: a function of arrays only (bind configs with functools.partial).
    *args: its array arguments (e.g. a PRNG key, or params for an optimizer init).
    shardings: a sharding tree matching the output, or a function from the abstract
      output (`jax.eval_shape(init_fn, *args)`) to that tree.
  """
  if callable(shardings):
    shardings = shardings(jax.eval_shape(init_fn, *args))
  return jax.jit(init_fn, out_shardings=shardings)(*args)


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (row) axis over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_divisible(
  batch_rows: int, mesh: AnyMesh, what: str = "batch", micro_batches: int = 1
) -> None:
  """Raises a clear error (before any compilation) when rows do not split over the mesh.

  Args:
    batch_rows: the global number of rows.
    mesh: the mesh (or an AbstractMesh).
    what: names the batch in the message (e.g. 'rollout batch of 16 prompts x 8').
    micro_batches: each micro-batch must split over the mesh too.
  """
  sizes = dict(mesh.shape)
  devices = math.prod(sizes[a] for a in BATCH_AXES)
  if micro_batches < 1 or batch_rows % micro_batches:
    raise ValueError(f"{what}: {batch_rows} rows do not split into {micro_batches} micro-batches.")
  rows = batch_rows // micro_batches
  if rows % devices:
    per = f" per micro-batch ({micro_batches} micro-batches)" if micro_batches > 1 else ""
    raise ValueError(
      f"{what}: {rows} rows{per} do not divide over the mesh's data x fsdp = "
      f"{sizes['data']} x {sizes['fsdp']} = {devices} devices; use a multiple of {devices} "
      "rows or change --config.mesh.*."
    )


def shard_batch(host_batch: Any, mesh: Mesh) -> Any:
  """Places a host (numpy) batch on the mesh, rows over data x fsdp.

  Every leaf's leading axis is the row axis. With one process the batch is the
  global batch (`jax.device_put`); with several, each process passes its own rows
  and the global batch is their concatenation in process order
  (`jax.make_array_from_process_local_data`), so the same call works on a pod.
  """
  leaves = jax.tree.leaves(host_batch)
  if not leaves:
    raise ValueError("shard_batch got an empty batch.")
  rows = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in rows or len(rows) != 1:
    raise ValueError(f"Every batch leaf needs the same leading row axis, got row counts {rows}.")
  local_rows = rows.pop()
  processes = jax.process_count()
  check_batch_divisible(local_rows * processes, mesh, "batch")
  sharding = batch_sharding(mesh)
  if processes == 1:
    return jax.device_put(host_batch, sharding)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (local_rows * processes, *np.shape(x)[1:])
    ),
    host_batch,
  )


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array (the inverse of `shard_batch`).

  With one process, the whole array. With several, the rows held by this process's
  devices, in order (rows replicated over the tensor axis are taken once).
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = {}
  for shard in x.addressable_shards:
    start = (shard.index[0].start or 0) if shard.index else 0
    shards.setdefault(start, np.asarray(shard.data))
  rows = np.concatenate([shards[k] for k in sorted(shards)])
  if len(rows) * jax.process_count() != x.shape[0]:
    raise ValueError(
      f"local_rows: this process holds {len(rows)} of {x.shape[0]} rows over "
      f"{jax.process_count()} processes; the array is not split by rows ({x.sharding})."
    )
  return rows


# ----------------------------------------------------------------------------
# Several processes.
# ----------------------------------------------------------------------------


def local_copy(tree: Any) -> Any:
  """The whole of every array of `tree` on this process's first device.

  Host-driven programs (the rollout with its search callback, evaluation) run on
  one process's devices only. With one process the tree is returned as is. With
  several, a replicated leaf is read from a local shard and a sharded one is
  gathered from every process (`process_allgather`, a collective: every process
  must call this together).
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  device = jax.local_devices()[0]

  def leaf(x):
    if isinstance(x, jax.Array) and x.is_fully_replicated:
      return jax.device_put(x.addressable_data(0), device)
    return jax.device_put(np.asarray(multihost_utils.process_allgather(x, tiled=True)), device)

  return jax.tree.map(leaf, tree)


# ----------------------------------------------------------------------------
# The rollout's layout.
# ----------------------------------------------------------------------------


def rollout_mesh(mesh: Mesh) -> Mesh:
  """This process's devices of `mesh` as the rollout's (data=1, fsdp, tensor) mesh.

  The rollout calls its host (search, tokenisation) once per turn for its own rows,
  so each process runs its share of the rows on its own devices: rows over the
  data x fsdp devices of this process, weights and KV heads over `tensor`. A device
  keeps its tensor coordinate, so a parameter's tensor shards are where the training
  layout already put them (`rollout_params` gathers only over fsdp and data).

  Raises:
    ValueError: a tensor group spans processes (`mesh.tensor` above the devices of
      one process).
  """
  tensor = mesh.shape["tensor"]
  me = jax.process_index()
  groups = [tuple(g) for g in np.asarray(mesh.devices).reshape(-1, tensor)]  # data x fsdp
  local = [g for g in groups if all(d.process_index == me for d in g)]
  if not local or any(any(d.process_index == me for d in g) for g in set(groups) - set(local)):
    raise ValueError(
      f"mesh.tensor={tensor} spans devices of several processes; the rollout runs on "
      "each process's own devices: use a tensor axis of at most "
      f"{jax.local_device_count()} devices."
    )
  devices = np.asarray(local).reshape(1, len(local), tensor)
  return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def rollout_spec(spec: PartitionSpec) -> PartitionSpec:
  """A parameter's rollout layout: its training `spec` without the batch axes (data,
  fsdp), so only its tensor split remains."""
  kept = []
  for entry in spec:
    axes = tuple(a for a in _entry_axes(entry) if a not in BATCH_AXES)
    kept.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*kept)


def rollout_params(params: Any, mesh: Mesh) -> Any:
  """The training parameters laid out for the rollout on `mesh` (`rollout_mesh`).

  Each parameter keeps its tensor split and is gathered over data and fsdp on the
  devices (one jitted program over the training mesh: the collectives run over the
  chips' links, never through host memory), then each process takes the copies on
  its own devices as arrays of its rollout mesh. A collective: every process calls
  it together.

  Args:
    params: parameters sharded by `param_shardings` on the training mesh.
    mesh: this process's rollout mesh.
  """
  specs = jax.tree.map(lambda x: rollout_spec(x.sharding.spec), params)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  train_mesh = jax.tree.leaves(params)[0].sharding.mesh
  gathered = jax.jit(
    lambda p: p,
    out_shardings=jax.tree.map(lambda s: NamedSharding(train_mesh, s), specs, is_leaf=is_spec),
  )(params)

  def local(x, spec):
    shards = {s.device: s.data for s in x.addressable_shards}
    arrays = [shards[d] for d in mesh.devices.flat]
    return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(mesh, spec), arrays)

  return jax.tree.map(local, gathered, specs, is_leaf=lambda x: isinstance(x, jax.Array))


def process_mean(metrics: Mapping[str, float]) -> dict[str, float]:
  """Per-process scalar means -> their mean over processes (equal-sized shares).

  A collective with several processes (every process passes the same keys).
  """
  out = {k: float(v) for k, v in metrics.items()}
  if jax.process_count() == 1:
    return out
  from jax.experimental import multihost_utils

  keys = sorted(out)
  values = np.asarray([out[k] for k in keys], np.float32)
  gathered = np.asarray(multihost_utils.process_allgather(values))  # [processes, K]
  return dict(zip(keys, (float(v) for v in gathered.mean(axis=0))))


def process_max(value: int) -> int:
  """The largest of every process's `value` (a collective with several processes)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def barrier(name: str) -> None:
  """Waits for every process (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
  """Process 0 runs the block first; the others run it after process 0 is done.

  For host work that writes shared files (the synthetic data set, the mask cache,
  the embedded tokenizer): the others then find them complete. The block must not
  run collectives.
  """
  first = jax.process_index() == 0
  if not first:
    barrier(name)
  yield
  if first:
    barrier(name)


# ----------------------------------------------------------------------------
# The plan (dry run).
# ----------------------------------------------------------------------------


class UnshardedParamError(ValueError):
  """A rule leaves a large parameter fully replicated on a multi-device mesh."""


@dataclasses.dataclass(frozen=True)
class ParamPlan:
  """The layout of one parameter."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  spec: PartitionSpec
  rule: str
  shard_shape: tuple[int, ...]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def bytes_per_device(self) -> int:
    return math.prod(self.shard_shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a training run would hold on each device. Bytes are per device."""

  mesh_shape: dict[str, int]
  params: tuple[ParamPlan, ...]
  param_count: int
  param_bytes: int  # Whole model, unsharded.
  param_bytes_per_device: int
  grad_bytes_per_device: int  # The accumulated gradient (one parameter-shaped tree).
  opt_bytes_per_device: int
  activation_bytes_per_device: int
  activation_formula: str
  input_bytes_per_device: int  # The update's batch: token arrays and fp32 image patches.
  rows: int  # Rows of one optimizer update.
  micro_batches: int
  rows_per_device: int  # Rows of one micro-batch on one device.
  seq_len: int
  fallbacks: tuple[str, ...]

  @property
  def total_bytes_per_device(self) -> int:
    return (
      self.param_bytes_per_device
      + self.grad_bytes_per_device
      + self.opt_bytes_per_device
      + self.activation_bytes_per_device
      + self.input_bytes_per_device
    )


def check_replicated(
  params: Sequence[ParamPlan], mesh_shape: Mapping[str, int], max_elements: int
) -> None:
  """Raises UnshardedParamError for parameters above `max_elements` stored whole on
  every device, when the mesh has more than one fsdp x tensor device to split them."""
  if mesh_shape["fsdp"] * mesh_shape["tensor"] <= 1:
    return
  bad = [p for p in params if p.size > max_elements and p.shard_shape == p.shape]
  if bad:
    lines = "\n".join(f"  {p.path} {p.shape} (rule {p.rule!r}, spec {p.spec})" for p in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    raise UnshardedParamError(
      f"{len(bad)} parameters above {max_elements} elements are fully replicated on mesh "
      f"{dict(mesh_shape)} (no rule splits them, or no axis divides them):\n{lines}{more}\n"
      "Add a partition rule for them (config mesh.rules) or pick mesh sizes that divide them."
    )


def _activation_estimate(
  model_cfg: ModelConfig,
  rows_per_device: int,
  seq_len: int,
  tensor: int,
  compute_bytes: int,
  remat: str,
  image_patches: Sequence[int],
  logits_chunk: int,
  fused_attention: bool = False,
) -> tuple[int, str]:
  """Bytes of activations one device holds for one micro-batch's forward + backward.

  The terms follow the buffers XLA's buffer assignment keeps for the update step
  (read from its memory-usage report for the paper's program on TPU): the saved
  layer inputs, one layer's recomputed working set together with its gradients, the
  rotary embedding's fp32 copies of q and k, the LM head's gathered weight and its
  full fp32 gradient, and the vision blocks likewise.
  """
  t, v = model_cfg.text, model_cfg.vision
  r, n, e = rows_per_device, seq_len, compute_bytes
  split = max(tensor, 1)
  # Attention state per token and head: a fused kernel (splash, cuDNN) keeps the
  # softmax statistics (fp32); the blocked XLA path materialises fp32 logits and the
  # probabilities over all L keys.
  scores = 2 * 4 if fused_attention else n * (4 + e)
  # Per token per decoder layer: 4 hidden-size vectors (input, norms, attention output
  # projection), q/k/v before and after norm + rope and the attention output
  # ((3 H + 3 K) head_dim), 4 intermediate vectors (gate, up, silu, product), the
  # rotary embedding's fp32 q and k and their rotated halves (2 * 4 (H + K) head_dim)
  # and the attention scores; the head-sized parts are split over tensor.
  per_token = (
    e * 4 * t.hidden_size
    + (
      e * ((3 * t.num_heads + 3 * t.num_kv_heads) * t.head_dim + 4 * t.intermediate_size)
      + 2 * 4 * (t.num_heads + t.num_kv_heads) * t.head_dim
      + t.num_heads * scores
    )
    / split
  )
  # The layer whose backward runs holds its forward values and their gradients (2x).
  layer = 2 * r * n * per_token
  if remat == "none":
    lm = t.num_layers * r * n * per_token + layer
    lm_text = "layers * r*L*per_token + 2*r*L*per_token (the layer in backward)"
  elif remat == "full":
    lm = t.num_layers * r * n * e * t.hidden_size + layer
    lm_text = "layers * r*L*D*e + 2*r*L*per_token (one layer recomputed, with its gradients)"
  elif remat == "dots":  # the matmul outputs kept: q/k/v/o, gate/up/down, and the input
    saved = e * (2 * t.hidden_size + ((t.num_heads + 2 * t.num_kv_heads) * t.head_dim) / split)
    saved += e * (2 * t.intermediate_size) / split
    lm = t.num_layers * r * n * saved + layer
    lm_text = (
      "layers * r*L*e*(2D + ((H+2K)hd + 2I)/t) + 2*r*L*per_token (one layer recomputed, "
      "with its gradients)"
    )
  else:
    raise ValueError(f"remat must be 'none', 'full' or 'dots', got {remat!r}.")
  # The bool [B, L, L] attention mask, shared by the layers (a fused kernel builds its
  # mask per block).
  mask = 0 if fused_attention else r * n * n
  # The LM head runs in sequence chunks under jax.checkpoint: one chunk's fp32 logits,
  # log-softmax and exp at a time; its weight is gathered whole (in the compute dtype)
  # and its gradient is formed whole in fp32 before it is reduce-scattered.
  head = r * logits_chunk * t.vocab_size * 4 * 3 / split
  head += t.vocab_size * t.hidden_size * (e + 4) / split
  # Vision blocks, per image of S patches: 8 hidden + 2 intermediate vectors per patch,
  # fp32 rotary copies of q and k (2 * 4 * 2 Dv), and per-image attention logits +
  # probabilities (Hv S^2) or a fused kernel's statistics; the block in backward holds
  # its values and their gradients (2x).
  vision = 0
  for s in image_patches:
    per_block = s * (e * (8 * v.hidden_size + 2 * v.intermediate_size / split))
    per_block += s * 2 * 4 * 2 * v.hidden_size / split
    per_block += v.num_heads * s * (2 * 4 if fused_attention else s * (4 + e))
    if remat == "none":
      vision += r * (v.depth + 1) * per_block
    else:  # Block inputs kept, one block's working set recomputed.
      vision += r * (v.depth * s * e * v.hidden_size + 2 * per_block)
  total = int(lm + mask + head + vision)
  formula = (
    f"remat={remat}: {lm_text} + {'0' if fused_attention else 'r*L^2'} (mask) + "
    "r*chunk*V*12/t + V*D*(e+4)/t (head) + vision; "
    f"per_token = e*4*D + (e*((3H+3K)*hd + 4I) + 8*(H+K)*hd + "
    f"H*{'8' if fused_attention else 'L*(4+e)'})/t; "
    f"r={r} rows/device, L={n}, e={e} bytes, t={tensor}, chunk={logits_chunk}, "
    f"vision over {len(image_patches)} images/row of {sum(image_patches)} patches "
    f"(per block e*S*(8Dv + 2Iv/t) + 16*S*Dv/t + "
    f"{'Hv*S*8' if fused_attention else 'Hv*S^2*(4+e)'}, 2x in backward); "
    f"attention {'fused' if fused_attention else 'blocked XLA'}"
  )
  return total, formula


def plan(
  model_cfg: ModelConfig,
  mesh_sizes: Mapping[str, int],
  rules: Sequence[Rule],
  batch_rows: int,
  seq_len: int,
  optimizer: optax.GradientTransformation,
  *,
  micro_batches: int = 1,
  compute_dtype: Any = np.float32,
  remat: str = "none",
  image_patches: Sequence[int] = (),
  logits_chunk: int = 256,
  max_replicated_elements: int = DEFAULT_MAX_REPLICATED_ELEMENTS,
  fused_attention: bool = False,
) -> Plan:
  """Lays the model out on a mesh with abstract arrays only (no devices, no memory).

  Args:
    model_cfg: the policy's shapes.
    mesh_sizes: {'data': .., 'fsdp': .., 'tensor': ..} (every axis; no -1).
    rules: partition rules (see `param_specs`).
    batch_rows: trajectories in one optimizer update (prompts x group / mini-batches).
    seq_len: tokens per trajectory (prompt + response).
    optimizer: the optax optimizer whose state is sized.
    micro_batches: gradient-accumulation steps per update.
    compute_dtype: activation dtype.
    remat: 'none' (every layer's activations kept for the backward pass), 'full'
      (per-layer rematerialisation) or 'dots' (the matmul outputs kept).
    image_patches: patches of each image the training forward encodes for one row.
    logits_chunk: the chunk of the sequence the LM head runs on at once.
    max_replicated_elements: a parameter above this size must be split.
    fused_attention: the attention is a fused kernel (splash, cuDNN) that keeps no
      [L, L] logits or mask.

  Activation estimate: what one device holds for one micro-batch's forward + backward
  (r rows of L tokens, e bytes per value, t = tensor devices), term by term as XLA's
  buffer assignment keeps it for the update step. Per decoder layer and token,
  e*4*D (hidden-size vectors) plus, split over tensor, e*((3H + 3K)*head_dim + 4I)
  (q/k/v before and after norm + rope, attention output; gate, up, silu, product),
  8*(H + K)*head_dim (the rotary embedding's fp32 q and k and their rotated halves)
  and the attention scores: H*L*(4 + e) (fp32 logits and probabilities, which the
  blocked XLA path materialises) or, fused, H*8 (fp32 softmax statistics).
  remat='none' keeps all layers; 'full' keeps each layer's input (e*D per token);
  'dots' the matmul outputs; and the layer whose backward runs holds its values and
  their gradients (2x its working set). Plus, unfused, the shared bool [r, L, L] mask;
  one LM-head chunk (r*chunk*V/t fp32 logits, log-softmax, exp) and the head's
  gathered weight with its whole fp32 gradient (V*D*(e + 4)/t); and the vision blocks
  per image of S patches (e*S*(8*Dv + 2*Iv/t) + 16*S*Dv/t fp32 rotary copies, plus
  Hv*S^2*(4 + e), or Hv*S*8 fused; 2x for the block in backward). The update's
  inputs (`input_bytes`: token ids, positions, masks and fp32 image patches of the
  device's rows) are counted apart.

  Raises:
    UnshardedParamError: a large parameter stays whole on every device.
    ValueError: the rows do not divide over the mesh's data x fsdp devices.
  """
  from segresearch_jax.models import policy  # Deferred: policy imports are heavy.

  mesh = abstract_mesh(mesh_sizes)
  sizes = dict(mesh.shape)
  check_batch_divisible(batch_rows, mesh, "plan batch", micro_batches)
  abstract_params = jax.eval_shape(
    functools.partial(policy.init_params, model_cfg), jax.random.PRNGKey(0)
  )
  resolved = jax.tree.leaves(_resolve_tree(abstract_params, rules, mesh), is_leaf=_is_resolved)
  params = tuple(
    ParamPlan(
      path=path_str(path),
      shape=tuple(x.shape),
      dtype=np.dtype(x.dtype).name,
      spec=r.spec,
      rule=r.rule,
      shard_shape=tuple(NamedSharding(mesh, r.spec).shard_shape(tuple(x.shape))),
    )
    for (path, x), r in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], resolved)
  )
  check_replicated(params, sizes, max_replicated_elements)

  # Optimizer state laid out as the trainer lays it out (`state_shardings`).
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  param_sharding = jax.tree.unflatten(
    jax.tree.structure(abstract_params), [NamedSharding(mesh, p.spec) for p in params]
  )
  opt_sharding = state_shardings(abstract_opt, param_sharding)
  opt_bytes = sum(
    math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
    for x, s in zip(
      jax.tree.leaves(abstract_opt),
      jax.tree.leaves(opt_sharding, is_leaf=lambda x: isinstance(x, NamedSharding)),
    )
  )

  rows_per_device = batch_rows // micro_batches // (sizes["data"] * sizes["fsdp"])
  activations, formula = _activation_estimate(
    model_cfg,
    rows_per_device,
    seq_len,
    sizes["tensor"],
    np.dtype(compute_dtype).itemsize,
    remat,
    tuple(image_patches),
    logits_chunk,
    fused_attention,
  )
  # The update's inputs for the device's rows of every micro-batch: per token the id,
  # 3 position ids, the old and reference log-probs (int32/fp32) and two bool masks;
  # per image patch its fp32 pixels.
  v = model_cfg.vision
  patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
  device_rows = batch_rows // (sizes["data"] * sizes["fsdp"])
  inputs = device_rows * (seq_len * (4 * 6 + 2) + sum(image_patches) * patch_dim * 4)
  param_bytes_per_device = sum(p.bytes_per_device for p in params)
  return Plan(
    mesh_shape=sizes,
    params=params,
    param_count=sum(p.size for p in params),
    param_bytes=sum(p.size * np.dtype(p.dtype).itemsize for p in params),
    param_bytes_per_device=param_bytes_per_device,
    grad_bytes_per_device=param_bytes_per_device,
    opt_bytes_per_device=opt_bytes,
    activation_bytes_per_device=activations,
    activation_formula=formula,
    input_bytes_per_device=inputs,
    rows=batch_rows,
    micro_batches=micro_batches,
    rows_per_device=rows_per_device,
    seq_len=seq_len,
    fallbacks=tuple(d for r in resolved for d in r.dropped),
  )


def _gib(n: float) -> str:
  return f"{n / 2**30:,.2f} GiB"


def _spec_str(spec: PartitionSpec) -> str:
  if not any(e is not None for e in spec):
    return "replicated"
  return "(" + ", ".join("+".join(_entry_axes(e)) if e else "-" for e in spec) + ")"


def format_plan(p: Plan) -> str:
  """The plan as text: sizes, per-device memory, and the layout of every parameter.

  Parameters that differ only by a layer / block index and share shape and layout are
  one line with their count (e.g. `layers_*/q_proj/kernel  x36`).
  """
  mesh = " x ".join(f"{a}={s}" for a, s in p.mesh_shape.items())
  lines = [
    f"mesh: {mesh} ({math.prod(p.mesh_shape.values())} device(s))",
    f"parameters: {p.param_count:,} ({p.param_count / 1e9:.3f}B, {_gib(p.param_bytes)} total)",
    f"batch: {p.rows} rows x {p.seq_len} tokens per update, {p.micro_batches} micro-batch(es), "
    f"{p.rows_per_device} rows per device",
    "",
    "per-device memory:",
    f"  params            {_gib(p.param_bytes_per_device):>14}",
    f"  gradients         {_gib(p.grad_bytes_per_device):>14}",
    f"  optimizer state   {_gib(p.opt_bytes_per_device):>14}",
    f"  activations (est) {_gib(p.activation_bytes_per_device):>14}",
    f"  update inputs     {_gib(p.input_bytes_per_device):>14}",
    f"  total             {_gib(p.total_bytes_per_device):>14}",
    f"  activation formula: {p.activation_formula}",
  ]
  if p.fallbacks:
    lines.append(f"  {len(p.fallbacks)} dimensions left unsplit (axis does not divide them)")
  groups: dict[tuple, list[ParamPlan]] = {}
  for q in p.params:
    key = (re.sub(r"_\d+(?=/|$)", "_*", q.path), q.shape, q.dtype, q.spec)
    groups.setdefault(key, []).append(q)
  rows = [("parameter", "shape", "dtype", "sharding", "per device", "MiB/dev", "count")]
  for (name, shape, dtype, spec), members in groups.items():
    q = members[0]
    rows.append(
      (
        name,
        str(shape),
        dtype,
        _spec_str(spec),
        str(q.shard_shape),
        f"{q.bytes_per_device / 2**20:.2f}",
        f"x{len(members)}",
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines += ["", "parameter sharding:"]
  for r in rows:
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
  return "\n".join(lines)
