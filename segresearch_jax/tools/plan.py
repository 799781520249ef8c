r"""Prints the sharding plan of a run config: sizes, per-device memory, parameter layouts.

    python -m segresearch_jax.tools.plan --config=configs/okvos.py:paper \
        --mesh=data:1,fsdp:16,tensor:4

The configured policy (its preset, or `model.hf_dir`'s config.json, read without
loading weights) is built with abstract arrays only, so a 64-device mesh plans on a
one-CPU machine in seconds. `--mesh` replaces the config's `mesh.data/fsdp/tensor`;
a -1 axis takes the devices the others leave out of `--num_devices` (default: the
devices of this machine). The run's numbers come from the config: rows per update =
batch_size x rollout.group_size / loss.mini_batches, tokens per row =
max_prompt_length + max_response_length, the images the training forward encodes per
row (shown frames, and per turn one keyframe and one image_search slot), the AdamW
state of `optim`. Partition rules: `mesh.rules` (if the config has them) then
`sharding.DEFAULT_RULES`.

Exits with status 1 (and the offending parameters on stderr) when a rule leaves a
parameter above `mesh.max_replicated_elements` (default 2**20) whole on every device,
or when the batch does not split over the mesh. `train.py --config.dry_run=True`
prints the same text through `run_plan`.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from segresearch_jax import sharding
from segresearch_jax.models import config as config_lib
from segresearch_jax.rl import update

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """Flags of the command line tool only (train.py imports `run_plan` with its own --config)."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", None, "Run config file.", lock_config=True
  )
  _FLAGS["mesh"] = flags.DEFINE_string("mesh", "", "Mesh override, e.g. 'data:1,fsdp:16,tensor:4'.")
  _FLAGS["num_devices"] = flags.DEFINE_integer(
    "num_devices", 0, "Devices a -1 mesh axis fills up to; 0 = the devices of this machine."
  )


def model_config(config: Any) -> config_lib.ModelConfig:
  """The run's model shapes: `model.hf_dir`'s config.json (no weights read), else the preset.

  The tiny and embedded presets keep their own vocabulary here; the trainer resizes it
  to the tokenizer's, which changes the embedding rows only.
  """
  if config.model.hf_dir:
    path = pathlib.Path(config.model.hf_dir) / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"No config.json in model.hf_dir {config.model.hf_dir!r}.")
    return config_lib.from_hf_config(json.loads(path.read_text()))
  return config_lib.get_preset(config.model.preset)


def _image_patches(config: Any, model_cfg: config_lib.ModelConfig) -> tuple[int, ...]:
  """Patches of every image `rollout.training_inputs` encodes for one trajectory."""
  v = model_cfg.vision
  factor = v.patch_size * v.spatial_merge_size

  def patches(size: int) -> int:
    # The processor resizes each side to a multiple of patch x merge (smart_resize).
    side = max(round(size / factor), 1) * v.spatial_merge_size
    return side * side

  turns = config.rollout.max_turns
  return (
    (patches(config.data.frame_size),) * config.data.num_frames
    + (patches(config.data.keyframe_size),) * turns
    + (patches(config.data.search_image_size),) * turns
  )


def _mesh_sizes(
  config: Any, mesh_override: str | Mapping[str, int] | None, num_devices: int | None
) -> dict[str, int]:
  if isinstance(mesh_override, str) and mesh_override:
    sizes = sharding.parse_mesh(mesh_override)
  elif isinstance(mesh_override, Mapping) and mesh_override:
    sizes = dict(mesh_override)
  else:
    sizes = {axis: config.mesh[axis] for axis in sharding.AXES}
  if any(sizes.get(axis, 1) == -1 for axis in sharding.AXES):
    return sharding.mesh_shape(sizes, num_devices or jax.device_count())
  return sharding.mesh_shape(sizes, math.prod(sizes.get(axis, 1) for axis in sharding.AXES))


def run_plan(
  config: Any,
  mesh_override: str | Mapping[str, int] | None = None,
  num_devices: int | None = None,
) -> str:
  """The plan of `config` as text.

  Args:
    config: the run config (configs/okvos.py).
    mesh_override: 'data:1,fsdp:16,tensor:4' or a dict; None uses `config.mesh`.
    num_devices: the device count a -1 axis fills; None = this machine's devices.

  Raises:
    sharding.UnshardedParamError: a large parameter is replicated on a multi-device mesh.
    ValueError: a bad mesh, bad rules, or a batch that does not split over the mesh.
  """
  model_cfg = model_config(config)
  sizes = _mesh_sizes(config, mesh_override, num_devices)
  rules = sharding.rules_from_config(config.mesh)
  o = config.optim
  optimizer = update.make_optimizer(
    o.lr, o.warmup_steps, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip
  )
  rows = config.batch_size * config.rollout.group_size
  if rows % config.loss.mini_batches:
    raise ValueError(
      f"batch_size x group_size = {rows} rows do not split into "
      f"{config.loss.mini_batches} mini-batches."
    )
  p = sharding.plan(
    model_cfg,
    sizes,
    rules,
    rows // config.loss.mini_batches,
    config.rollout.max_prompt_length + config.rollout.max_response_length,
    optimizer,
    micro_batches=config.loss.micro_batches,
    compute_dtype=config.model.dtype,
    remat=config.model.get("remat", "none"),
    image_patches=_image_patches(config, model_cfg),
    max_replicated_elements=config.mesh.get(
      "max_replicated_elements", sharding.DEFAULT_MAX_REPLICATED_ELEMENTS
    ),
  )
  source = config.model.hf_dir or f"preset {config.model.preset}"
  header = f"model: {model_cfg.family} ({source}), compute dtype {config.model.dtype}"
  return header + "\n" + sharding.format_plan(p)


def main(argv: list[str]) -> None:
  del argv
  try:
    text = run_plan(
      _FLAGS["config"].value, _FLAGS["mesh"].value or None, _FLAGS["num_devices"].value or None
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"plan failed: {e}", file=sys.stderr)
    sys.exit(1)
  print(text)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
