"""Process plumbing shared by the entry points (`train.py`, `evaluate.py`, the notebooks).

    runtime.define_config_flag()        # --config, at import of an entry point's __main__
    runtime.setup(config)               # quiet logs, join the job, compilation cache

Nothing here knows about the model or the data: it is what a program does before
it builds anything.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags


def define_config_flag() -> flags.FlagHolder:
  """Defines `--config` (a config file, locked: a misspelled key fails at once)."""
  return config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)


def initialize_distributed() -> None:
  """Joins a multi-process job; one code path for one host and many.

  SLURM and manual launches set SEGRESEARCH_COORDINATOR (host:port),
  SEGRESEARCH_NUM_PROCESSES and SEGRESEARCH_PROCESS_ID (`launch/slurm.py` does);
  TPU pod workers set SEGRESEARCH_DISTRIBUTED=1 and JAX finds its peers itself
  (`launch/tpu_pod.py` does). Without them this is a single-process run. CPU
  devices of several processes talk through gloo (the CPU-only test of this path).
  """
  coordinator = os.environ.get("SEGRESEARCH_COORDINATOR")
  if coordinator or os.environ.get("SEGRESEARCH_DISTRIBUTED") == "1":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["SEGRESEARCH_NUM_PROCESSES"]),
      process_id=int(os.environ["SEGRESEARCH_PROCESS_ID"]),
    )
  elif os.environ.get("SEGRESEARCH_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def enable_compilation_cache(config) -> None:
  """Persists compiled programs under `config.compilation_cache_dir` (keyed by the HLO)."""
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def quiet_logging() -> None:
  """absl at WARNING unless --verbosity is given (Orbax logs every file it renames)."""
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("bm25s").setLevel(logging.WARNING)


def setup(config) -> None:
  """What every entry point does first: quiet logs, join the job, compilation cache."""
  quiet_logging()
  initialize_distributed()
  enable_compilation_cache(config)
