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
prints the same text; both call `components.run_plan`.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from segresearch_jax import components

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


def main(argv: list[str]) -> None:
  del argv
  try:
    text = components.run_plan(
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
