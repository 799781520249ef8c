"""Orbax checkpoints of a run: train state, RNG, data position and what export needs.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, save_every=10)
    ckpt.save(step, state, rng, train_iter, metadata)           # every step; saves each 10th
    state, rng, metadata = ckpt.restore(None, abstract_state, train_iter)   # the latest
    ckpt.close()                                                # waits for the last write

Each saved step is a folder `<directory>/<step>/` with one Orbax item per part:

    state     the train-state pytree (params, optimizer state, step): `StandardSave`
    rng       the RNG key as JSON (implementation name and key data)
    data      the grain iterator position, one JSON file per process (grain's handler)
    metadata  JSON: the `ModelConfig`, the run config and the tokenizer (see `make_metadata`)

Atomic: Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it only once
every item is complete, so a process killed in the middle of a save (kill -9,
preemption) leaves the earlier steps loadable; the partial folder is never listed, and
the next `Checkpointer` on the directory deletes it (in the background, before its first
save).

Damage: a step folder that is empty or lacks an item (a partial copy, a deleted
folder) is never a step: the read-only helpers skip it, and a `Checkpointer` moves it
aside when it opens the directory (`<step>.incomplete`; an empty one is removed).
`restore_latest` restores the newest step that restores; when newer ones fail (a
truncated or deleted tensor file, broken JSON) it says which and why, and moves them
aside (`<step>.damaged`) so the resumed run can save those steps again. When no step
restores, one error lists every step and why.

Asynchronous: `save` returns once the arrays are copied to host memory and writes them
in a background thread, so the state may be donated to the next update right away. Call
`wait()` or `close()` before the process exits, or the last save is lost.

Multi-process: every process calls `save`, `restore`, `restore_latest`, `wait` and
`close` with the same arguments (Orbax saves collectively: each process writes the
shards it holds, and the primary process writes the JSON items and renames the folder;
a step any process cannot restore is skipped by all, and the primary moves it aside).
Never guard these calls with `jax.process_index() == 0`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from segresearch_jax.models import config as config_lib

STATE = "state"
RNG = "rng"
DATA = "data"
METADATA = "metadata"

# The items every step has; DATA is absent when a step was saved without an iterator.
REQUIRED_ITEMS = (STATE, RNG, METADATA)

# What a data iterator must be for grain's Orbax handler (both have get_state/set_state).
DataIterator = grain.DatasetIterator | grain.DataLoaderIterator

_LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Metadata: the model config, the run config and the tokenizer, as JSON.
# ----------------------------------------------------------------------------


def model_config_to_dict(model_config: config_lib.ModelConfig) -> dict[str, Any]:
  """A JSON-able dict of a `ModelConfig` (nested dataclasses become dicts)."""
  return dataclasses.asdict(model_config)


def _dataclass_from_dict(cls: type, values: Mapping[str, Any], where: str) -> Any:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"Unknown {where} fields {unknown}; expected a subset of {sorted(fields)}.")
  kwargs = {}
  for name, value in values.items():
    default = fields[name].default
    if dataclasses.is_dataclass(default):
      value = _dataclass_from_dict(type(default), value, f"{where}.{name}")
    elif isinstance(default, tuple):  # JSON turned the tuple into a list.
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)


def model_config_from_dict(values: Mapping[str, Any]) -> config_lib.ModelConfig:
  """Inverse of `model_config_to_dict`: rebuilds the frozen (hashable) `ModelConfig`."""
  return _dataclass_from_dict(config_lib.ModelConfig, values, "ModelConfig")


def tokenizer_metadata(tokenizer: Any) -> dict[str, str]:
  """How to find the run's tokenizer again: {"kind": "embedded", "name"} or {"kind": "hf", "dir"}.

  The embedded tokenizer is rebuilt from code; its name carries a hash of its training
  corpus, so export can tell when the code now builds a different one.
  """
  name = str(tokenizer.name)
  if name.startswith("embedded:"):
    return {"kind": "embedded", "name": name}
  return {"kind": "hf", "dir": os.path.abspath(name)}


def _run_config_to_json(run_config: Any) -> Any:
  if run_config is None:
    return None
  if hasattr(run_config, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(run_config.to_json_best_effort())
  return _check_json(run_config, "run_config")


def make_metadata(
  model_config: config_lib.ModelConfig,
  run_config: Any = None,
  tokenizer: Any = None,
) -> dict[str, Any]:
  """The metadata item the trainer saves with every step.

  Args:
    model_config: the policy's shapes (restored with `model_config_from_dict`).
    run_config: the run's `ml_collections.ConfigDict` (or a JSON-able mapping).
    tokenizer: the run's `models.tokenizer.Tokenizer`, recorded by `tokenizer_metadata`.
  """
  return {
    "model_config": model_config_to_dict(model_config),
    "run_config": _run_config_to_json(run_config),
    "tokenizer": None if tokenizer is None else tokenizer_metadata(tokenizer),
  }


def _check_json(value: Any, what: str) -> Any:
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} must be JSON-serialisable: {e}") from e


# ----------------------------------------------------------------------------
# RNG keys <-> JSON (exact: key data are small unsigned integers).
# ----------------------------------------------------------------------------


def _host_array(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError("The RNG key must be replicated across processes to be checkpointed.")
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def rng_to_json(rng: jax.Array) -> dict[str, Any]:
  """A typed (`jax.random.key`) or raw uint32 (`jax.random.PRNGKey`) key as JSON."""
  if not isinstance(rng, (jax.Array, np.ndarray)):
    raise ValueError(f"rng must be a JAX PRNG key array, got {type(rng).__name__}.")
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if typed:
    impl, data = str(jax.random.key_impl(rng)), _host_array(jax.random.key_data(rng))
  else:
    impl, data = None, _host_array(rng)
    if data.dtype != np.uint32:
      raise ValueError(f"rng must be a typed key or uint32 key data, got dtype {data.dtype}.")
  return {"impl": impl, "shape": list(data.shape), "key_data": data.reshape(-1).tolist()}


def rng_from_json(value: Mapping[str, Any]) -> jax.Array:
  """Inverse of `rng_to_json`."""
  data = jnp.asarray(np.asarray(value["key_data"], np.uint32).reshape(value["shape"]))
  if value["impl"] is None:
    return data
  return jax.random.wrap_key_data(data, impl=value["impl"])


# ----------------------------------------------------------------------------
# Abstract states.
# ----------------------------------------------------------------------------


def abstract_state(state: Any) -> Any:
  """Shapes, dtypes and shardings of a concrete state: a restore target that keeps its layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _as_restore_target(abstract: Any) -> Any:
  """Checks that every leaf says where it lands; concrete `jax.Array`s give their own layout.

  A leaf without a sharding (plain `jax.eval_shape` output) lands on the first local
  device in a single-process run; with several processes there is no default for a global
  array, so every leaf must carry its sharding.
  """
  default = None
  if jax.process_count() == 1:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(path, x):
    if isinstance(x, jax.Array):
      return ocp.utils.to_shape_dtype_struct(x)
    if not isinstance(x, jax.ShapeDtypeStruct):
      raise ValueError(
        f"abstract_state leaf {jax.tree_util.keystr(path)} must be a jax.ShapeDtypeStruct "
        f"(or a jax.Array), got {type(x).__name__}."
      )
    if x.sharding is None:
      if default is None:
        raise ValueError(
          f"abstract_state leaf {jax.tree_util.keystr(path)} has no sharding; with "
          f"{jax.process_count()} processes every leaf needs the sharding it should land in "
          "(jax.eval_shape plus the mesh shardings, or `checkpoint.abstract_state`)."
        )
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x

  return jax.tree_util.tree_map_with_path(leaf, abstract)


# ----------------------------------------------------------------------------
# Managers.
# ----------------------------------------------------------------------------


def _item_handlers(state_handler: ocp.CheckpointHandler) -> dict[str, ocp.CheckpointHandler]:
  return {
    STATE: state_handler,
    RNG: ocp.JsonCheckpointHandler(),
    DATA: grain.checkpoint.CheckpointHandler(),
    METADATA: ocp.JsonCheckpointHandler(),
  }


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(step))


def _incomplete_reason(step_dir: str | os.PathLike) -> str | None:
  """Why a step folder cannot hold a complete save, or None; reads no array.

  Orbax renames a step's folder only once every item is written, so an empty folder or
  one without an item was made or damaged by something else (a partial copy, a deleted
  item folder) and never restores.
  """
  try:
    names = os.listdir(step_dir)
  except OSError as e:
    return f"unreadable folder ({e.strerror})"
  if not names:
    return "empty folder"
  missing = [
    item
    for item in REQUIRED_ITEMS
    if not os.path.isdir(os.path.join(step_dir, item))
    or not os.listdir(os.path.join(step_dir, item))
  ]
  if missing:
    return f"partial folder: no {', '.join(missing)} item"
  return None


def _complete_steps(manager: ocp.CheckpointManager, directory: str) -> list[int]:
  return sorted(
    s for s in manager.all_steps() if _incomplete_reason(_step_dir(directory, s)) is None
  )


def _resolve_step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  steps = _complete_steps(manager, directory)
  if step is None:
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {directory}.")
    return steps[-1]
  if int(step) not in steps:
    reason = ""
    if int(step) in manager.all_steps():
      reason = f" ({_incomplete_reason(_step_dir(directory, int(step)))})"
    raise FileNotFoundError(
      f"No checkpoint for step {step} in {directory}{reason}; steps there: {steps}."
    )
  return int(step)


def _short(error: BaseException, limit: int = 600) -> str:
  """An exception as one line: TensorStore's messages run to kilobytes, most of them its spec."""
  text = " ".join(f"{type(error).__name__}: {error}".split()).split(" [tensorstore_spec")[0]
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _set_aside(directory: str, step: int, suffix: str) -> str:
  """Renames `<directory>/<step>` to a free `<step>.<suffix>[-k]`, a name Orbax never lists."""
  target, k = os.path.join(directory, f"{step}.{suffix}"), 1
  while os.path.exists(target):
    k += 1
    target = os.path.join(directory, f"{step}.{suffix}-{k}")
  os.rename(_step_dir(directory, step), target)
  return target


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process: a step one process cannot read is not used."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _remove_temporary(directory: str) -> None:
  """Deletes the unfinished saves (`*.orbax-checkpoint-tmp*`) of a killed run."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:
  """Saves and restores a run (see the module docstring): keep-N, save every N steps.

  Args:
    directory: the checkpoint folder (created if missing); `<step>/` per saved step.
    keep: how many of the newest steps to keep; older ones are deleted after each save.
    save_every: `save` writes steps that are multiples of this (and any step with force).
    async_save: write in a background thread (default); False blocks in `save`.
    log: where to say which step folders were moved aside (and why).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep: int,
    save_every: int,
    async_save: bool = True,
    log: Callable[[str], Any] = _LOG.warning,
  ):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}.")
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep = keep
    self.save_every = save_every
    several = jax.process_count() > 1
    if several and jax.process_index() == 0:
      _remove_temporary(self.directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      # Remove what a killed save left behind (`<step>.orbax-checkpoint-tmp`). Orbax
      # does it in the background, so with several processes a late one could delete
      # the folder of a save the others have begun: process 0 does it above instead.
      cleanup_tmp_directories=not several,
      enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=_item_handlers(ocp.StandardCheckpointHandler())
    )
    if jax.process_index() == 0:
      self._set_aside_incomplete(log)
    self._barrier("checkpointer")
    # Orbax listed the folders when it opened the directory: list them again.
    self._manager.reload()

  def _barrier(self, name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"{name} {self.directory}")

  def _set_aside_incomplete(self, log: Callable[[str], Any]) -> None:
    """Removes empty step folders and renames partial ones, so none is taken as a step
    and the run can save that step again."""
    for step in sorted(self._manager.all_steps()):
      path = _step_dir(self.directory, step)
      reason = _incomplete_reason(path)
      if reason is None:
        continue
      if reason == "empty folder":
        os.rmdir(path)
        log(f"checkpoint step {step} in {self.directory} is an empty folder: removed it")
      else:
        moved = _set_aside(self.directory, step, "incomplete")
        log(
          f"checkpoint step {step} in {self.directory} is not a step ({reason}): moved to {moved}"
        )

  def all_steps(self) -> list[int]:
    """Saved steps, ascending; includes a step this process is still writing (`wait()`)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none (a fresh run).

    Only a restore can tell damaged files: resume with `restore_latest`.
    """
    return self._manager.latest_step()

  def save(
    self,
    step: int,
    state: Any,
    rng: jax.Array,
    data_iterator: DataIterator | None,
    metadata: Mapping[str, Any],
    *,
    force: bool = False,
  ) -> bool:
    """Saves `step` if it is a multiple of `save_every` (or `force`); returns whether it did.

    Args:
      step: the trainer's step number; names the folder.
      state: the train-state pytree (e.g. `rl.update.TrainState`), sharded or not.
      rng: the trainer's RNG key (typed or raw uint32), replicated across processes.
      data_iterator: the grain iterator whose next batch a resumed run must see, or None.
      metadata: JSON-able dict; `make_metadata` gives what `tools.export` needs.
      force: save regardless of `save_every` (the last step of a run).

    A step that is already saved is not written again (False), so the trainer can
    force-save its last step even when it was just saved by the interval rule.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    if not force and step % self.save_every:
      return False
    if step in self._manager.all_steps():  # Includes a save still in flight.
      return False
    items = {
      STATE: ocp.args.StandardSave(state),
      RNG: ocp.args.JsonSave(rng_to_json(rng)),
      METADATA: ocp.args.JsonSave(_check_json(dict(metadata), "metadata")),
    }
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    # The interval rule is ours (above); Orbax's would also save the first step it sees.
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def restore(
    self,
    step: int | None,
    abstract_state: Any,
    data_iterator: DataIterator | None = None,
  ) -> tuple[Any, jax.Array, dict[str, Any]]:
    """Restores `step` (None: as `restore_latest`); arrays land in `abstract_state`'s shardings.

    Args:
      step: the step to restore, or None for the newest step that restores.
      abstract_state: the state's pytree of `jax.ShapeDtypeStruct` with shardings
        (`abstract_state(state)`, or `jax.eval_shape` plus partition rules); the
        restored arrays are laid out as it says, whatever layout saved them. Leaves
        without a sharding land on the first local device (single-process runs only).
      data_iterator: a freshly built iterator of the same pipeline; its position is set
        so its next batch is the one that followed the save.

    Returns:
      (state, rng, metadata).
    """
    if step is None:
      return self.restore_latest(abstract_state, data_iterator)[1:]
    target = _as_restore_target(abstract_state)
    self.wait()  # A step still being written is not restorable yet.
    return self._restore_step(
      _resolve_step(self._manager, self.directory, step), target, data_iterator
    )

  def restore_latest(
    self,
    abstract_state: Any,
    data_iterator: DataIterator | None = None,
    *,
    log: Callable[[str], Any] = _LOG.warning,
  ) -> tuple[int, Any, jax.Array, dict[str, Any]]:
    """Restores the newest step that restores: what a resumed run continues from.

    A newer step that fails (a truncated or missing tensor file, broken JSON, no data
    state) is reported through `log` with the reason, then renamed `<step>.damaged` so
    the resumed run can save that step again. Steps older than the one restored are
    never touched, and nothing is moved when no step restores.

    Args:
      abstract_state: as in `restore`.
      data_iterator: as in `restore`.
      log: where to say which steps were skipped and why.

    Returns:
      (step, state, rng, metadata).

    Raises:
      FileNotFoundError: the directory holds no complete step.
      ValueError: no step restores; the message lists every step and why.
    """
    target = _as_restore_target(abstract_state)
    self.wait()
    steps = _complete_steps(self._manager, self.directory)
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    failed: list[tuple[int, str]] = []
    for step in reversed(steps):
      error = None
      try:
        restored = self._restore_step(step, target, data_iterator)
      except Exception as e:  # Any failure of this step's files: try the one before.
        error = e
      if _all_processes(error is None):
        self._set_aside_damaged(failed, step, log)
        return (step, *restored)
      reason = _short(error.__cause__ or error) if error else "failed on another process"
      failed.append((step, reason))
      log(f"checkpoint step {step} in {self.directory} does not restore: {reason}")
    raise ValueError(
      f"No checkpoint in {self.directory} restores (damaged files, or a model whose "
      "structure, shapes or dtypes differ from the saved ones):\n"
      + "\n".join(f"  step {s}: {r}" for s, r in failed)
    )

  def _set_aside_damaged(
    self, failed: Sequence[tuple[int, str]], restored: int, log: Callable[[str], Any]
  ) -> None:
    if not failed:
      return
    if jax.process_index() == 0:
      for step, _ in failed:
        moved = _set_aside(self.directory, step, "damaged")
        log(f"moved the damaged checkpoint step {step} to {moved}")
    self._barrier(f"set aside {[s for s, _ in failed]}")
    self._manager.reload()
    skipped = ", ".join(str(s) for s, _ in failed)
    log(f"resuming from checkpoint step {restored}, the newest that restores (skipped {skipped})")

  def _restore_step(
    self, step: int, target: Any, data_iterator: DataIterator | None
  ) -> tuple[Any, jax.Array, dict[str, Any]]:
    items = {
      STATE: ocp.args.StandardRestore(target),
      RNG: ocp.args.JsonRestore(),
      METADATA: ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
      if not os.path.isdir(os.path.join(_step_dir(self.directory, step), DATA)):
        raise ValueError(
          f"Checkpoint step {step} in {self.directory} has no data-iterator state (it was "
          "saved with data_iterator=None); restore with data_iterator=None."
        )
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
      rng = rng_from_json(out[RNG])
    except Exception as e:  # Orbax, TensorStore and JSON errors alike.
      raise ValueError(
        f"Could not restore step {step} of {self.directory} (damaged files, or an abstract "
        f"state without the saved structure, shapes and dtypes): {_short(e)}"
      ) from e
    return out[STATE], rng, out[METADATA]

  def wait(self) -> None:
    """Blocks until the background write of the last save is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Read-only access (export, evaluation): metadata and params without the rest.
# ----------------------------------------------------------------------------


def _read_only_manager(directory: str | os.PathLike) -> tuple[ocp.CheckpointManager, str]:
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Checkpoint directory not found: {directory}")
  # Never saved through, no cleanup, no create: the manager leaves the folder as it is
  # (`read_only=True` would too, but logs warnings on every open).
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  # PyTreeCheckpointHandler reads what StandardCheckpointHandler wrote (same format) and
  # can restore a subtree, so export never reads the optimizer state.
  manager = ocp.CheckpointManager(
    directory, options=options, item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler())
  )
  return manager, directory


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
  """(step, metadata) of `step` (None: the latest) without touching the arrays."""
  manager, directory = _read_only_manager(directory)
  with manager:
    step = _resolve_step(manager, directory, step)
    args = ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()})
    out = _read_only_restore(manager, directory, step, args)
  return step, out[METADATA]


def _read_only_restore(
  manager: ocp.CheckpointManager, directory: str, step: int, args: ocp.args.Composite | None
) -> Any:
  """`manager.restore(step, args)`, or with `args=None` the step's item metadata."""
  try:
    if args is None:
      return manager.item_metadata(step)
    return manager.restore(step, args=args)
  except Exception as e:  # Orbax, TensorStore and JSON errors alike.
    steps = _complete_steps(manager, directory)
    raise ValueError(
      f"Checkpoint step {step} in {directory} does not restore (damaged files?): {_short(e)}; "
      f"steps there: {steps} (pass another step)."
    ) from e


def restore_params(directory: str | os.PathLike, step: int | None, abstract_params: Any) -> Any:
  """Only the `params` field of a saved state (a `TrainState` or a dict with "params").

  Args:
    directory: the checkpoint folder.
    step: the step, or None for the latest.
    abstract_params: pytree of `jax.ShapeDtypeStruct` with shardings (or `jax.Array`s).
  """
  manager, directory = _read_only_manager(directory)
  with manager:
    step = _resolve_step(manager, directory, step)
    saved = _read_only_restore(manager, directory, step, None)[STATE]
    saved = getattr(saved, "tree", saved)
    if not isinstance(saved, Mapping) or "params" not in saved:
      raise ValueError(f"The state saved at step {step} in {directory} has no 'params' field.")
    target = {"params": _as_restore_target(abstract_params)}
    # A partial restore silently skips target keys it does not find: compare first.
    problems = _compare_shapes(saved["params"], target["params"])
    if problems:
      raise ValueError(
        f"The params saved at step {step} in {directory} do not match the model "
        f"({len(problems)} problems):\n  " + "\n  ".join(problems)
      )
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    out = _read_only_restore(manager, directory, step, ocp.args.Composite(**{STATE: args}))
  return out[STATE]["params"]


def _compare_shapes(saved: Any, target: Any) -> list[str]:
  """Every missing, unexpected or misshaped leaf between saved metadata and a target."""

  def shapes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in leaves}

  saved, target = shapes(saved), shapes(target)
  problems = [f"missing in checkpoint: params{k}" for k in sorted(set(target) - set(saved))]
  problems += [f"not in model: params{k}" for k in sorted(set(saved) - set(target))]
  problems += [
    f"wrong shape: params{k}: checkpoint {saved[k]}, model {target[k]}"
    for k in sorted(set(saved) & set(target))
    if saved[k] != target[k]
  ]
  return problems
