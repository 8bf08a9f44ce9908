"""Training on a Cloud TPU VM slice (one host or a pod slice): the commands a user runs.

  python tools/tpu_pod.py create --tpu-name NAME --zone ZONE --accelerator-type v6e-256 [--spot]
                                 [--queued] [--runtime-version V] [--project P]
  python tools/tpu_pod.py setup  --tpu-name NAME --zone ZONE [--data gs://BUCKET/corpus.jsonl]
                                 [--repo-url URL --ref REF]
  python tools/tpu_pod.py train  --tpu-name NAME --zone ZONE [--env KEY=VALUE ...] [--force] --
                                 --config configs/flash_sft_edit.py --workdir gs://BUCKET/run
                                 [--config.key=value ...]
  python tools/tpu_pod.py logs   --tpu-name NAME --zone ZONE [--out DIR | --tail N [--worker W]]
  python tools/tpu_pod.py watch  (the create, setup and train flags) [--max-restarts N] [--poll S]
  python tools/tpu_pod.py stop   --tpu-name NAME --zone ZONE [--grace S | --now]
  python tools/tpu_pod.py delete --tpu-name NAME --zone ZONE [--queued]

Every subcommand takes --dry-run: it prints the commands it would run, one per line (shell-quoted
with shlex.join), and runs nothing. Bad or missing flags print one line and exit with status 2.

What runs where, in the manner of MaxText's multihost_runner: `gcloud compute tpus tpu-vm ssh
--worker=all --command=...` runs one shell line on every host of the slice, `tpu-vm scp
--worker=all` copies to (or from) every host. On the hosts, paths are relative to the login
user's home directory:

  llada_jax/      the copied checkout (a tarball of --repo, or a `git clone` of --repo-url)
  llada_venv/     a Python 3.11 virtual environment made by uv (the TPU VM images ship Python
                  3.10; jax 0.10.2 needs 3.11), with `pip install -e ".[tpu]"` of the checkout
  llada_data/     data copied by `setup --data` (gsutil -m cp -r, or scp of a local path)
  gcs/BUCKET/     gcsfuse mounts: every gs:// path in the trainer's arguments (the workdir, a
                  data source, an init_from checkpoint) is mounted and passed as this path,
                  because the trainer reads and writes with ordinary file I/O
  llada_logs/     train-HOSTNAME.log (appended per launch), train.pid, exit_code, stopped

`train` starts `python -m llada_jax.train ...` under nohup + setsid on every host (so an SSH
disconnect does not end it) with LLADA_DISTRIBUTED=auto: `jax.distributed.initialize()` finds
the other hosts of the slice by itself. `stop` sends SIGTERM (the trainer finishes its step,
saves a checkpoint and exits 75), then SIGKILL after --grace seconds. `watch` polls the TPU's
state and, when it is preempted (PREEMPTED, TERMINATED, a SUSPENDED or FAILED queued resource,
or the VM gone), deletes and recreates it, reruns setup and the same train command; the
trainer resumes from the last checkpoint in its workdir, which therefore has to outlive the VM
(gs://..., mounted with gcsfuse).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Argv = list[str]
Runner = Callable[[Argv], int]

# Runtime (software) versions per TPU generation, from Google's TPU runtime version table.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ACCELERATOR_RE = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")  # region-zone, e.g. us-central2-b
NAME_RE = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
PROJECT_RE = re.compile(r"^(?:[a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
GS_RE = re.compile(r"^gs://([a-z0-9][-a-z0-9_.]{1,220}[a-z0-9])(?:/(.*))?$")

# Queued-resource and TPU node states (TPU API v2), as `watch` reads them.
HEALTHY = frozenset({"READY", "ACTIVE"})
GONE = frozenset({"NOT_FOUND", "PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED"})
STOPPED = frozenset({"STOPPED", "STOPPING"})
# Everything else (CREATING, STARTING, RESTARTING, REPAIRING, PROVISIONING, WAITING_FOR_RESOURCES,
# ACCEPTED, SUSPENDING, DELETING, UNKNOWN when describe itself failed) is waited out.

TAR_EXCLUDES = (".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", ".venv",
                ".jax_cache", "./build", "./dist", "./out")
REMOTE_TARBALL = "llada_jax-src.tar.gz"
STATUS_TAG = "LLADA_STATUS"
PREEMPTED_EXIT = 75  # llada_jax.train's exit status after SIGTERM (checkpoint saved)


class UsageError(ValueError):
  """A bad or missing flag: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Pod:
  """The TPU slice and the layout on its hosts."""
  name: str
  zone: str
  project: str | None = None
  queued: bool = False  # a queued resource (same id as the node) rather than a plain TPU VM
  internal_ip: bool = False
  accelerator_type: str | None = None
  runtime_version: str | None = None
  spot: bool = False
  create_args: tuple[str, ...] = ()
  remote_dir: str = "llada_jax"
  venv: str = "llada_venv"
  log_dir: str = "llada_logs"
  data_dir: str = "llada_data"
  gcs_mount: str = "gcs"
  python_version: str = "3.11"


@dataclasses.dataclass(frozen=True)
class Source:
  """What `setup` puts on the hosts: a tarball of a local checkout or a git clone."""
  repo: str = ROOT
  repo_url: str | None = None
  ref: str | None = None
  excludes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Data:
  """`setup --data`: a gs:// path (copied or mounted) or a local path (copied with scp)."""
  path: str
  mode: str = "copy"  # copy | mount


@dataclasses.dataclass(frozen=True)
class TrainJob:
  """The trainer command, as the hosts run it (paths already mapped to the hosts)."""
  args: tuple[str, ...]  # after `python -m llada_jax.train`
  env: tuple[tuple[str, str], ...] = (("LLADA_DISTRIBUTED", "auto"),)
  buckets: tuple[str, ...] = ()  # gcsfuse mounts it needs
  workdir: str = ""  # as given (gs://... or a path)


# ------------------------------------------------------------------------------------- helpers


def q(s: str) -> str:
  return shlex.quote(s)


def _dotted(path: str) -> str:
  """A host path as a pip requirement path (`./x` for a relative one)."""
  return path if path.startswith(("/", ".")) else "./" + path


def _home_abs(path: str) -> str:
  """A bash word for a host path, made absolute against $HOME when relative."""
  return q(path) if path.startswith("/") else '"$HOME"/' + q(path)


def gcs_local(pod: Pod, uri: str) -> tuple[str, str]:
  """(bucket, host path under the gcsfuse mount) of a gs:// URI."""
  m = GS_RE.match(uri)
  if not m:
    raise UsageError(f"{uri!r} is not a gs://BUCKET[/PATH] URI")
  bucket, rest = m.group(1), (m.group(2) or "").strip("/")
  return bucket, "/".join(p for p in (pod.gcs_mount, bucket, rest) if p)


def _location(pod: Pod) -> Argv:
  return [f"--zone={pod.zone}"] + ([f"--project={pod.project}"] if pod.project else [])


def _tpu_vm(pod: Pod, verb: str) -> Argv:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb]


def ssh(pod: Pod, script: str, worker: str = "all") -> Argv:
  """`gcloud compute tpus tpu-vm ssh NAME --worker=W --command=SCRIPT` (one shell line)."""
  return (_tpu_vm(pod, "ssh") + [pod.name] + _location(pod) + [f"--worker={worker}"]
          + (["--internal-ip"] if pod.internal_ip else [])
          + ["--strict-host-key-checking=no", f"--command={script}"])


def scp(pod: Pod, src: str, dst: str, worker: str = "all", recurse: bool = False) -> Argv:
  """`gcloud compute tpus tpu-vm scp SRC DST --worker=W` (NAME:path names a host path)."""
  return (_tpu_vm(pod, "scp") + (["--recurse"] if recurse else []) + [src, dst] + _location(pod)
          + [f"--worker={worker}"] + (["--internal-ip"] if pod.internal_ip else [])
          + ["--strict-host-key-checking=no"])


def runtime_version(pod: Pod) -> str:
  if pod.runtime_version:
    return pod.runtime_version
  m = ACCELERATOR_RE.match(pod.accelerator_type or "")
  gen = m.group(1) if m else ""
  if gen not in RUNTIME_VERSIONS:
    raise UsageError(f"no default runtime version for accelerator type "
                     f"{pod.accelerator_type!r}: pass --runtime-version")
  return RUNTIME_VERSIONS[gen]


# ---------------------------------------------------------------------------- command builders


def create_commands(pod: Pod) -> list[Argv]:
  """Creates the TPU VM (`tpu-vm create`, blocks until READY) or queues a queued resource
  (`queued-resources create`, returns at once; the node appears when the state is ACTIVE)."""
  if not pod.accelerator_type:
    raise UsageError("--accelerator-type is required to create a TPU (e.g. v6e-256, v5p-256)")
  version = runtime_version(pod)
  spot = ["--spot"] if pod.spot else []
  if pod.queued:
    cmd = (["gcloud", "compute", "tpus", "queued-resources", "create", pod.name,
            f"--node-id={pod.name}"] + _location(pod)
           + [f"--accelerator-type={pod.accelerator_type}", f"--runtime-version={version}"])
  else:
    cmd = (_tpu_vm(pod, "create") + [pod.name] + _location(pod)
           + [f"--accelerator-type={pod.accelerator_type}", f"--version={version}"])
  return [cmd + spot + list(pod.create_args)]


def delete_commands(pod: Pod) -> list[Argv]:
  """Deletes the TPU (a queued resource with --force, which deletes its node too)."""
  if pod.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", pod.name]
            + _location(pod) + ["--force", "--quiet"]]
  return [_tpu_vm(pod, "delete") + [pod.name] + _location(pod) + ["--quiet"]]


def recreate_commands(pod: Pod, exists: bool) -> list[Argv]:
  """After a preemption: a spot/preemptible TPU cannot be restarted, only deleted and created."""
  return (delete_commands(pod) if exists else []) + create_commands(pod)


def describe_command(pod: Pod) -> Argv:
  if pod.queued:
    return (["gcloud", "compute", "tpus", "queued-resources", "describe", pod.name]
            + _location(pod) + ["--format=value(state.state)"])
  return _tpu_vm(pod, "describe") + [pod.name] + _location(pod) + ["--format=value(state)"]


def _running_check(pod: Pod) -> str:
  """Shell: true when this host's training session is alive."""
  logs = q(pod.log_dir)
  return (f'[ -f {logs}/train.pid ] && kill -0 "$(cat {logs}/train.pid)" 2>/dev/null')


def _gcsfuse_script(pod: Pod, buckets: Sequence[str]) -> list[str]:
  """Shell steps: install gcsfuse if missing, mount each bucket (idempotent)."""
  if not buckets:
    return []
  lock = "-o DPkg::Lock::Timeout=600"
  steps = [
      "{ command -v gcsfuse >/dev/null || { curl -fsSL "
      "https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "
      "/usr/share/keyrings/cloud.google.asc >/dev/null && echo \"deb "
      "[signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
      "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list "
      f">/dev/null && sudo apt-get {lock} update -q && sudo apt-get {lock} install -y -q "
      "gcsfuse; }; }"]
  for b in sorted(set(buckets)):
    mnt = _home_abs(f"{pod.gcs_mount}/{b}")
    # --rename-dir-limit: orbax commits a checkpoint by renaming its temporary directory.
    steps.append(f"mkdir -p {mnt} && {{ mountpoint -q {mnt} || gcsfuse --implicit-dirs "
                 f"--rename-dir-limit=200000 {q(b)} {mnt}; }}")
  return steps


def tarball_path(pod: Pod) -> str:
  return os.path.join(tempfile.gettempdir(), f"llada_jax-{pod.name}.tar.gz")


def setup_commands(pod: Pod, source: Source, data: Data | None = None) -> list[Argv]:
  """Copies the code to every host, installs it with the TPU extra, copies or mounts the data."""
  rdir, venv = pod.remote_dir, pod.venv
  refuse = (f"if {_running_check(pod)}; then echo \"$(hostname): a training session is running; "
            f"run stop first\" >&2; exit 1; fi")
  cmds: list[Argv] = []
  if source.repo_url:
    fetch = (f"rm -rf {q(rdir + '.new')} && git clone --quiet {q(source.repo_url)} "
             f"{q(rdir + '.new')}")
    if source.ref:
      fetch += f" && git -C {q(rdir + '.new')} checkout --quiet {q(source.ref)}"
  else:
    tarball = tarball_path(pod)
    cmds.append(["tar", "-czf", tarball]
                + [f"--exclude={p}" for p in TAR_EXCLUDES + tuple(source.excludes)]
                + ["-C", source.repo, "."])
    cmds.append(scp(pod, tarball, f"{pod.name}:{REMOTE_TARBALL}"))
    fetch = (f"rm -rf {q(rdir + '.new')} && mkdir -p {q(rdir + '.new')} && tar -xzf "
             f"{REMOTE_TARBALL} -C {q(rdir + '.new')} && rm -f {REMOTE_TARBALL}")
  py = f"{venv}/bin/python"
  install = [
      refuse,
      fetch,
      f"rm -rf {q(rdir)} && mv {q(rdir + '.new')} {q(rdir)}",
      # uv: a Python >= 3.11 whatever the image has (tpu-ubuntu2204 images ship 3.10).
      "{ python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv "
      "|| python3 -m pip install --user --quiet --break-system-packages uv; }",
      f"{{ [ -x {q(py)} ] || python3 -m uv venv --quiet --python {q(pod.python_version)} "
      f"{q(venv)}; }}",
      f"python3 -m uv pip install --quiet --python {q(py)} -e {q(_dotted(rdir) + '[tpu]')}",
      f"{q(py)} -c 'import jax, llada_jax'",
      f"mkdir -p {q(pod.log_dir)} {q(pod.data_dir)}",
  ]
  cmds.append(ssh(pod, "set -e; " + "; ".join(install)
                  + "; echo \"$(hostname): llada_jax installed\""))
  if data is not None:
    if data.path.startswith("gs://"):
      if data.mode == "mount":
        bucket, _ = gcs_local(pod, data.path)
        cmds.append(ssh(pod, " && ".join(_gcsfuse_script(pod, [bucket]))))
      else:
        cmds.append(ssh(pod, f"gsutil -m -q cp -r {q(data.path.rstrip('/'))} "
                             f"{q(pod.data_dir + '/')}"))
    else:
      cmds.append(scp(pod, os.path.abspath(data.path), f"{pod.name}:{pod.data_dir}/",
                      recurse=os.path.isdir(data.path)))
  return cmds


def data_location(pod: Pod, data: Data) -> str:
  """Where `setup --data` puts the data on every host (relative to the home directory)."""
  if data.path.startswith("gs://") and data.mode == "mount":
    return gcs_local(pod, data.path)[1]
  base = os.path.basename(data.path.rstrip("/"))
  return f"{pod.data_dir}/{base}"


def parse_trainer_args(pod: Pod, args: Sequence[str], repo: str = ROOT,
                       cwd: str | None = None) -> tuple[TrainJob, list[str]]:
  """The trainer's arguments (after `--`) as the hosts run them, and warnings.

  `--config FILE` must exist locally inside `repo` (the checkout copied to the hosts) and is
  passed relative to the host copy; `--workdir` is required; every gs:// value is mounted with
  gcsfuse and replaced by the mount path.
  """
  cwd = cwd or os.getcwd()
  args = list(args)
  if not args:
    raise UsageError("give the trainer's arguments after `--`: -- --config configs/NAME.py "
                     "--workdir gs://BUCKET/PATH [--config.key=value ...]")
  out: list[str] = []
  buckets: list[str] = []
  config = workdir = None
  i = 0
  while i < len(args):
    a = args[i]
    flag, value, joined = a, None, False
    for name in ("--config", "--workdir"):
      if a == name:
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
          raise UsageError(f"{name} needs a value")
        value, i = args[i + 1], i + 1
        flag = name
      elif a.startswith(name + "="):
        flag, value, joined = name, a[len(name) + 1:], True
    if flag == "--config":
      if config is not None:
        raise UsageError("--config is given twice")
      config = value
      path = value if os.path.isabs(value) else os.path.join(cwd, value)
      if not os.path.isfile(path) and not os.path.isabs(value):
        path = os.path.join(repo, value)
      if not os.path.isfile(path):
        raise UsageError(f"--config {value}: no such file")
      rel = os.path.relpath(os.path.realpath(path), os.path.realpath(repo))
      if rel.startswith(".."):
        raise UsageError(f"--config {value} is outside the checkout copied to the hosts ({repo})")
      value = f"{pod.remote_dir}/{rel}"
    elif flag == "--workdir":
      if workdir is not None:
        raise UsageError("--workdir is given twice")
      if not value:
        raise UsageError("--workdir needs a value")
      workdir = value
    if value is None:
      # Any other argument: map gs:// values (`--config.init_from=gs://...`, `--export_hf ...`).
      if "=" in a and a.startswith("--") and a.split("=", 1)[1].startswith("gs://"):
        k, v = a.split("=", 1)
        b, local = gcs_local(pod, v)
        buckets.append(b)
        a = f"{k}={local}"
      elif a.startswith("gs://"):
        b, a = gcs_local(pod, a)
        buckets.append(b)
      out.append(a)
    else:
      if value.startswith("gs://"):
        b, value = gcs_local(pod, value)
        buckets.append(b)
      out.extend([f"{flag}={value}"] if joined else [flag, value])
    i += 1
  if config is None:
    raise UsageError("the trainer's arguments need --config FILE (e.g. configs/flash_sft_edit.py)")
  if workdir is None:
    raise UsageError("the trainer's arguments need --workdir (gs://BUCKET/PATH, so that the run "
                     "survives a preemption)")
  warnings = []
  if not workdir.startswith("gs://"):
    warnings.append(
        f"warning: --workdir {workdir} is on the hosts' own disks: a preempted TPU VM loses it "
        "with the checkpoints to resume from, and the hosts of a slice do not share it; use "
        "gs://BUCKET/PATH unless it is a persistent disk or shared filesystem on every host")
  if "--no_progress" not in out and "--noprogress" not in out:
    out.append("--no_progress")  # a progress bar is noise in a log file
  return TrainJob(tuple(out), buckets=tuple(dict.fromkeys(buckets)), workdir=workdir), warnings


def _stop_script(pod: Pod, grace: int, mark: bool) -> str:
  """Shell: SIGTERM this host's trainer, wait up to `grace` s, then SIGKILL; free the TPU."""
  logs = q(pod.log_dir)
  return (f"if {_running_check(pod)}; then p=$(cat {logs}/train.pid); "
          + (f"touch {logs}/stopped; " if mark else "")
          + "kill -TERM $p || true; i=0; while kill -0 $p 2>/dev/null && "
          f"[ $i -lt {int(grace)} ]; do sleep 1; i=$((i+1)); done; "
          "if kill -0 $p 2>/dev/null; then kill -KILL $p || true; "
          "echo \"$(hostname): killed $p\"; else echo \"$(hostname): stopped $p\"; fi; "
          "else echo \"$(hostname): no training session\"; fi; sudo rm -f /tmp/libtpu_lockfile")


def train_commands(pod: Pod, job: TrainJob, force: bool = False, grace: int = 300) -> list[Argv]:
  """Starts the same trainer command on every host, detached (nohup + setsid, a log file per
  host); refuses where a session is already running unless `force` (then stops it first and
  kills whatever else holds the TPU, as MaxText's runner does)."""
  logs = q(pod.log_dir)
  env = " ".join(f"{k}={q(v)}" for k, v in job.env)
  python = q(f"{pod.venv}/bin/python")
  trainer = " ".join([python, "-m", "llada_jax.train"] + [q(a) for a in job.args])
  wrapper = (f"echo \"== llada_jax.train on $(hostname), $(date -u)\"; export {env}; "
             f"{trainer} & echo $! > {logs}/train.pid; wait $!; rc=$?; "
             f"echo $rc > {logs}/exit_code; echo \"== exit status $rc, $(date -u)\"")
  if force:
    before = (_stop_script(pod, grace, mark=False) + "; sudo lsof -t /dev/accel* /dev/vfio/* "
              "2>/dev/null | sort -u | xargs -r sudo kill -9")
  else:
    before = (f"if {_running_check(pod)}; then echo \"$(hostname): a training session is "
              "already running; run stop first (or train --force)\" >&2; exit 1; fi")
  steps = ([f"mkdir -p {logs}", before] + _gcsfuse_script(pod, job.buckets)
           + [f"rm -f {logs}/exit_code {logs}/stopped {logs}/train.pid"])
  launch = (f"nohup setsid bash -c {q(wrapper)} >> {logs}/train-\"$(hostname)\".log 2>&1 "
            f"< /dev/null & echo \"$(hostname): started, log {pod.log_dir}/train-$(hostname).log\"")
  return [ssh(pod, "set -e; " + "; ".join(steps) + "; " + launch)]


def status_command(pod: Pod) -> Argv:
  """Every host prints `LLADA_STATUS HOST STATE`: running, stopped, exit:N, lost or none."""
  logs = q(pod.log_dir)
  script = (f"if [ -f {logs}/stopped ]; then s=stopped; elif [ -f {logs}/exit_code ]; then "
            f"s=exit:$(cat {logs}/exit_code); elif {_running_check(pod)}; then s=running; "
            f"elif [ -f {logs}/train.pid ]; then s=lost; else s=none; fi; "
            f"echo \"{STATUS_TAG} $(hostname) $s\"")
  return ssh(pod, script)


def stop_commands(pod: Pod, grace: int = 300) -> list[Argv]:
  return [ssh(pod, _stop_script(pod, grace, mark=True))]


def logs_commands(pod: Pod, out: str | None = None, tail: int | None = None,
                  worker: str = "all") -> list[Argv]:
  """Copies every host's log folder into `out` (per-host file names), or tails the logs."""
  logs = q(pod.log_dir)
  if tail:
    return [ssh(pod, f"h=$(hostname); tail -n {int(tail)} {logs}/train-\"$h\".log | "
                     "sed \"s/^/[$h] /\"", worker=worker)]
  out = out or os.path.join("logs", pod.name)
  return [["mkdir", "-p", out],
          scp(pod, f"{pod.name}:{pod.log_dir}", out, worker=worker, recurse=True)]


# ----------------------------------------------------------------------------- state and watch


def parse_state(returncode: int, stdout: str, stderr: str) -> str:
  """The state printed by `describe_command`, NOT_FOUND when the TPU is gone, UNKNOWN when
  describe failed otherwise (network, auth: waited out)."""
  if returncode == 0:
    return (stdout.strip().splitlines() or ["UNKNOWN"])[-1].strip() or "UNKNOWN"
  if "NOT_FOUND" in stderr or "not found" in stderr.lower():
    return "NOT_FOUND"
  return "UNKNOWN"


def classify(state: str) -> str:
  """healthy | gone (recreate) | stopped (someone stopped it) | wait."""
  if state in HEALTHY:
    return "healthy"
  if state in GONE:
    return "gone"
  if state in STOPPED:
    return "stopped"
  return "wait"


def aggregate_status(stdout: str) -> str:
  """One state for the job from the hosts' `LLADA_STATUS` lines: stopped | failed:N | running |
  done | preempted (the trainer exited 75, or vanished, on a live VM) | none | unknown."""
  states = [ln.split()[2] for ln in stdout.splitlines()
            if ln.startswith(STATUS_TAG + " ") and len(ln.split()) >= 3]
  if not states:
    return "unknown"
  codes = [s.split(":", 1)[1] for s in states if s.startswith("exit:")]
  if "stopped" in states:
    return "stopped"
  bad = [c for c in codes if c not in ("0", str(PREEMPTED_EXIT))]
  if bad:
    return f"failed:{bad[0]}"
  if "running" in states:
    return "running"
  if codes and len(codes) == len(states) and all(c == "0" for c in codes):
    return "done"
  if str(PREEMPTED_EXIT) in codes or "lost" in states:
    return "preempted"
  return "none"


def run_all(cmds: Sequence[Argv], runner: Runner) -> int:
  for cmd in cmds:
    rc = runner(cmd)
    if rc:
      return rc
  return 0


def watch(pod: Pod, *, setup: Sequence[Argv], train: Sequence[Argv], runner: Runner,
          state_fn: Callable[[], str], status_fn: Callable[[], str], max_restarts: int = 5,
          poll: float = 120.0, sleep: Callable[[float], None] = time.sleep,
          log: Callable[[str], None] | None = None, setup_retries: int = 3) -> int:
  """Keeps the job alive across preemptions; returns 0 when training finished (or was stopped
  with `stop`), 1 when it failed or the restarts ran out.

  Each poll reads the TPU's state. Gone (preempted, terminated, suspended, failed, deleted):
  delete what is left, create it again and, once it is healthy, rerun setup and train. Healthy:
  read the job's status on the hosts: running, finished, stopped, failed, or ended with exit
  status 75 (SIGTERM) / vanished while the VM lives (train again). A failed or ended job is
  confirmed at the next poll first, since hosts of a slice being preempted may exit before its
  state says PREEMPTED. A restart is any recreate or relaunch after the first start; at most
  `max_restarts` of them.
  """
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  restarts, started, need_launch, setup_failures = 0, False, False, 0
  suspect = None  # a failed/ended job status seen once, acted on when seen again

  def budget(reason: str) -> bool:
    nonlocal restarts, started
    if not started:  # the first start is free
      started = True
      return True
    if restarts >= max_restarts:
      log(f"watch: {reason}, but the {max_restarts} restarts (--max-restarts) are spent: "
          "giving up")
      return False
    restarts += 1
    log(f"watch: {reason}: restart {restarts}/{max_restarts}")
    return True

  while True:
    state = state_fn()
    kind = classify(state)
    if kind != "healthy":
      suspect = None
    if kind == "gone":
      if not budget(f"{pod.name} is {state}"):
        return 1
      rc = run_all(recreate_commands(pod, exists=state != "NOT_FOUND"), runner)
      if rc:
        log(f"watch: recreating {pod.name} failed (status {rc}); trying again")
      need_launch = True
    elif kind == "stopped":
      log(f"watch: {pod.name} is {state} (stopped outside watch): start or delete it; exiting")
      return 1
    elif kind == "healthy" and need_launch:
      rc = run_all(list(setup) + list(train), runner)
      if rc == 0:
        need_launch, setup_failures = False, 0
        log(f"watch: training started on {pod.name}")
      elif classify(state_fn()) == "healthy":
        setup_failures += 1
        if setup_failures >= setup_retries:
          log(f"watch: setup/train failed {setup_failures} times on a healthy {pod.name} "
              f"(status {rc}): exiting")
          return 1
        log(f"watch: setup/train failed (status {rc}); trying again")
    elif kind == "healthy":
      status = status_fn()
      if status.startswith("failed") or status == "preempted":
        if suspect != status:
          suspect = status
          log(f"watch: job status {status} on a {state} TPU; checking again at the next poll")
        elif status == "preempted":
          suspect = None
          if not budget("the trainer ended (exit 75 after SIGTERM, or vanished) on a live TPU"):
            return 1
          rc = run_all(train, runner)
          if rc and classify(state_fn()) == "healthy":
            log(f"watch: relaunching train failed (status {rc}): exiting")
            return 1
        else:
          log(f"watch: training failed (exit status {status.split(':', 1)[1]}); see "
              "`tpu_pod.py logs`; exiting")
          return 1
      else:
        suspect = None
        if status == "running":
          started = True
        elif status == "done":
          log("watch: training finished on every host")
          return 0
        elif status == "stopped":
          log("watch: training was stopped (tpu_pod.py stop); exiting")
          return 0
        elif status == "none":
          if not budget(f"no training session on {pod.name}"):
            return 1
          need_launch = True
          continue  # set up and launch now
        # "unknown": the hosts did not answer; ask again at the next poll
    sleep(poll)


def _capture(cmd: Argv) -> tuple[int, str, str]:
  try:
    p = subprocess.run(cmd, capture_output=True, text=True)
  except FileNotFoundError:
    return 127, "", f"{cmd[0]}: command not found"
  return p.returncode, p.stdout, p.stderr


def gcloud_state(pod: Pod) -> str:
  return parse_state(*_capture(describe_command(pod)))


def gcloud_status(pod: Pod) -> str:
  rc, out, _ = _capture(status_command(pod))
  return aggregate_status(out)


def subprocess_runner(cmd: Argv) -> int:
  """Runs one command, its output streaming to this terminal."""
  print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
  try:
    return subprocess.run(cmd).returncode
  except FileNotFoundError:
    print(f"error: {cmd[0]}: command not found", file=sys.stderr)
    return 127


# ------------------------------------------------------------------------------------- the CLI


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tpu-name", help="the TPU VM (and queued resource) name")
  p.add_argument("--zone", help="e.g. us-east5-b, europe-west4-a")
  p.add_argument("--project", help="default: gcloud's configured project")
  p.add_argument("--queued", action="store_true",
                 help="the TPU is a queued resource with the same id as its node")
  p.add_argument("--internal-ip", action="store_true",
                 help="ssh/scp over internal IPs (running from a VM in the same network)")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  g = p.add_argument_group("layout on the hosts (paths relative to the home directory)")
  g.add_argument("--remote-dir", default="llada_jax")
  g.add_argument("--venv", default="llada_venv")
  g.add_argument("--log-dir", default="llada_logs")
  g.add_argument("--data-dir", default="llada_data")
  g.add_argument("--gcs-mount", default="gcs", help="gcsfuse mounts go to GCS_MOUNT/BUCKET")


def _create_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("create")
  g.add_argument("--accelerator-type", help="e.g. v6e-8, v6e-256, v5p-256")
  g.add_argument("--runtime-version", help="default per generation: " + ", ".join(
      f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()))
  g.add_argument("--spot", action="store_true", help="a Spot TPU (cheaper, preemptible)")
  g.add_argument("--create-arg", action="append", default=[],
                 help="extra flag for gcloud's create, e.g. --create-arg=--reserved")


def _setup_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("setup")
  g.add_argument("--repo", default=ROOT, help="local checkout to copy (default: this one)")
  g.add_argument("--repo-url", help="git clone this on every host instead of copying --repo")
  g.add_argument("--ref", help="with --repo-url: the branch, tag or commit")
  g.add_argument("--exclude", action="append", default=[],
                 help="tar --exclude pattern for the copy (repeatable)")
  g.add_argument("--python-version", default="3.11", help="Python of the hosts' venv (uv)")
  g.add_argument("--data", help="gs://BUCKET/PATH or a local file/folder to put on every host")
  g.add_argument("--data-mode", choices=["copy", "mount"], default="copy",
                 help="gs:// data: copy to the hosts' disks (gsutil -m cp -r) or mount (gcsfuse)")


def _train_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("train (the trainer's own arguments go after `--`)")
  g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the trainer (repeatable); LLADA_DISTRIBUTED=auto "
                      "is set unless given")
  g.add_argument("--force", action="store_true",
                 help="stop a running session (and free the TPU) before starting")
  g.add_argument("--grace", type=int, default=300,
                 help="seconds a stopped trainer gets to save its checkpoint before SIGKILL")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="tools/tpu_pod.py", description=__doc__.strip().splitlines()[0])
  sub = p.add_subparsers(dest="command", parser_class=_Parser)
  c = sub.add_parser("create", help="create the TPU VM or queued resource")
  _common(c), _create_flags(c)
  d = sub.add_parser("delete", help="delete the TPU VM or queued resource")
  _common(d)
  s = sub.add_parser("setup", help="copy and install the code on every host, copy the data")
  _common(s), _setup_flags(s)
  t = sub.add_parser("train", help="start the trainer on every host (args after --)")
  _common(t), _train_flags(t)
  t.add_argument("--repo", default=ROOT, help="the local checkout that setup copied (--config "
                                              "is checked in it)")
  lg = sub.add_parser("logs", help="copy the hosts' logs here, or tail them")
  _common(lg)
  lg.add_argument("--out", help="local folder (default logs/TPU_NAME)")
  lg.add_argument("--tail", type=int, help="print the last N lines of each host's log instead")
  lg.add_argument("--worker", default="all", help="all (default) or a worker index")
  w = sub.add_parser("watch", help="recreate, set up and restart training after preemptions")
  _common(w), _create_flags(w), _setup_flags(w), _train_flags(w)
  w.add_argument("--max-restarts", type=int, default=5)
  w.add_argument("--poll", type=float, default=120.0, help="seconds between state polls")
  st = sub.add_parser("stop", help="stop the training session on every host")
  _common(st)
  st.add_argument("--grace", type=int, default=300,
                  help="seconds to wait after SIGTERM (checkpoint) before SIGKILL")
  st.add_argument("--now", action="store_true", help="SIGKILL at once (no checkpoint)")
  return p


def _check_remote_path(flag: str, path: str) -> None:
  if (not re.match(r"^[A-Za-z0-9._/-]+$", path) or path.strip("/.") == ""
      or ".." in path.split("/")):
    raise UsageError(f"{flag} {path!r}: give a path relative to the home directory (or absolute) "
                     "of letters, digits and . _ - /, without '..'")


def _pod_from(a: argparse.Namespace) -> Pod:
  if not a.tpu_name:
    raise UsageError("--tpu-name is required")
  if not NAME_RE.match(a.tpu_name):
    raise UsageError(f"--tpu-name {a.tpu_name!r}: lowercase letters, digits and '-', starting "
                     "with a letter (at most 63)")
  if not a.zone:
    raise UsageError("--zone is required (e.g. us-east5-b)")
  if not ZONE_RE.match(a.zone):
    raise UsageError(f"--zone {a.zone!r} is not of the form REGION-ZONE (e.g. us-central2-b, "
                     "europe-west4-a)")
  if a.project is not None and not PROJECT_RE.match(a.project):
    raise UsageError(f"--project {a.project!r} is not a project id")
  for flag in ("remote_dir", "venv", "log_dir", "data_dir", "gcs_mount"):
    _check_remote_path("--" + flag.replace("_", "-"), getattr(a, flag))
  acc = getattr(a, "accelerator_type", None)
  if acc is not None and not ACCELERATOR_RE.match(acc):
    raise UsageError(f"--accelerator-type {acc!r}: expected e.g. v6e-8, v6e-256, v5p-256, "
                     "v5litepod-16")
  for flag in getattr(a, "create_arg", []):
    if not flag.startswith("--"):
      raise UsageError(f"--create-arg {flag!r}: give a gcloud flag, e.g. --create-arg=--reserved")
  pod = Pod(name=a.tpu_name, zone=a.zone, project=a.project, queued=a.queued,
            internal_ip=a.internal_ip, accelerator_type=acc,
            runtime_version=getattr(a, "runtime_version", None),
            spot=getattr(a, "spot", False), create_args=tuple(getattr(a, "create_arg", [])),
            remote_dir=a.remote_dir.rstrip("/"), venv=a.venv.rstrip("/"),
            log_dir=a.log_dir.rstrip("/"), data_dir=a.data_dir.rstrip("/"),
            gcs_mount=a.gcs_mount.rstrip("/"),
            python_version=getattr(a, "python_version", "3.11"))
  if acc is not None:
    runtime_version(pod)  # a usage error when there is no default for this generation
  return pod


def _source_data_from(a: argparse.Namespace, pod: Pod) -> tuple[Source, Data | None]:
  if a.ref and not a.repo_url:
    raise UsageError("--ref needs --repo-url")
  if not a.repo_url and not os.path.isfile(os.path.join(a.repo, "pyproject.toml")):
    raise UsageError(f"--repo {a.repo}: not a llada_jax checkout (no pyproject.toml)")
  if not re.match(r"^\d+\.\d+$", a.python_version):
    raise UsageError(f"--python-version {a.python_version!r}: expected e.g. 3.11")
  data = None
  if a.data:
    if a.data.startswith("gs://"):
      gcs_local(pod, a.data)
    elif not os.path.exists(a.data):
      raise UsageError(f"--data {a.data}: no such file or folder (or give gs://BUCKET/PATH)")
    elif a.data_mode == "mount":
      raise UsageError("--data-mode mount needs gs:// data")
    data = Data(a.data, a.data_mode)
  return Source(os.path.abspath(a.repo), a.repo_url, a.ref, tuple(a.exclude)), data


def _job_from(a: argparse.Namespace, pod: Pod, trainer_args: Sequence[str],
              repo: str) -> tuple[TrainJob, list[str]]:
  env = {"LLADA_DISTRIBUTED": "auto"}
  for kv in a.env:
    if not ENV_RE.match(kv):
      raise UsageError(f"--env {kv!r}: expected KEY=VALUE")
    k, v = kv.split("=", 1)
    env[k] = v
  if a.grace < 0:
    raise UsageError("--grace must be >= 0")
  job, warnings = parse_trainer_args(pod, trainer_args, repo=repo)
  return dataclasses.replace(job, env=tuple(env.items())), warnings


def _print_commands(cmds: Sequence[Argv]) -> None:
  for cmd in cmds:
    print(shlex.join(cmd))


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  own, trainer_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
      else (argv, [])
  try:
    try:
      a = build_parser().parse_args(own)
    except UsageError as e:
      msg = str(e)
      if "unrecognized arguments" in msg and any(x.startswith("--config") for x in own):
        msg += " (the trainer's arguments go after `--`)"
      raise UsageError(msg) from None
    if a.command is None:
      raise UsageError("give a subcommand: create, setup, train, logs, watch, stop or delete")
    if trainer_args and a.command not in ("train", "watch"):
      raise UsageError(f"{a.command} takes no arguments after `--`")
    pod = _pod_from(a)
    warnings: list[str] = []
    notes: list[str] = []
    if a.command == "create":
      if not a.accelerator_type:
        raise UsageError("--accelerator-type is required (e.g. v6e-256, v5p-256, v6e-8)")
      cmds = create_commands(pod)
      if pod.queued:
        notes.append("a queued resource: setup can run once "
                     f"`{shlex.join(describe_command(pod))}` prints ACTIVE")
    elif a.command == "delete":
      cmds = delete_commands(pod)
    elif a.command == "setup":
      source, data = _source_data_from(a, pod)
      cmds = setup_commands(pod, source, data)
      if data is not None:
        where = data_location(pod, data)
        notes.append(f"data on every host: {where} (relative to the home directory, where "
                     f"train runs: --config.data.source={where})")
    elif a.command == "train":
      job, warnings = _job_from(a, pod, trainer_args, os.path.abspath(a.repo))
      cmds = train_commands(pod, job, force=a.force, grace=a.grace)
    elif a.command == "logs":
      if a.tail is not None and a.tail < 1:
        raise UsageError("--tail must be >= 1")
      if a.worker != "all" and not a.worker.isdigit():
        raise UsageError(f"--worker {a.worker!r}: 'all' or a worker index")
      if a.out and a.tail:
        raise UsageError("give --out or --tail, not both")
      cmds = logs_commands(pod, a.out, a.tail, a.worker)
    elif a.command == "stop":
      if a.grace < 0:
        raise UsageError("--grace must be >= 0")
      cmds = stop_commands(pod, 0 if a.now else a.grace)
    else:  # watch
      if not a.accelerator_type:
        raise UsageError("--accelerator-type is required (watch recreates the TPU)")
      if a.max_restarts < 0:
        raise UsageError("--max-restarts must be >= 0")
      if not a.poll > 0:
        raise UsageError("--poll must be > 0 seconds")
      source, data = _source_data_from(a, pod)
      job, warnings = _job_from(a, pod, trainer_args, source.repo)
      setup = setup_commands(pod, source, data)
      train = train_commands(pod, job, force=a.force, grace=a.grace)
  except UsageError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  for w in warnings:
    print(w, file=sys.stderr)
  if a.command == "watch":
    if a.dry_run:
      print(f"# every {a.poll:g} s: the TPU's state, and the job's on every host")
      _print_commands([describe_command(pod), status_command(pod)])
      print("# TPU missing: create it")
      _print_commands(create_commands(pod))
      print(f"# preempted (PREEMPTED, TERMINATED, SUSPENDED, FAILED): recreate, at most "
            f"{a.max_restarts} times")
      _print_commands(recreate_commands(pod, exists=True))
      print("# then, once it is READY/ACTIVE (or when no job was ever started): setup and train")
      _print_commands(setup + train)
      print("# trainer exited 75 (SIGTERM) on a live TPU: train again")
      _print_commands(train)
      return 0
    return watch(pod, setup=setup, train=train, runner=runner or subprocess_runner,
                 state_fn=lambda: gcloud_state(pod), status_fn=lambda: gcloud_status(pod),
                 max_restarts=a.max_restarts, poll=a.poll)
  if a.dry_run:
    _print_commands(cmds)
    rc = 0
  else:
    rc = run_all(cmds, runner or subprocess_runner)
  for n in notes:
    print(n, file=sys.stderr)
  return rc


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
