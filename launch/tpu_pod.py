#!/usr/bin/env python3
r"""Runs segresearch_jax on a Cloud TPU VM (single host or pod) through `gcloud`.

    python launch/tpu_pod.py create --name=okvos --zone=us-central2-b --accelerator_type=v4-32
    python launch/tpu_pod.py setup --name=okvos --zone=us-central2-b \
        --repo=https://github.com/ORG/segresearch_jax
    python launch/tpu_pod.py serve_search --name=okvos --zone=us-central2-b \
        --text_corpus=/data/local_KB/text_corpus.jsonl
    python launch/tpu_pod.py run --name=okvos --zone=us-central2-b --config=configs/okvos.py:paper \
        --search_url=http://10.130.0.2:8765 -- --config.model.hf_dir=/ckpt/Qwen3-VL-4B-Instruct
    python launch/tpu_pod.py logs --name=okvos --zone=us-central2-b --follow
    python launch/tpu_pod.py stop|delete --name=okvos --zone=us-central2-b

Everything after `--` goes to the trainer unchanged. `--dry_run` prints every command
instead of running it. Commands are argv lists; every user value inside a remote
shell command is shlex-quoted. Standard library only, so it runs on a laptop
without the package installed.

Secrets never go on a command line or into a message: `run --env KEY=VALUE` values
and the search service's token travel in env files copied with `gcloud scp` (mode
600 on the workers) that the remote command sources. The search service binds
127.0.0.1 (reachable from worker 0 only) unless `serve_search --internal` asks for
worker 0's internal address, and always requires the token, which `run` passes on.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile

# Default TPU VM runtime per accelerator family (`--version` overrides).
_RUNTIMES = {
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}
_REMOTE_TARBALL = "segresearch_jax-src.tar.gz"  # In the remote home directory.
_WORKER0_IP = "<worker-0-internal-ip>"  # Stands for the looked-up address in dry runs.
# Env files in the remote home directory, sourced by the remote commands.
_SEARCH_ENV = ".segresearch-search.env"  # The search service token (every worker).
_RUN_ENV = ".segresearch-run.env"  # `run --env` values.
_TOKEN_VAR = "SEGRESEARCH_SEARCH_TOKEN"


def _matching(pattern: str, what: str):
  """An argparse `type` that accepts strings matching `pattern`, with a clear error."""

  def check(value: str) -> str:
    if not re.fullmatch(pattern, value):
      raise argparse.ArgumentTypeError(f"{value!r} is not a valid {what}")
    return value

  return check


def _env_assignment(value: str) -> str:
  """An argparse `type` for KEY=VALUE whose error never shows the value (it may be a key)."""
  if not re.fullmatch(r"[A-Za-z_]\w*=.*", value, re.DOTALL):
    name = value.split("=", 1)[0]
    raise argparse.ArgumentTypeError(f"{name[:40]!r}=... is not a valid KEY=VALUE")
  return value


def _port(value: str) -> int:
  if not value.isdigit() or not 1 <= int(value) <= 65535:
    raise argparse.ArgumentTypeError(f"{value!r} is not a port in [1, 65535]")
  return int(value)


def _quote_path(path: str) -> str:
  """shlex-quotes a remote path but keeps a leading `~/` for the remote shell to expand."""
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  return shlex.quote(path)


class _Runner:
  """Runs argv lists, or only prints them (`dry_run`); never shows a secret."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run
    self.secrets: list[str] = []

  def mask(self, text: str) -> str:
    for secret in self.secrets:
      text = text.replace(secret, "***")
    return text

  def __call__(self, argv: list[str], *, capture: bool = False, dry_value: str = "") -> str:
    if self.dry_run:
      print(self.mask(shlex.join(argv)))
      return dry_value
    try:
      done = subprocess.run(argv, check=True, text=True, capture_output=capture)
    except FileNotFoundError:
      sys.exit(f"error: {argv[0]!r} not found; install the Google Cloud CLI (gcloud).")
    except subprocess.CalledProcessError as e:
      message = f"error: exit status {e.returncode} from: {shlex.join(argv)}\n{e.stderr or ''}"
      sys.exit(self.mask(message))
    return (done.stdout or "").strip()


def _ship_env(
  args: argparse.Namespace, run: _Runner, values: dict[str, str], remote_name: str, worker: str
) -> None:
  """Copies `export KEY=VALUE` lines to `~/remote_name` on the workers, never via argv.

  The local file is private (mode 600) and removed after the copy; a dry run prints
  the copy command with a placeholder instead of writing anything.
  """
  run.secrets += [v for v in values.values() if v]
  if run.dry_run:
    placeholder = f"<env file: {', '.join(values)}>"
    run(_gcloud(args, "scp", placeholder, f"{args.name}:{remote_name}") + [f"--worker={worker}"])
    return
  fd, path = tempfile.mkstemp(prefix="segresearch-", suffix=".env")
  try:
    with os.fdopen(fd, "w") as f:  # mkstemp files are mode 600.
      f.writelines(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())
    run(_gcloud(args, "scp", path, f"{args.name}:{remote_name}") + [f"--worker={worker}"])
  finally:
    os.unlink(path)


def _source(remote_name: str, *, required: bool) -> str:
  """Shell that makes the env file private and loads it (skipped if absent and optional)."""
  path = f"~/{remote_name}"
  load = f"chmod 600 {path} && set -a && . {path} && set +a"
  return f"{load} && " if required else f"{{ [ ! -f {path} ] || {{ {load}; }}; }} && "


def _gcloud(args: argparse.Namespace, verb: str, *words: str) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB WORDS... --zone=Z [--project=P]`."""
  argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *words, f"--zone={args.zone}"]
  return argv + ([f"--project={args.project}"] if args.project else [])


def _ssh(args: argparse.Namespace, worker: str, command: str) -> list[str]:
  return _gcloud(args, "ssh", args.name) + [f"--worker={worker}", f"--command={command}"]


def _background(command: str, log: str, pid: str) -> str:
  """Detaches `command` (nohup) so it outlives the ssh session; its pid goes to `pid`."""
  return f"{{ nohup {command} > {log} 2>&1 < /dev/null & echo $! > {pid}; }}"


def _in_repo(args: argparse.Namespace, command: str) -> str:
  log_dir = _quote_path(args.log_dir)
  return f"cd {_quote_path(args.repo_dir)} && mkdir -p {log_dir} && {command}"


def cmd_create(args: argparse.Namespace, run: _Runner) -> None:
  version = args.version or _RUNTIMES.get(args.accelerator_type.rsplit("-", 1)[0])
  if not version:
    sys.exit(f"error: no default runtime for {args.accelerator_type}; pass --version.")
  spot = ["--spot"] if args.spot else []
  run(
    _gcloud(
      args,
      "create",
      args.name,
      f"--accelerator-type={args.accelerator_type}",
      f"--version={version}",
      *spot,
    )
  )


def cmd_setup(args: argparse.Namespace, run: _Runner) -> None:
  repo = _quote_path(args.repo_dir)
  if args.repo:
    fetch = (
      f"{{ [ -d {repo}/.git ] || git clone {shlex.quote(args.repo)} {repo}; }}"
      f" && git -C {repo} fetch origin {shlex.quote(args.ref)}"
      f" && git -C {repo} checkout --detach FETCH_HEAD"
    )
  else:  # Ship the local tree (uncommitted edits included) to every worker.
    if not os.path.isfile(os.path.join(args.local_dir, "setup.py")):
      sys.exit(
        f"error: --local_dir={args.local_dir} is not a segresearch_jax checkout (no setup.py)."
      )
    tarball = os.path.join(tempfile.gettempdir(), f"segresearch_jax-{args.name}.tar.gz")
    excludes = [".git", "runs", "logs", "__pycache__", "*.egg-info", ".pytest_cache"]
    run(["tar", "-czf", tarball, *(f"--exclude={e}" for e in excludes), "-C", args.local_dir, "."])
    run(_gcloud(args, "scp", tarball, f"{args.name}:{_REMOTE_TARBALL}") + ["--worker=all"])
    fetch = f"mkdir -p {repo} && tar -xzf ~/{_REMOTE_TARBALL} -C {repo} && rm ~/{_REMOTE_TARBALL}"
  py = shlex.quote(args.python)
  install = (
    f"cd {repo} && {py} -m pip install -U pip"
    f" && {py} -m pip install -e {shlex.quote(f'.[{args.extras}]')}"
    f" && SAM2_BUILD_CUDA=0 {py} -m pip install --no-build-isolation 'sam2>=1.1'"
  )
  run(_ssh(args, "all", f"{fetch} && {install}"))


def cmd_serve_search(args: argparse.Namespace, run: _Runner) -> None:
  describe = _gcloud(args, "describe", args.name, "--format=value(networkEndpoints[0].ipAddress)")
  ip = run(describe, capture=True, dry_value=_WORKER0_IP) if args.internal else "127.0.0.1"
  # A fresh shared secret per service: every worker gets it, the trainers send it.
  _ship_env(args, run, {_TOKEN_VAR: secrets.token_urlsafe(24)}, _SEARCH_ENV, "all")
  service = [args.python, "-u", "-m", "segresearch_jax.search.service", f"--host={ip}"]
  service += [f"--port={args.port}", f"--text_corpus={args.text_corpus}", f"--method={args.method}"]
  for flag in ("image_corpus", "images_dir", "dense_model"):
    if getattr(args, flag):
      service.append(f"--{flag}={getattr(args, flag)}")
  if args.dense_prefixes:
    service.append("--dense_prefixes")
  log_dir = _quote_path(args.log_dir)
  # JAX on CPU: a service that touched the TPU would lock worker 0's chips.
  command = shlex.join(["env", "JAX_PLATFORMS=cpu", *service])
  background = _background(command, f"{log_dir}/search.log", f"{log_dir}/search.pid")
  run(_ssh(args, "0", _source(_SEARCH_ENV, required=True) + _in_repo(args, background)))
  url = f"http://{ip}:{args.port}"
  print(f"# Search service on worker 0: {url} (log: {args.log_dir}/search.log on worker 0)")
  if not args.internal:
    print("# It listens on 127.0.0.1: only worker 0 reaches it (use --internal for a pod).")
  print(f"# Pass to `run`: --search_url={url}")


def cmd_run(args: argparse.Namespace, run: _Runner) -> None:
  train = [args.python, "-u", "-m", "segresearch_jax.train", f"--config={args.config}"]
  if args.search_url:
    train += ["--config.search.backend=service", f"--config.search.service_url={args.search_url}"]
  prefix = _source(_SEARCH_ENV, required=False)  # The service token, when there is one.
  if args.env:
    _ship_env(args, run, dict(e.split("=", 1) for e in args.env), _RUN_ENV, "all")
    prefix += _source(_RUN_ENV, required=True)
  # Every worker joins one JAX job (the trainer calls jax.distributed.initialize()).
  command = shlex.join(["env", "SEGRESEARCH_DISTRIBUTED=1", *train, *args.trainer_flags])
  log_dir = _quote_path(args.log_dir)
  log = f"{log_dir}/train-$(hostname).log"  # Worker hostnames end in -w-<index>.
  if args.foreground:
    remote = f"set -o pipefail && {command} 2>&1 | tee {log}"
  else:
    remote = _background(command, log, f"{log_dir}/train-$(hostname).pid")
  run(_ssh(args, "all", prefix + _in_repo(args, remote)))


def cmd_logs(args: argparse.Namespace, run: _Runner) -> None:
  pattern = "search.log" if args.search else "train-*.log"
  tail = f"tail -n {args.lines}{' -F' if args.follow else ''} {_quote_path(args.log_dir)}/{pattern}"
  run(_ssh(args, args.worker, f"cd {_quote_path(args.repo_dir)} && {tail}"))


def cmd_stop(args: argparse.Namespace, run: _Runner) -> None:
  log_dir = _quote_path(args.log_dir)
  pid = f"{log_dir}/search.pid" if args.search else f"{log_dir}/train-$(hostname).pid"
  kill = f'if [ -f {pid} ]; then kill "$(cat {pid})"; rm -f {pid}; fi'
  run(_ssh(args, "0" if args.search else "all", f"cd {_quote_path(args.repo_dir)} && {kill}"))


def cmd_delete(args: argparse.Namespace, run: _Runner) -> None:
  run(_gcloud(args, "delete", args.name))  # gcloud asks for confirmation itself.


_COMMANDS = {
  "create": cmd_create,
  "setup": cmd_setup,
  "serve_search": cmd_serve_search,
  "run": cmd_run,
  "logs": cmd_logs,
  "stop": cmd_stop,
  "delete": cmd_delete,
}


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser: one subcommand per step of a pod's life."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
    "--name", required=True, type=_matching(r"[a-z]([-a-z0-9]*[a-z0-9])?", "TPU name")
  )
  common.add_argument("--zone", required=True, type=_matching(r"[a-z]+-[a-z]+[0-9]+-[a-z]", "zone"))
  common.add_argument("--project", default="", help="GCP project; empty = gcloud's default.")
  common.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  remote = argparse.ArgumentParser(add_help=False, parents=[common])
  remote.add_argument("--repo_dir", default="segresearch_jax", help="On workers, from ~.")
  remote.add_argument("--log_dir", default="logs", help="On workers, relative to --repo_dir.")
  remote.add_argument("--python", default="python3")

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("create", parents=[common], help="Create the TPU VM.")
  p.add_argument(
    "--accelerator_type",
    required=True,
    type=_matching(r"v[0-9]+[a-z]*-[0-9]+", "accelerator type (e.g. v4-32)"),
  )
  p.add_argument("--version", default="", help="TPU runtime; default by accelerator family.")
  p.add_argument("--spot", action="store_true", help="A spot (preemptible) TPU.")
  p = sub.add_parser(
    "setup", parents=[remote], help="Fetch the code and pip install on all workers."
  )
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--repo", help="A git URL every worker clones.")
  source.add_argument("--local_dir", help="A local checkout, tarred and copied with scp.")
  p.add_argument("--ref", default="HEAD", help="With --repo: the branch, tag or commit.")
  p.add_argument("--extras", default="dev,tpu", type=_matching(r"[a-z0-9_,-]+", "extras list"))
  p = sub.add_parser("serve_search", parents=[remote], help="Start the search service on worker 0.")
  p.add_argument("--text_corpus", required=True, help="Path on worker 0.")
  p.add_argument("--image_corpus", default="")
  p.add_argument("--images_dir", default="")
  p.add_argument("--method", default="dense", choices=("bm25", "dense", "hybrid"))
  p.add_argument("--dense_model", default="")
  p.add_argument(
    "--dense_prefixes", action="store_true", help="e5 query/passage prefixes (e5 model)."
  )
  p.add_argument("--port", type=_port, default=8765)
  p.add_argument(
    "--internal",
    action="store_true",
    help="Listen on worker 0's internal address (other workers connect) instead of 127.0.0.1.",
  )
  p = sub.add_parser("run", parents=[remote], help="Start the trainer on all workers.")
  p.add_argument("--config", default="configs/okvos.py", help="Config file[:preset].")
  p.add_argument("--search_url", default=None, type=_matching(r"https?://\S+", "search URL"))
  p.add_argument(
    "--env",
    action="append",
    default=[],
    type=_env_assignment,
    help="An environment variable for the trainer (secrets welcome: shipped in a file).",
  )
  p.add_argument("--foreground", action="store_true", help="Stream output instead of detaching.")
  p = sub.add_parser("logs", parents=[remote], help="Tail the trainer (or search) log.")
  p.add_argument("--worker", default="0", type=_matching(r"all|[0-9]+", "worker (index or 'all')"))
  p.add_argument("--lines", type=_matching(r"[1-9][0-9]*", "line count"), default="100")
  p.add_argument("--follow", action="store_true")
  p.add_argument("--search", action="store_true", help="The search service log (worker 0).")
  p = sub.add_parser("stop", parents=[remote], help="Stop the trainer on all workers.")
  p.add_argument("--search", action="store_true", help="Stop the search service instead.")
  sub.add_parser("delete", parents=[common], help="Delete the TPU VM.")
  for name, command_fn in _COMMANDS.items():
    sub.choices[name].set_defaults(command_fn=command_fn)
  return parser


def main(argv: list[str] | None = None) -> None:
  """Parses `argv` (flags after `--` go to the trainer) and runs the subcommand."""
  argv = sys.argv[1:] if argv is None else list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = build_parser()
  args = parser.parse_args(argv[:split])
  args.trainer_flags = argv[split + 1 :]
  if args.trainer_flags and args.command != "run":
    parser.error(f"flags after `--` only go with `run`, not `{args.command}`")
  if any(f == "--config" or f.startswith("--config=") for f in args.trainer_flags):
    parser.error("give the config file with `run --config=...`, not after `--`")
  args.command_fn(args, _Runner(args.dry_run))


if __name__ == "__main__":
  main()
