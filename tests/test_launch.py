"""The TPU pod and SLURM launchers: dry-run commands, and their shell run for real.

Remote commands and batch scripts are executed here with bash against a fake
`python` (and fake `srun` / `scontrol` / `sbatch`) that record what they receive, so
the tests pin the quoting and the per-process environment, not just the text.
"""

import importlib.util
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZONE = ["--name=okvos", "--zone=us-central2-b", "--dry_run"]
FLAGS = ["--config.data.okvos_dir=/data/OK VOS", "--config.x=a=b", "--config.model.hf_dir", "/c k"]


def _load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu_pod = _load("tpu_pod")
slurm = _load("slurm")

# Records its argv and the SEGRESEARCH_* / chosen env to $FAKE_OUT/<role>-<procid>.json.
_FAKE_PYTHON = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
if args[0] == "-c":  # The batch script's health probe: up once the service has started.
  sys.exit(0 if os.path.exists(os.path.join(os.environ["FAKE_OUT"], "search-0.json")) else 1)
role = "search" if "segresearch_jax.search.service" in args else "train"
env = {{k: v for k, v in os.environ.items() if k.startswith(("SEGRESEARCH_", "XLA_", "JAX_"))}}
env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
name = f"{{role}}-{{os.environ.get('SLURM_PROCID', '0')}}.json"
with open(os.path.join(os.environ["FAKE_OUT"], name), "w") as f:
  json.dump({{"argv": args, "env": env}}, f)
print(f"fake {{role}} ran")
if role == "search":
  time.sleep(60)  # Serves until the batch script kills it.
sys.exit(int(os.environ.get("FAKE_TRAIN_RC", "0")))
"""

# Runs the command once per task with SLURM_PROCID / SLURM_NTASKS, output per %j/%t.
_FAKE_SRUN = """#!{python}
import os, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
  key, _, value = args.pop(0)[2:].partition("=")
  opts[key] = value.strip('"')
ntasks = int(opts.get("ntasks") or int(opts["nodes"]) * int(opts["ntasks-per-node"]))
output = opts["output"].replace("%j", os.environ["SLURM_JOB_ID"])
rc = 0
for task in range(ntasks):
  env = dict(os.environ, SLURM_PROCID=str(task), SLURM_NTASKS=str(ntasks))
  if ntasks == 1 and "ntasks" in opts:  # A single backgrounded step: become it.
    os.execvpe(args[0], args, env)
  with open(output.replace("%t", str(task)), "w") as log:
    rc = max(rc, subprocess.run(args, env=env, stdout=log, stderr=log).returncode)
sys.exit(rc)
"""


def _executable(path, text):
  path.write_text(text.format(python=sys.executable))
  path.chmod(0o755)
  return str(path)


@pytest.fixture
def fakes(tmp_path):
  """A bin dir with fake python/srun/scontrol/sbatch, and the folder they report to."""
  bin_dir, out = tmp_path / "bin", tmp_path / "out"
  bin_dir.mkdir()
  out.mkdir()
  _executable(bin_dir / "python", _FAKE_PYTHON)
  _executable(bin_dir / "srun", _FAKE_SRUN)
  _executable(bin_dir / "scontrol", "#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
  _executable(bin_dir / "sbatch", '#!/bin/sh\necho "$@" > "$FAKE_OUT/sbatch.txt"\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(out))
  return bin_dir, out, env


def _dry(module, argv, capsys):
  """The commands a dry run prints, each split back into argv."""
  module.main(argv)
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line[:1] != "#"]


def _remote(argv):
  (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  return command


def _wait_for(path, timeout_s=20.0):
  deadline = time.monotonic() + timeout_s
  while not path.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert path.exists(), f"{path} never appeared"


# ----------------------------------------------------------------------------
# TPU pod.
# ----------------------------------------------------------------------------


def test_tpu_create_argv(capsys):
  (argv,) = _dry(tpu_pod, ["create", *ZONE, "--accelerator_type=v4-32", "--spot"], capsys)
  assert argv == [
    *"gcloud compute tpus tpu-vm create okvos".split(),
    "--accelerator-type=v4-32",
    "--version=tpu-ubuntu2204-base",
    "--spot",
    "--zone=us-central2-b",
  ]
  (argv,) = _dry(
    tpu_pod,
    ["create", *ZONE, "--accelerator_type=v5litepod-16", "--project=my-proj"],
    capsys,
  )
  assert "--version=v2-alpha-tpuv5-lite" in argv and argv[-1] == "--project=my-proj"
  assert "--spot" not in argv


def test_tpu_create_unknown_family_needs_version(capsys):
  with pytest.raises(SystemExit, match="pass --version"):
    tpu_pod.main(["create", *ZONE, "--accelerator_type=v3-8"])
  (argv,) = _dry(
    tpu_pod, ["create", *ZONE, "--accelerator_type=v3-8", "--version=v2-alpha"], capsys
  )
  assert "--version=v2-alpha" in argv


def test_tpu_setup_from_git(capsys):
  (argv,) = _dry(
    tpu_pod, ["setup", *ZONE, "--repo=https://example.com/a b.git", "--ref=v1.0"], capsys
  )
  assert argv[:7] == [*"gcloud compute tpus tpu-vm ssh okvos".split(), "--zone=us-central2-b"]
  assert "--worker=all" in argv
  remote = _remote(argv)
  assert "git clone 'https://example.com/a b.git' segresearch_jax" in remote
  assert "fetch origin v1.0" in remote and "checkout --detach FETCH_HEAD" in remote
  assert "python3 -m pip install -e '.[dev,tpu]'" in remote
  assert "SAM2_BUILD_CUDA=0 python3 -m pip install --no-build-isolation 'sam2>=1.1'" in remote


def test_tpu_setup_from_local_dir_ships_a_tarball(tmp_path, capsys):
  src = tmp_path / "src"
  (src / ".git").mkdir(parents=True)
  (src / ".git" / "HEAD").write_text("x")
  (src / "setup.py").write_text("")
  (src / "segresearch_jax").mkdir()
  (src / "segresearch_jax" / "train.py").write_text("")
  tar, scp, ssh = _dry(tpu_pod, ["setup", *ZONE, f"--local_dir={src}"], capsys)
  assert scp[4:6] == ["scp", tar[2]] and scp[6] == "okvos:segresearch_jax-src.tar.gz"
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert "tar -xzf ~/segresearch_jax-src.tar.gz -C segresearch_jax" in _remote(ssh)
  # The tar command itself, run here, leaves .git out and keeps the code.
  tar[2] = str(tmp_path / "src.tar.gz")
  subprocess.run(tar, check=True)
  names = subprocess.run(["tar", "-tzf", tar[2]], capture_output=True, text=True).stdout
  assert "./segresearch_jax/train.py" in names and ".git" not in names


def test_tpu_setup_rejects_non_checkout(tmp_path):
  with pytest.raises(SystemExit, match="not a segresearch_jax checkout"):
    tpu_pod.main(["setup", *ZONE, f"--local_dir={tmp_path}"])


# Stands in for gcloud: logs its argv, copies `scp` sources into $HOME, runs `ssh`
# commands with bash from $HOME, answers `describe` with an address; FAKE_GCLOUD_FAIL
# makes every call fail the way gcloud does, echoing its argv on stderr.
_FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_OUT"], "gcloud.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_GCLOUD_FAIL"):
  sys.stderr.write("ERROR: (gcloud) failed: " + " ".join(args) + "\\n")
  sys.exit(1)
verb = args[3]
if verb == "scp":
  shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
elif verb == "ssh":
  (command,) = [a[len("--command="):] for a in args if a.startswith("--command=")]
  sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode)
elif verb == "describe":
  print("10.1.2.3")
"""


@pytest.fixture
def gcloud(tmp_path, fakes, monkeypatch):
  """Real (not dry) launcher runs against the fake gcloud, with $HOME as every worker's."""
  bin_dir, out, env = fakes
  _executable(bin_dir / "gcloud", _FAKE_GCLOUD)
  home = tmp_path / "home"
  home.mkdir()
  for key in ("PATH", "FAKE_OUT"):
    monkeypatch.setenv(key, env[key])
  monkeypatch.setenv("HOME", str(home))
  return bin_dir, out, home


def _gcloud_calls(out):
  path = out / "gcloud.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


REMOTE = ["--name=okvos", "--zone=us-central2-b"]


@pytest.mark.parametrize("internal", [False, True])
def test_tpu_serve_search_on_worker_0(tmp_path, gcloud, capsys, internal):
  bin_dir, out, home = gcloud
  argv = ["serve_search", *REMOTE, f"--repo_dir={tmp_path}", f"--python={bin_dir}/python"]
  argv += ["--text_corpus=/kb dir/t.jsonl", "--method=bm25", "--port=9000"]
  argv += ["--internal"] if internal else []
  tpu_pod.main(argv)
  host = "10.1.2.3" if internal else "127.0.0.1"
  printed = capsys.readouterr().out
  assert f"--search_url=http://{host}:9000" in printed
  calls = _gcloud_calls(out)
  assert [c[3] for c in calls] == (["describe"] if internal else []) + ["scp", "ssh"]
  scp, ssh = calls[-2:]
  assert "--worker=all" in scp and "--worker=0" in ssh  # The token goes to every worker.
  _wait_for(out / "search-0.json")
  record = json.loads((out / "search-0.json").read_text())
  assert record["argv"][3:] == [
    f"--host={host}",
    "--port=9000",
    "--text_corpus=/kb dir/t.jsonl",
    "--method=bm25",
  ]
  assert record["env"]["JAX_PLATFORMS"] == "cpu"
  # A fresh token reached the service through the env file, never a command line.
  token = record["env"]["SEGRESEARCH_SEARCH_TOKEN"]
  assert len(token) >= 24 and token not in json.dumps(calls) and token not in printed
  assert (home / ".segresearch-search.env").stat().st_mode & 0o777 == 0o600
  pid = int((tmp_path / "logs" / "search.pid").read_text())
  (stop,) = _dry(tpu_pod, ["stop", *ZONE, f"--repo_dir={tmp_path}", "--search"], capsys)
  assert "--worker=0" in stop
  subprocess.run(["bash", "-c", _remote(stop)], check=True, timeout=30)
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline and _alive(pid):
    time.sleep(0.05)
  assert not _alive(pid)


def test_tpu_serve_search_dry_run_shows_no_token(capsys):
  argv = ["serve_search", *ZONE, "--text_corpus=t.jsonl", "--internal", "--dense_prefixes"]
  describe, scp, ssh = _dry(tpu_pod, argv, capsys)
  assert describe[4:6] == ["describe", "okvos"]
  assert "--format=value(networkEndpoints[0].ipAddress)" in describe
  assert scp[5] == "<env file: SEGRESEARCH_SEARCH_TOKEN>"
  remote = _remote(ssh)
  assert "'--host=<worker-0-internal-ip>'" in remote and "--dense_prefixes" in remote
  assert "0.0.0.0" not in remote


def _alive(pid):
  """Whether `pid` still runs (a zombie waiting for its reaper counts as ended)."""
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
  except FileNotFoundError:
    return False


SECRET = "sk-serper-0123456789abcdef"


@pytest.mark.parametrize("foreground", [False, True])
def test_tpu_run_passes_flags_and_secrets_exactly(tmp_path, gcloud, capsys, foreground):
  bin_dir, out, home = gcloud
  (home / ".segresearch-search.env").write_text("export SEGRESEARCH_SEARCH_TOKEN=tok\n")
  argv = ["run", *REMOTE, f"--repo_dir={tmp_path}", f"--python={bin_dir}/python"]
  argv += ["--config=configs/okvos.py:paper", "--search_url=http://10.0.0.2:8765"]
  argv += ["--env", "XLA_FLAGS=--a --b", "--env", f"SEGRESEARCH_KEY={SECRET} 'x'"]
  argv += [*(["--foreground"] if foreground else []), "--", *FLAGS]
  tpu_pod.main(argv)
  calls = _gcloud_calls(out)
  assert [c[3] for c in calls] == ["scp", "ssh"]
  zone = "--zone=us-central2-b"
  assert calls[1][:7] == [*"compute tpus tpu-vm ssh okvos".split(), zone, "--worker=all"]
  _wait_for(out / "train-0.json")
  record = json.loads((out / "train-0.json").read_text())
  assert record["argv"] == [
    "-u",
    "-m",
    "segresearch_jax.train",
    "--config=configs/okvos.py:paper",
    "--config.search.backend=service",
    "--config.search.service_url=http://10.0.0.2:8765",
    *FLAGS,
  ]
  assert record["env"]["XLA_FLAGS"] == "--a --b"
  assert record["env"]["SEGRESEARCH_KEY"] == f"{SECRET} 'x'"
  assert record["env"]["SEGRESEARCH_SEARCH_TOKEN"] == "tok"  # The service's token.
  assert SECRET not in json.dumps(calls) and SECRET not in str(capsys.readouterr())
  log = tmp_path / "logs" / f"train-{socket.gethostname()}.log"
  deadline = time.monotonic() + 20
  while "fake train ran" not in (log.read_text() if log.exists() else ""):
    assert time.monotonic() < deadline, "the per-worker log never got the output"
    time.sleep(0.05)
  assert (log.with_suffix(".pid")).exists() != foreground


def test_tpu_run_never_prints_secrets(tmp_path, gcloud, capsys, monkeypatch):
  _, out, _ = gcloud
  monkeypatch.setenv("FAKE_GCLOUD_FAIL", "1")
  with pytest.raises(SystemExit) as e:
    tpu_pod.main(["run", *REMOTE, "--env", f"SERPER_API_KEY={SECRET}"])
  assert "exit status 1" in str(e.value) and SECRET not in str(e.value)
  assert SECRET not in str(capsys.readouterr())
  assert SECRET not in json.dumps(_gcloud_calls(out))
  scp, ssh = _dry(tpu_pod, ["run", *ZONE, "--env", f"SERPER_API_KEY={SECRET}"], capsys)
  assert scp[5] == "<env file: SERPER_API_KEY>" and SECRET not in _remote(ssh)
  with pytest.raises(SystemExit):
    tpu_pod.main(["run", *ZONE, "--env", f"1BAD={SECRET}"])
  assert SECRET not in capsys.readouterr().err


def test_tpu_logs_stop_delete(capsys):
  (logs,) = _dry(tpu_pod, ["logs", *ZONE, "--worker=all", "--follow", "--lines=5"], capsys)
  assert "--worker=all" in logs
  assert _remote(logs) == "cd segresearch_jax && tail -n 5 -F logs/train-*.log"
  (stop,) = _dry(tpu_pod, ["stop", *ZONE, "--repo_dir=~/my code"], capsys)
  assert "--worker=all" in stop
  assert _remote(stop).startswith("cd ~/'my code' && ")
  (delete,) = _dry(tpu_pod, ["delete", *ZONE], capsys)
  assert delete == [*"gcloud compute tpus tpu-vm delete okvos".split(), "--zone=us-central2-b"]


@pytest.mark.parametrize(
  "argv, message",
  [
    (["create", "--name=Bad_Name", "--zone=us-central2-b", "--accelerator_type=v4-8"], "TPU name"),
    (["create", "--name=a", "--zone=central", "--accelerator_type=v4-8"], "valid zone"),
    (["create", *ZONE, "--accelerator_type=v4"], "accelerator type"),
    (["create", *ZONE], "--accelerator_type"),
    (["setup", *ZONE], "one of the arguments --repo --local_dir is required"),
    (["setup", *ZONE, "--repo=u", "--local_dir=."], "not allowed with"),
    (["run", *ZONE, "--search_url=10.0.0.2:8765"], "search URL"),
    (["run", *ZONE, "--env=1X=2"], "KEY=VALUE"),
    (["run", *ZONE, "--", "--config=configs/okvos.py"], "not after `--`"),
    (["logs", *ZONE, "--", "--config.x=1"], "only go with `run`"),
    (["logs", *ZONE, "--worker=w0"], "worker"),
    (["serve_search", *ZONE, "--text_corpus=t", "--port=70000"], "--port"),
    (["serve_search", *ZONE, "--text_corpus=t", "--method=tfidf"], "invalid choice"),
    (["launch", *ZONE], "invalid choice"),
  ],
)
def test_tpu_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    tpu_pod.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------
# SLURM.
# ----------------------------------------------------------------------------

SLURM = ["--nodes=2", "--gpus_per_node=8", "--time=1-00:00:00", "--dry_run"]


def _script(argv, capsys):
  slurm.main(argv)
  text = capsys.readouterr().out
  script, submit = text.split("# Submit with:\n")
  return script, shlex.split(submit)


def test_slurm_directives_and_submit_command(tmp_path, capsys):
  argv = [*SLURM, "--partition=gpu", "--account=proj-1", "--cpus_per_task=32"]
  argv += ["--sbatch_arg=--qos=high", f"--repo_dir={tmp_path}", "--job_name=okvos"]
  script, submit = _script(argv, capsys)
  directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
  assert directives == [
    "--job-name=okvos",
    "--nodes=2",
    "--ntasks-per-node=1",
    "--gpus-per-node=8",
    "--time=1-00:00:00",
    f"--output={tmp_path}/logs/slurm/%x-%j.out",
    "--cpus-per-task=32",
    "--partition=gpu",
    "--account=proj-1",
    "--qos=high",
  ]
  assert submit == ["sbatch", f"{tmp_path}/logs/slurm/okvos.sbatch"]
  assert not (tmp_path / "logs").exists()  # A dry run writes nothing.
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def _run_script(script, env, **extra):
  env = dict(env, SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2")
  env.update(extra)
  return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_slurm_script_runs_search_and_one_trainer_per_node(tmp_path, fakes, capsys):
  bin_dir, out, env = fakes
  argv = [*SLURM, f"--repo_dir={tmp_path}", f"--python={bin_dir}/python", "--method=bm25"]
  argv += ["--text_corpus=/kb dir/t.jsonl", "--config=configs/okvos.py:paper"]
  argv += ["--search_listen=internal", "--", *FLAGS]
  script, _ = _script(argv, capsys)
  (tmp_path / "logs" / "slurm").mkdir(parents=True)  # main() makes it when submitting.
  done = _run_script(script, env)
  assert done.returncode == 0, done.stderr
  # The batch script runs on the first node: the service binds that node's address.
  host = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
  search = json.loads((out / "search-0.json").read_text())
  assert search["argv"][3:] == [
    "--port=8765",
    "--text_corpus=/kb dir/t.jsonl",
    "--method=bm25",
    f"--host={host}",
  ]
  assert search["env"]["CUDA_VISIBLE_DEVICES"] == "" and search["env"]["JAX_PLATFORMS"] == "cpu"
  token = search["env"]["SEGRESEARCH_SEARCH_TOKEN"]
  assert len(token) >= 24 and token not in script
  for process_id in range(2):
    record = json.loads((out / f"train-{process_id}.json").read_text())
    assert {k: v for k, v in record["env"].items() if k.startswith("SEGRESEARCH_")} == {
      "SEGRESEARCH_COORDINATOR": f"node-a:{1234 % 4096 + 61440}",
      "SEGRESEARCH_NUM_PROCESSES": "2",
      "SEGRESEARCH_PROCESS_ID": str(process_id),
      "SEGRESEARCH_SEARCH_TOKEN": token,
    }
    assert record["argv"] == [
      "-u",
      "-m",
      "segresearch_jax.train",
      "--config=configs/okvos.py:paper",
      "--config.search.backend=service",
      f"--config.search.service_url=http://{host}:8765",
      *FLAGS,
    ]
    log = tmp_path / "logs" / "slurm" / f"train-1234-{process_id}.log"
    assert log.read_text() == "fake train ran\n"


def test_slurm_script_given_search_url_and_trainer_failure(tmp_path, fakes, capsys):
  bin_dir, out, env = fakes
  argv = [*SLURM, f"--repo_dir={tmp_path}", f"--python={bin_dir}/python"]
  argv += ["--search_url=http://kb-host:9000", "--coordinator_port=5000"]
  script, _ = _script(argv, capsys)
  assert "segresearch_jax.search.service" not in script
  (tmp_path / "logs" / "slurm").mkdir(parents=True)
  done = _run_script(script, env, FAKE_TRAIN_RC="3")
  assert done.returncode == 3  # The batch job fails when the trainer does.
  record = json.loads((out / "train-1.json").read_text())
  assert record["env"]["SEGRESEARCH_COORDINATOR"] == "node-a:5000"
  assert record["argv"][-1] == "--config.search.service_url=http://kb-host:9000"
  assert not (out / "search-0.json").exists()


def test_slurm_without_search_leaves_the_config_alone(capsys):
  script, _ = _script(SLURM, capsys)
  assert "search.backend" not in script and "SEARCH_URL" not in script


def test_slurm_submits_with_sbatch(tmp_path, fakes):
  _, out, env = fakes
  argv = ["--nodes=1", "--gpus_per_node=1", "--time=30", f"--repo_dir={tmp_path}"]
  launcher = [sys.executable, str(ROOT / "launch" / "slurm.py"), *argv, "--", "--config.x=1"]
  subprocess.run(launcher, env=env, check=True, timeout=60)
  path = tmp_path / "logs" / "slurm" / "segresearch.sbatch"
  assert (out / "sbatch.txt").read_text().split() == [str(path)]
  assert "--config.x=1" in path.read_text()


def test_slurm_without_sbatch_says_so(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(SystemExit, match="sbatch not found"):
    slurm.main(["--nodes=1", "--gpus_per_node=1", "--time=30", f"--repo_dir={tmp_path}"])


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--nodes=0", "--gpus_per_node=1", "--time=10"], "positive integer"),
    (["--nodes=1", "--time=10"], "--gpus_per_node"),
    (["--nodes=1", "--gpus_per_node=1", "--time=1h"], "SLURM time"),
    ([*SLURM, "--partition=gpu a"], "partition"),
    ([*SLURM, "--sbatch_arg=exclusive"], "sbatch option"),
    ([*SLURM, "--text_corpus=t", "--search_url=http://h:1"], "not allowed with"),
    ([*SLURM, "--image_corpus=i"], "need --text_corpus"),
    ([*SLURM, "--text_corpus=t"], "pass --search_listen=internal"),
    ([*SLURM, "--text_corpus=t", "--search_listen=0.0.0.0"], "invalid choice"),
    ([*SLURM, "--search_port=70000"], "not a port"),
    ([*SLURM, "--coordinator_port=0"], "not a port"),
    ([*SLURM, "--repo_dir=/a b"], "whitespace"),
    ([*SLURM, "--", "--config", "x.py"], "not after `--`"),
  ],
)
def test_slurm_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    slurm.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_slurm_single_node_service_listens_on_localhost(capsys):
  argv = ["--nodes=1", "--gpus_per_node=1", "--time=30", "--dry_run", "--text_corpus=t.jsonl"]
  script, _ = _script([*argv, "--dense_model=/ckpt/e5", "--dense_prefixes"], capsys)
  assert "SEARCH_HOST=127.0.0.1" in script and "0.0.0.0" not in script
  assert '--dense_prefixes --host="$SEARCH_HOST"' in script
