"""The main command runs end to end on a shrunk embedded config."""

import subprocess
import sys


def test_main_command_runs_on_the_embedded_default(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.train",
    "--config=configs/okvos.py",
    f"--config.workdir={tmp_path}",
    "--config.model.preset=tiny",
    "--config.data.frame_size=64",
    "--config.batch_size=2",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "parameters" in out.stdout and "forward on" in out.stdout
  assert (tmp_path / "synthetic" / "okvos" / "train.parquet").is_file()


def test_misspelled_config_key_fails_before_any_work(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "segresearch_jax.train",
    "--config=configs/okvos.py",
    f"--config.workdir={tmp_path}",
    "--config.model.presett=tiny",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "presett" in out.stderr
  assert not (tmp_path / "synthetic").exists()
