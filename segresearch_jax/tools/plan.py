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

`--target=v5p-64` (a TPU slice of `sharding.TPU_TARGETS`) plans for its chips (a -1 axis
fills them), its attention kernel (`model.attention=auto` is splash) and its HBM: the
last line says whether the estimate fits in 90% of a chip, and the status is 1 when
it does not. `tools/aot.py` prints the compiler's figure for the same program beside
this estimate.

Exits with status 1 (and the offending parameters on stderr) when a rule leaves a
parameter above `mesh.max_replicated_elements` (default 2**20) whole on every device,
or when the batch does not split over the mesh. `train.py --config.dry_run=True`
prints the same text; both call `components.run_plan`.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from segresearch_jax import components, sharding

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """Flags of the command line only: importing this module defines none."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", None, "Run config file.", lock_config=True
  )
  _FLAGS["mesh"] = flags.DEFINE_string("mesh", "", "Mesh override, e.g. 'data:1,fsdp:16,tensor:4'.")
  _FLAGS["num_devices"] = flags.DEFINE_integer(
    "num_devices", 0, "Devices a -1 mesh axis fills up to; 0 = the devices of this machine."
  )
  _FLAGS["target"] = flags.DEFINE_string(
    "target", "", f"TPU slice to plan for: {', '.join(sorted(sharding.TPU_TARGETS))}; empty = none."
  )


def main(argv: list[str]) -> None:
  del argv
  config, mesh = _FLAGS["config"].value, _FLAGS["mesh"].value or None
  num_devices, platform, target = _FLAGS["num_devices"].value or None, None, None
  if _FLAGS["target"].value:
    if _FLAGS["target"].value not in sharding.TPU_TARGETS:
      print(f"plan failed: unknown target {_FLAGS['target'].value!r}", file=sys.stderr)
      sys.exit(1)
    target = sharding.TPU_TARGETS[_FLAGS["target"].value]
    num_devices, platform = num_devices or target.chips, "tpu"
  try:
    text = components.run_plan(config, mesh, num_devices, platform)
    total = components.plan_run(config, mesh, num_devices, platform).total_bytes_per_device
  except (ValueError, FileNotFoundError) as e:
    print(f"plan failed: {e}", file=sys.stderr)
    sys.exit(1)
  print(text)
  if target is not None:
    hbm = target.hbm_gib * sharding.GIB
    fits = total <= sharding.FIT_FRACTION * hbm
    print(
      f"plan: {total / sharding.GIB:.1f} GiB of {hbm / sharding.GIB:.1f} GiB per chip "
      f"({100 * total / hbm:.0f}%) {'fits' if fits else 'does not fit'} ({_FLAGS['target'].value})"
    )
    if not fits:
      sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
