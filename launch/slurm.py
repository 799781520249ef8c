#!/usr/bin/env python3
r"""Writes a SLURM batch script that trains segresearch_jax on GPU nodes, and submits it.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 --time=24:00:00 --partition=gpu \
        --account=my-project --config=configs/okvos.py:paper \
        --text_corpus=/data/local_KB/text_corpus.jsonl \
        -- --config.model.hf_dir=/ckpt/Qwen3-VL-4B-Instruct

One trainer process per node drives all of that node's GPUs. The script exports, for
`jax.distributed.initialize()` in the trainer:

  SEGRESEARCH_COORDINATOR    first node of the allocation and a port, `host:port`
  SEGRESEARCH_NUM_PROCESSES  $SLURM_NTASKS of the trainer step (= nodes)
  SEGRESEARCH_PROCESS_ID     $SLURM_PROCID of each task

With `--text_corpus` the search service runs on the first node (its own `srun` step
sharing the allocation) and every trainer uses it; `--search_url` points at one that
runs elsewhere. The service listens on 127.0.0.1 (one node) unless
`--search_listen=internal` asks for the first node's internal address (several
nodes), and requires a token the script draws at run time and hands to every step
through the environment (`SEGRESEARCH_SEARCH_TOKEN`), never a command line.

Everything after `--` goes to the trainer unchanged. `--dry_run` prints the script
and the `sbatch` command instead of writing and submitting.
Standard library only, so it runs on a login node without the package installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys


def _matching(pattern: str, what: str):
  """An argparse `type` that accepts strings matching `pattern`, with a clear error."""

  def check(value: str) -> str:
    if not re.fullmatch(pattern, value):
      raise argparse.ArgumentTypeError(f"{value!r} is not a valid {what}")
    return value

  return check


def _port(value: str) -> str:
  if not value.isdigit() or not 1 <= int(value) <= 65535:
    raise argparse.ArgumentTypeError(f"{value!r} is not a port in [1, 65535]")
  return value


_POSITIVE = _matching(r"[1-9][0-9]*", "positive integer")
_NAME = r"[A-Za-z0-9_.+-]+"  # Job, partition and account names: no spaces, no newlines.


def _search_block(args: argparse.Namespace, log_dir: str) -> list[str]:
  """Shell lines that define SEARCH_URL (and start the service when asked)."""
  if args.search_url:
    return ["", f"SEARCH_URL={shlex.quote(args.search_url)}"]
  if not args.text_corpus:
    return []
  service = [args.python, "-u", "-m", "segresearch_jax.search.service"]
  service += [f"--port={args.search_port}", f"--text_corpus={args.text_corpus}"]
  service.append(f"--method={args.method}")
  for flag in ("image_corpus", "images_dir", "dense_model"):
    if getattr(args, flag):
      service.append(f"--{flag}={getattr(args, flag)}")
  if args.dense_prefixes:
    service.append("--dense_prefixes")
  # The batch script runs on the first node, so its first address is that node's.
  if args.search_listen == "internal":
    host = "SEARCH_HOST=$(hostname -I | awk '{print $1}')"
  else:
    host = "SEARCH_HOST=127.0.0.1"
  health = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)"
  tries = max(1, int(args.search_wait_s) // 5)
  search_log = shlex.quote(f"{log_dir}/search-") + '"$SLURM_JOB_ID".log'
  return [
    "",
    "# The search service on the first node: a step that shares the allocation (--overlap)",
    "# and stays on CPU, so the trainer keeps every GPU. Its token is drawn here and",
    "# reaches every step through the environment, never a command line.",
    host,
    "export SEGRESEARCH_SEARCH_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n')",
    'srun --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --overlap \\',
    f"  --output={search_log} \\",
    f'  env CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu {shlex.join(service)} --host="$SEARCH_HOST" &',
    "SEARCH_PID=$!",
    f'SEARCH_URL="http://$SEARCH_HOST:{args.search_port}"',
    f'search_up() {{ {shlex.quote(args.python)} -c {shlex.quote(health)} "$SEARCH_URL/health" 2>/dev/null; }}',
    f"for _ in $(seq {tries}); do",
    '  search_up || ! kill -0 "$SEARCH_PID" 2>/dev/null && break',
    "  sleep 5",
    "done",
    f'search_up || {{ echo "No search service at $SEARCH_URL; see "{search_log} >&2; exit 1; }}',
  ]


def render_script(args: argparse.Namespace, trainer_flags: list[str]) -> str:
  """The sbatch script for `args`, with `trainer_flags` passed to every trainer."""
  repo_dir = os.path.abspath(args.repo_dir)
  log_dir = os.path.join(repo_dir, args.log_dir)
  directives = [
    f"--job-name={args.job_name}",
    f"--nodes={args.nodes}",
    "--ntasks-per-node=1",
    f"--gpus-per-node={args.gpus_per_node}",
    f"--time={args.time}",
    f"--output={log_dir}/%x-%j.out",
  ]
  for key in ("cpus_per_task", "partition", "account"):
    if getattr(args, key):
      directives.append(f"--{key.replace('_', '-')}={getattr(args, key)}")
  directives += args.sbatch_arg
  port = args.coordinator_port or "$((SLURM_JOB_ID % 4096 + 61440))"
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
  lines += [
    "# Written by launch/slurm.py.",
    f"cd {shlex.quote(repo_dir)}",
    *args.env_setup,
    "set -euo pipefail",
    "",
    "# For jax.distributed.initialize(): task 0 runs on the first node, which coordinates.",
    "# The default port comes from the job id, so two jobs sharing a node do not collide.",
    'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    f'export SEGRESEARCH_COORDINATOR="$HEAD_NODE:{port}"',
  ]
  lines += _search_block(args, log_dir)
  train = [args.python, "-u", "-m", "segresearch_jax.train", f"--config={args.config}"]
  search_flags = ""
  if args.search_url or args.text_corpus:
    search_flags = ' --config.search.backend=service --config.search.service_url="$SEARCH_URL"'
  # `bash -c '...' trainer ARGV`: the per-task variables expand in each task, while
  # ARGV (quoted here) reaches the trainer exactly as given.
  per_task = (
    'export SEGRESEARCH_NUM_PROCESSES="$SLURM_NTASKS" SEGRESEARCH_PROCESS_ID="$SLURM_PROCID";'
    ' exec "$@"'
  )
  passed = f" \\\n  {shlex.join(trainer_flags)}" if trainer_flags else ""
  lines += [
    "",
    "# One trainer per node (log per task: %t = process id); a failed task ends the step.",
    "status=0",
    'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
    f"  --output={shlex.quote(f'{log_dir}/train-%j-%t.log')} \\",
    f"  bash -c {shlex.quote(per_task)} trainer \\",
    f"  {shlex.join(train)}{search_flags}{passed} || status=$?",
  ]
  if args.text_corpus:
    lines.append('kill "$SEARCH_PID" 2>/dev/null || true')
  lines.append('exit "$status"')
  return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nodes", type=_POSITIVE, required=True)
  parser.add_argument("--gpus_per_node", type=_POSITIVE, required=True)
  parser.add_argument(
    "--time", required=True, type=_matching(r"([0-9]+-)?[0-9]+(:[0-9]+){0,2}", "SLURM time")
  )
  parser.add_argument("--partition", default=None, type=_matching(_NAME, "partition"))
  parser.add_argument("--account", default=None, type=_matching(_NAME, "account"))
  parser.add_argument("--cpus_per_task", default=None, type=_POSITIVE, help="CPUs per node.")
  parser.add_argument("--job_name", default="segresearch", type=_matching(_NAME, "job name"))
  parser.add_argument(
    "--sbatch_arg",
    action="append",
    default=[],
    type=_matching(r"--[a-z][-a-z]*(=\S+)?", "sbatch option (e.g. --constraint=a100)"),
    help="An extra #SBATCH option, e.g. --qos=high; repeatable.",
  )
  parser.add_argument(
    "--env_setup",
    action="append",
    default=[],
    help="A shell line run before training (module load, source venv); repeatable, verbatim.",
  )
  parser.add_argument("--repo_dir", default=".", help="The checkout on the cluster.")
  parser.add_argument("--log_dir", default="logs/slurm", help="Relative to --repo_dir.")
  parser.add_argument("--python", default="python")
  parser.add_argument("--config", default="configs/okvos.py", help="Config file[:preset].")
  parser.add_argument("--coordinator_port", default=None, type=_port)
  search = parser.add_mutually_exclusive_group()
  search.add_argument("--text_corpus", default=None, help="Start the service on the first node.")
  search.add_argument("--search_url", default=None, type=_matching(r"https?://\S+", "search URL"))
  parser.add_argument("--image_corpus", default=None)
  parser.add_argument("--images_dir", default=None)
  parser.add_argument("--method", default="dense", choices=("bm25", "dense", "hybrid"))
  parser.add_argument("--dense_model", default=None)
  parser.add_argument("--dense_prefixes", action="store_true", help="e5 query/passage prefixes.")
  parser.add_argument(
    "--search_listen",
    default="local",
    choices=("local", "internal"),
    help="local: 127.0.0.1 (one node); internal: the first node's address (several nodes).",
  )
  parser.add_argument("--search_port", default="8765", type=_port)
  parser.add_argument("--search_wait_s", default="600", type=_POSITIVE)
  parser.add_argument("--dry_run", action="store_true", help="Print the script, submit nothing.")
  return parser


def main(argv: list[str] | None = None) -> None:
  """Parses `argv` (flags after `--` go to the trainer), writes the script, submits it."""
  argv = sys.argv[1:] if argv is None else list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = build_parser()
  args = parser.parse_args(argv[:split])
  trainer_flags = argv[split + 1 :]
  if any(f == "--config" or f.startswith("--config=") for f in trainer_flags):
    parser.error("give the config file with --config=..., not after `--`")
  if any(s.isspace() for s in os.path.join(os.path.abspath(args.repo_dir), args.log_dir)):
    parser.error("the log directory must not contain whitespace (it goes into #SBATCH --output)")
  if (args.image_corpus or args.images_dir or args.dense_model) and not args.text_corpus:
    parser.error("--image_corpus/--images_dir/--dense_model need --text_corpus")
  if args.text_corpus and int(args.nodes) > 1 and args.search_listen == "local":
    parser.error(
      "a search service on 127.0.0.1 is reachable from the first node only; with "
      "--nodes > 1 pass --search_listen=internal"
    )
  script = render_script(args, trainer_flags)
  log_dir = os.path.join(os.path.abspath(args.repo_dir), args.log_dir)
  path = os.path.join(log_dir, f"{args.job_name}.sbatch")
  if args.dry_run:
    print(script + f"# Submit with:\n{shlex.join(['sbatch', path])}")
    return
  os.makedirs(log_dir, exist_ok=True)  # SLURM does not create the --output directory.
  with open(path, "w") as f:
    f.write(script)
  try:
    subprocess.run(["sbatch", path], check=True)
  except FileNotFoundError:
    sys.exit(f"error: sbatch not found; run on a SLURM login node (script left at {path}).")
  except subprocess.CalledProcessError as e:
    sys.exit(f"error: sbatch exited with status {e.returncode} (script at {path}).")


if __name__ == "__main__":
  main()
