"""Two training processes over a local coordinator match one process over two devices.

Each process rolls out its share of the prompts (the pipeline deals samples
round-robin, the rollout keys each row's RNG by its global position), the updates
run over the global mesh through CPU collectives (gloo), and process 0 logs,
evaluates and writes the summary. The one-process run has the same two devices,
so the mesh, the global batch and the arithmetic are the same.
"""

import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest
from test_train import _command, _train_rows  # tests/ is on sys.path under pytest

from segresearch_jax import evaluate
from segresearch_jax.data import pipeline, synthetic

# On top of `configs/okvos.py:runlocal` (`test_train._command`): no warm start, and
# one mini-batch: with several, each process splits its own rows, so the rows that
# share an update differ from the one-process split (the step is still exact GRPO).
FLAGS = [
  "--config.sft.steps=0",
  "--config.loss.mini_batches=1",
  "--config.eval.masks=False",
  # The untrained policy scores 0 on every term; DAPO's length penalty gives its
  # episodes different rewards, so the updates are not zero.
  "--config.dapo.overlong_buffer=150",
  # The KL term reads the reference log-probs back per process (`sharding.local_rows`).
  "--config.loss.kl_coef=0.01",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("SEGRESEARCH_")}
  return dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  synthetic_dir = tmp_path / "synthetic"
  synthetic.build(synthetic_dir, seed=0)
  one, two = tmp_path / "one", tmp_path / "two"
  single = subprocess.run(
    _command(one, synthetic_dir, flags=FLAGS),
    env=_env(2),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert single.returncode == 0, single.stderr[-4000:]

  port = _free_port()
  # Output to files: a process blocked on a full pipe would stall the other at a barrier.
  logs = [(tmp_path / f"p{i}.out", tmp_path / f"p{i}.err") for i in range(2)]
  procs = []
  for i, (out, err) in enumerate(logs):
    with out.open("w") as fo, err.open("w") as fe:
      env = _env(
        1,
        SEGRESEARCH_COORDINATOR=f"127.0.0.1:{port}",
        SEGRESEARCH_NUM_PROCESSES="2",
        SEGRESEARCH_PROCESS_ID=str(i),
      )
      procs.append(
        subprocess.Popen(_command(two, synthetic_dir, flags=FLAGS), env=env, stdout=fo, stderr=fe)
      )
  for p in procs:
    p.wait(timeout=900)
  outs = [(out.read_text(), err.read_text()) for out, err in logs]
  errors = "\n".join(f"process {i}:\n{err[-3000:]}" for i, (_, err) in enumerate(outs))
  assert [p.returncode for p in procs] == [0, 0], errors
  assert "in 2 processes" in outs[0][0]
  assert "step 1/2" in outs[0][0] and "step 1/2" not in outs[1][0]  # Process 0 logs.

  # Same episodes (rewards, lengths, searches) and the same updates, step by step.
  a, b = _train_rows(one), _train_rows(two)
  assert sorted(a) == sorted(b) == [1, 2]
  for step in a:
    for key in ("reward/score", "response_length", "search/per_trajectory"):
      assert a[step][key] == pytest.approx(b[step][key], abs=1e-6), (step, key)
    for key in ("loss", "grad_norm", "entropy", "kl"):
      assert a[step][key] == pytest.approx(b[step][key], abs=1e-5), (step, key)
  assert max(r["grad_norm"] for r in a.values()) > 1e-3  # Real updates, not only weight decay.
  # Each process wrote its own episodes; together they are the one-process step.
  records = sorted(p.name for p in (two / "trajectories").iterdir())
  assert records[:2] == ["step_000001.process_0.jsonl", "step_000001.process_1.jsonl"]
  ids_one = [json.loads(x)["id"] for x in (one / "trajectories" / "step_000001.jsonl").open()]
  ids_two = [
    json.loads(x)["id"]
    for name in records[:2]
    for x in (two / "trajectories" / name).read_text().splitlines()
  ]
  assert sorted(ids_one) == sorted(ids_two)

  # The saved parameters after the last step agree.
  _, _, _, pa = evaluate.load_checkpoint(str(one / "checkpoints"), 2)
  _, _, _, pb = evaluate.load_checkpoint(str(two / "checkpoints"), 2)
  diff = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), pa, pb)
  assert max(jax.tree.leaves(diff)) <= 1e-5
  # Process 0 evaluated on the whole test split and wrote the summary.
  summary = json.loads((two / "summary.json").read_text())
  assert (
    summary["eval_with_search"]["samples"]
    == json.loads((one / "summary.json").read_text())["eval_with_search"]["samples"]
  )


def test_global_positions_deal_round_robin():
  # Local row j of process k is global row j * processes + k.
  np.testing.assert_array_equal(pipeline.global_positions(3, 1, 2), [1, 3, 5])
  rows = np.sort(np.concatenate([pipeline.global_positions(3, k, 2) for k in range(2)]))
  np.testing.assert_array_equal(rows, np.arange(6))
