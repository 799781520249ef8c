"""tools/aot: the trainer's update and rollout compiled ahead of time for a TPU topology
(needs libtpu)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from segresearch_jax.tools import aot

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _report(total_gib: float) -> aot.Report:
  gib = aot.GIB
  return aot.Report(
    name="update",
    arguments=int(total_gib * gib) - gib,
    outputs=gib,
    aliased=gib // 2,
    temporaries=gib // 2,
    code=0,
    flops=1e12,
    hbm_bytes=int(95.74 * gib),
    plan_bytes=None,
  )


def test_verdict_line_is_what_scripts_read():
  assert _report(61.2).verdict() == "update: 61.2 GiB of 95.7 GiB per chip (64%) fits"
  # 90% of HBM is the limit.
  assert _report(86.0).fits and not _report(86.3).fits
  assert _report(86.3).verdict().endswith("does not fit")


def test_a_program_xla_refuses_for_lack_of_hbm_does_not_fit_with_its_numbers():
  message = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (46.34G) exceeds available HBM (30.75G).\nmore detail"
  )
  error = aot.OutOfMemory(message, argument_bytes=aot.GIB)
  assert error.temporaries() == int(46.34 * aot.GIB)
  assert error.summary().startswith("Ran out of memory on HBM")
  report = aot._refused_report("update", error, int(30.75 * aot.GIB), None)
  assert not report.fits
  assert report.verdict() == "update: 47.3 GiB of 30.8 GiB per chip (154%) does not fit"
  assert "XLA refused to compile it" in report.table()
  other = aot.OutOfMemory("RESOURCE_EXHAUSTED: Used 45.1G of 30.75G hbm. Exceeded.", 0)
  assert other.temporaries() == int(45.1 * aot.GIB)
  assert aot.OutOfMemory("RESOURCE_EXHAUSTED", 0).temporaries() == 0


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tiny_update_compiles_for_a_v5p_slice_with_splash_attention():
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.tools.aot",
    "--config=configs/okvos.py",
    "--target=v5p-8",
    "--config.model.preset=tiny",
    "--config.model.dtype=bfloat16",
    "--config.model.remat=full",
    "--config.model.scan_layers=True",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert "4 x TPU v5" in out.stdout and "attention splash" in out.stdout
  assert "temporaries" in out.stdout and "FLOPs" in out.stdout and "tools.plan" in out.stdout
  assert lines[-3].startswith("update: ") and lines[-3].endswith(" fits")
  # The rollout program too, on one host's chips, with its KV cache in bf16; then both
  # together (the training state stays resident while the rollout runs).
  assert "rollout: 8 prompts x 4 = 32 rows per host" in out.stdout
  assert "KV cache 656 slots a row in bfloat16" in out.stdout
  assert lines[-2].startswith("rollout: ") and lines[-2].endswith(" fits")
  assert lines[-1].startswith("rollout + resident training state: ")
