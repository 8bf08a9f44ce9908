"""`tools/tpu_pod.py`: the gcloud commands of every subcommand (dry runs for the flash and mini
recipes), the host-side shell lines (syntax, and run locally in a fake home directory), the
preemption watch with a scripted TPU state, and one-line usage errors. Nothing calls gcloud."""

import importlib.util
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "tpu_pod.py")
_spec = importlib.util.spec_from_file_location("tpu_pod", TOOL)
tpu_pod = importlib.util.module_from_spec(_spec)
sys.modules["tpu_pod"] = tpu_pod
_spec.loader.exec_module(tpu_pod)

FLASH = ["--tpu-name", "llada-flash", "--zone", "us-east5-a", "--project", "my-project"]
MINI = ["--tpu-name", "llada-mini", "--zone", "europe-west4-a"]
FLASH_TRAIN = ["--", "--config", "configs/flash_sft_edit.py", "--workdir",
               "gs://my-bucket/runs/flash", "--config.init_from=gs://my-bucket/hf/LLaDA2.1-flash",
               "--config.data.source=llada_data/sft.jsonl", "--config.grad_accum_steps=32"]
MINI_TRAIN = ["--", "--config", "configs/mini_sft_edit.py", "--workdir", "gs://my-bucket/runs/mini",
              "--config.steps=200"]


def no_runner(cmd):
  raise AssertionError(f"a dry run ran {cmd}")


def dry(capsys, *argv):
  rc = tpu_pod.main([argv[0], "--dry-run", *argv[1:]], runner=no_runner)
  out = capsys.readouterr()
  assert rc == 0, out.err
  return [shlex.split(ln) for ln in out.out.splitlines() if not ln.startswith("#")], out.err


def gcloud_cmds(cmds):
  return [c for c in cmds if c[0] == "gcloud"]


def command_of(cmd):
  (c,) = [a for a in cmd if a.startswith("--command=")]
  return c[len("--command="):]


def test_create_flash_queued_spot_v5p(capsys):
  (cmd,), _ = dry(capsys, "create", *FLASH, "--accelerator-type", "v5p-256", "--spot", "--queued")
  assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "llada-flash",
                 "--node-id=llada-flash", "--zone=us-east5-a", "--project=my-project",
                 "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5", "--spot"]


def test_create_mini_tpu_vm_v6e(capsys):
  (cmd,), _ = dry(capsys, "create", *MINI, "--accelerator-type", "v6e-8",
                  "--create-arg=--reserved")
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "llada-mini",
                 "--zone=europe-west4-a", "--accelerator-type=v6e-8",
                 "--version=v2-alpha-tpuv6e", "--reserved"]
  (cmd,), _ = dry(capsys, "create", *MINI, "--accelerator-type", "v6e-256",
                  "--runtime-version", "v2-alpha-tpuv6e-custom")
  assert "--version=v2-alpha-tpuv6e-custom" in cmd


def test_setup_copies_checkout_installs_tpu_extra_and_copies_gcs_data(capsys):
  cmds, err = dry(capsys, "setup", *FLASH, "--data", "gs://my-bucket/sft/sft.jsonl")
  tar, copy, install, data = cmds
  assert tar[:3] == ["tar", "-czf", tpu_pod.tarball_path(tpu_pod.Pod("llada-flash", "us-east5-a"))]
  assert tar[-3:] == ["-C", ROOT, "."] and "--exclude=.git" in tar
  assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert copy[5:7] == [tar[2], "llada-flash:llada_jax-src.tar.gz"]
  for c in gcloud_cmds(cmds):
    assert "--worker=all" in c and "--zone=us-east5-a" in c and "--project=my-project" in c
  script = command_of(install)
  assert "tar -xzf llada_jax-src.tar.gz -C llada_jax.new" in script
  assert "uv venv --quiet --python 3.11 llada_venv" in script
  assert "pip install --quiet --python llada_venv/bin/python -e './llada_jax[tpu]'" in script
  assert command_of(data) == "gsutil -m -q cp -r gs://my-bucket/sft/sft.jsonl llada_data/"
  assert "llada_data/sft.jsonl" in err


def test_setup_git_clone_and_local_data(capsys, tmp_path):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_text("hello")
  cmds, err = dry(capsys, "setup", *MINI, "--repo-url", "https://github.com/me/llada_jax",
                  "--ref", "v1", "--data", str(tmp_path / "corpus"))
  install, data = cmds
  assert [c[0] for c in cmds] == ["gcloud", "gcloud"]  # no tarball
  script = command_of(install)
  assert ("git clone --quiet https://github.com/me/llada_jax llada_jax.new && git -C "
          "llada_jax.new checkout --quiet v1") in script
  assert "-e './llada_jax[tpu]'" in script
  assert data == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                  str(tmp_path / "corpus"), "llada-mini:llada_data/", "--zone=europe-west4-a",
                  "--worker=all", "--strict-host-key-checking=no"]
  assert "llada_data/corpus" in err


def test_setup_mounts_gcs_data_with_gcsfuse(capsys):
  (_, _, _, mount), err = dry(capsys, "setup", *MINI, "--data", "gs://my-bucket/corpus",
                              "--data-mode", "mount")
  script = command_of(mount)
  assert "gcsfuse --implicit-dirs" in script and 'my-bucket "$HOME"/gcs/my-bucket' in script
  assert "gcs/my-bucket/corpus" in err


def test_train_flash_same_command_on_every_host(capsys):
  (cmd,), err = dry(capsys, "train", *FLASH, "--env", "LIBTPU_INIT_ARGS=--xla_flag=1 --other",
                    *FLASH_TRAIN)
  assert err == ""  # gs:// workdir: no warning
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llada-flash"]
  assert "--worker=all" in cmd  # one ssh for all hosts: the same command on each
  script = command_of(cmd)
  # The bucket is mounted, and gs:// paths become the mount's paths.
  assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket" in script
  wrapper = shlex.split(script.split("nohup setsid bash -c ", 1)[1])[0]
  trainer = ("llada_venv/bin/python -m llada_jax.train --config "
             "llada_jax/configs/flash_sft_edit.py --workdir gcs/my-bucket/runs/flash "
             "--config.init_from=gcs/my-bucket/hf/LLaDA2.1-flash "
             "--config.data.source=llada_data/sft.jsonl --config.grad_accum_steps=32 "
             "--no_progress")
  assert trainer in wrapper
  assert "export LLADA_DISTRIBUTED=auto LIBTPU_INIT_ARGS='--xla_flag=1 --other'" in wrapper
  assert 'train-"$(hostname)".log 2>&1 < /dev/null &' in script  # detached, a log per host


def test_train_mini_local_workdir_warns(capsys):
  (cmd,), err = dry(capsys, "train", *MINI, "--", "--config=configs/mini_sft_edit.py",
                    "--workdir=/home/me/run")
  assert err.startswith("warning: --workdir /home/me/run is on the hosts' own disks")
  assert len(err.strip().splitlines()) == 1
  script = command_of(cmd)
  assert "--config=llada_jax/configs/mini_sft_edit.py --workdir=/home/me/run" in script
  assert "gcsfuse" not in script
  assert "--worker=all" in cmd


def test_logs_stop_delete(capsys):
  (mk, cp), _ = dry(capsys, "logs", *MINI, "--out", "here")
  assert mk == ["mkdir", "-p", "here"]
  assert cp[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                    "llada-mini:llada_logs", "here"] and "--worker=all" in cp
  (tail,), _ = dry(capsys, "logs", *MINI, "--tail", "50")
  assert "--worker=all" in tail and "tail -n 50 llada_logs/train-" in command_of(tail)
  (stop,), _ = dry(capsys, "stop", *MINI)
  assert "--worker=all" in stop and "kill -TERM" in command_of(stop)
  assert "-lt 300 ]" in command_of(stop)
  (now,), _ = dry(capsys, "stop", *MINI, "--now")
  assert "-lt 0 ]" in command_of(now)
  (d,), _ = dry(capsys, "delete", *FLASH, "--queued")
  assert d == ["gcloud", "compute", "tpus", "queued-resources", "delete", "llada-flash",
               "--zone=us-east5-a", "--project=my-project", "--force", "--quiet"]


def test_watch_dry_run_lists_poll_recreate_setup_train(capsys):
  cmds, _ = dry(capsys, "watch", *FLASH, "--accelerator-type", "v6e-256", "--spot", "--queued",
                *FLASH_TRAIN)
  verbs = [" ".join(c[2:5]) for c in gcloud_cmds(cmds)]
  assert verbs[:2] == ["tpus queued-resources describe", "tpus tpu-vm ssh"]
  assert "tpus queued-resources delete" in verbs and "tpus queued-resources create" in verbs
  assert cmds[1] == tpu_pod.status_command(tpu_pod._pod_from(
      tpu_pod.build_parser().parse_args(["stop"] + FLASH)))


def test_every_host_script_is_valid_bash(capsys, tmp_path):
  scripts = []
  for argv in (["setup", *FLASH, "--data", "gs://my-bucket/x", "--data-mode", "mount"],
               ["train", *FLASH, "--force", *FLASH_TRAIN], ["train", *MINI, *MINI_TRAIN],
               ["stop", *MINI], ["logs", *MINI, "--tail", "5"]):
    cmds, _ = dry(capsys, *argv)
    scripts += [command_of(c) for c in cmds if any(a.startswith("--command=") for a in c)]
  assert len(scripts) == 6
  for s in scripts:
    r = subprocess.run(["bash", "-n", "-c", s], capture_output=True, text=True)
    assert r.returncode == 0, (s, r.stderr)


# ------------------------------------------------- the host-side lines, run in a fake home


FAKE_PYTHON = """#!/bin/bash
echo "args: $*"
echo "env: LLADA_DISTRIBUTED=$LLADA_DISTRIBUTED"
if [ -n "$FAKE_EXIT" ]; then exit "$FAKE_EXIT"; fi
trap 'echo "SIGTERM: checkpoint saved"; exit 75' TERM
while true; do sleep 0.05; done
"""


def _exe(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def host(tmp_path):
  """Runs host scripts with cwd = HOME = a temp folder, a fake venv python, a no-op sudo."""
  home = tmp_path / "home"
  _exe(home / "llada_venv" / "bin" / "python", FAKE_PYTHON)
  _exe(tmp_path / "bin" / "sudo", "#!/bin/sh\nexit 0\n")
  pid_file = home / "llada_logs" / "train.pid"

  def run(script, **env):
    e = dict(os.environ, HOME=str(home), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", **env)
    return subprocess.run(["bash", "-c", script], cwd=home, env=e, capture_output=True, text=True,
                          timeout=60)

  run.home = home
  yield run
  if pid_file.exists():  # end what the test started, by its pid
    try:
      os.kill(int(pid_file.read_text()), 9)
    except (ProcessLookupError, ValueError):
      pass


def _wait_for(pred, timeout=20):
  t = time.time()
  while time.time() - t < timeout:
    if pred():
      return True
    time.sleep(0.05)
  return False


def test_host_train_status_stop_cycle(host):
  pod = tpu_pod.Pod("llada-mini", "europe-west4-a")
  job, _ = tpu_pod.parse_trainer_args(pod, ["--config", "configs/mini_sft_edit.py", "--workdir",
                                            "/tmp/run"], repo=ROOT)
  (train,) = tpu_pod.train_commands(pod, job)
  status = command_of(tpu_pod.status_command(pod))
  r = host(command_of(train))
  assert r.returncode == 0 and "started" in r.stdout, r.stderr
  pid_file = host.home / "llada_logs" / "train.pid"
  assert _wait_for(pid_file.exists)
  assert _wait_for(lambda: "args:" in next(
      (host.home / "llada_logs").glob("train-*.log")).read_text())
  assert tpu_pod.aggregate_status(host(status).stdout) == "running"
  # A second start is refused while the session runs.
  r2 = host(command_of(train))
  assert r2.returncode == 1 and "already running" in r2.stderr
  (stop,) = tpu_pod.stop_commands(pod, grace=20)
  r = host(command_of(stop))
  assert "stopped" in r.stdout, r.stdout + r.stderr
  assert _wait_for(lambda: (host.home / "llada_logs" / "exit_code").exists())
  assert (host.home / "llada_logs" / "exit_code").read_text().strip() == "75"
  assert tpu_pod.aggregate_status(host(status).stdout) == "stopped"
  (log,) = (host.home / "llada_logs").glob("train-*.log")
  text = log.read_text()
  assert ("args: -m llada_jax.train --config llada_jax/configs/mini_sft_edit.py --workdir "
          "/tmp/run --no_progress") in text
  assert "env: LLADA_DISTRIBUTED=auto" in text and "SIGTERM: checkpoint saved" in text
  assert "== exit status 75" in text
  # A finished run reads as done; a new start clears the stop marker.
  r = host(command_of(train), FAKE_EXIT="0")
  assert r.returncode == 0, r.stderr
  assert _wait_for(lambda: (host.home / "llada_logs" / "exit_code").exists())
  assert tpu_pod.aggregate_status(host(status).stdout) == "done"


def test_host_train_force_replaces_running_session(host):
  pod = tpu_pod.Pod("llada-mini", "europe-west4-a")
  job, _ = tpu_pod.parse_trainer_args(pod, ["--config", "configs/mini_sft_edit.py", "--workdir",
                                            "/tmp/run"], repo=ROOT)
  (train,) = tpu_pod.train_commands(pod, job)
  pid_file = host.home / "llada_logs" / "train.pid"
  assert host(command_of(train)).returncode == 0
  assert _wait_for(pid_file.exists)
  first = int(pid_file.read_text())
  (forced,) = tpu_pod.train_commands(pod, job, force=True, grace=20)
  r = host(command_of(forced))
  assert r.returncode == 0, r.stderr
  assert _wait_for(lambda: pid_file.exists() and int(pid_file.read_text() or 0) not in (0, first))
  with pytest.raises(ProcessLookupError):
    os.kill(first, 0)


# ------------------------------------------------------------------------------------- watch


class Fake:
  """A scripted TPU: `states` (one per poll), `statuses` (one per job-status read)."""

  def __init__(self, states, statuses):
    self.states, self.statuses = list(states), list(statuses)
    self.commands, self.polls = [], 0

  def state(self):
    self.polls += 1
    return self.states.pop(0)

  def status(self):
    return self.statuses.pop(0)

  def runner(self, cmd):
    self.commands.append(cmd)
    return 0


def _watch(pod, fake, **kw):
  setup = [["SETUP"]]
  train = [["TRAIN"]]
  logs = []
  rc = tpu_pod.watch(pod, setup=setup, train=train, runner=fake.runner, state_fn=fake.state,
                     status_fn=fake.status, sleep=lambda s: None, log=logs.append, **kw)
  return rc, logs


def test_watch_recreates_after_preemption_and_reruns_setup_and_train():
  pod = tpu_pod.Pod("llada-flash", "us-east5-a", accelerator_type="v5p-256", spot=True)
  # READY (training runs), READY, PREEMPTED -> recreated (CREATING, READY) -> setup + train,
  # then the job runs and finishes.
  fake = Fake(["READY", "READY", "PREEMPTED", "CREATING", "READY", "READY", "READY"],
              ["running", "running", "running", "done"])
  rc, logs = _watch(pod, fake, max_restarts=3)
  assert rc == 0
  assert fake.commands == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "llada-flash", "--zone=us-east5-a",
       "--quiet"],
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "llada-flash", "--zone=us-east5-a",
       "--accelerator-type=v5p-256", "--version=v2-alpha-tpuv5", "--spot"],
      ["SETUP"], ["TRAIN"]]
  assert any("restart 1/3" in m for m in logs) and "finished" in logs[-1]


def test_watch_queued_resource_suspended_is_deleted_and_requeued():
  pod = tpu_pod.Pod("llada-flash", "us-east5-a", queued=True, accelerator_type="v6e-256",
                    spot=True)
  fake = Fake(["ACTIVE", "SUSPENDING", "SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING",
               "ACTIVE", "ACTIVE"], ["running", "done"])
  rc, _ = _watch(pod, fake)
  assert rc == 0
  assert [c[:6] for c in fake.commands[:2]] == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "llada-flash"],
      ["gcloud", "compute", "tpus", "queued-resources", "create", "llada-flash"]]
  assert "--force" in fake.commands[0] and "--runtime-version=v2-alpha-tpuv6e" in fake.commands[1]
  assert fake.commands[2:] == [["SETUP"], ["TRAIN"]]


def test_watch_gives_up_after_max_restarts():
  pod = tpu_pod.Pod("t-pod", "us-east5-a", accelerator_type="v6e-8", spot=True)
  fake = Fake(["READY", "PREEMPTED", "READY", "PREEMPTED", "READY", "PREEMPTED"],
              ["running"] * 3)
  rc, logs = _watch(pod, fake, max_restarts=2)
  assert rc == 1 and "spent" in logs[-1]
  assert sum(c == ["SETUP"] for c in fake.commands) == 2


def test_watch_starts_missing_tpu_and_job_without_counting_a_restart():
  pod = tpu_pod.Pod("t-pod", "us-east5-a", accelerator_type="v6e-8")
  fake = Fake(["NOT_FOUND", "READY", "READY"], ["done"])
  rc, logs = _watch(pod, fake, max_restarts=0)
  assert rc == 0
  assert [c[4] for c in fake.commands[:1]] == ["create"]  # nothing to delete
  assert fake.commands[1:] == [["SETUP"], ["TRAIN"]]
  fake = Fake(["READY", "READY", "READY"], ["none", "done"])  # VM there, no job yet
  assert _watch(pod, fake, max_restarts=0)[0] == 0
  assert fake.commands == [["SETUP"], ["TRAIN"]]


def test_watch_relaunches_after_sigterm_exit_and_stops_on_failure():
  pod = tpu_pod.Pod("t-pod", "us-east5-a", accelerator_type="v6e-8")
  # exit 75 on a live VM, confirmed at the next poll: train again (no setup).
  fake = Fake(["READY"] * 4, ["running", "preempted", "preempted", "done"])
  rc, _ = _watch(pod, fake)
  assert rc == 0 and fake.commands == [["TRAIN"]]
  # A failure seen on a VM that then turns out preempted is a preemption, not a failure.
  fake = Fake(["READY", "READY", "PREEMPTED", "READY", "READY"], ["running", "failed:1", "done"])
  rc, _ = _watch(pod, fake)
  assert rc == 0 and [c[4] if c[0] == "gcloud" else c[0] for c in fake.commands] == [
      "delete", "create", "SETUP", "TRAIN"]
  # A failure confirmed on a healthy VM ends the watch.
  fake = Fake(["READY"] * 3, ["running", "failed:2", "failed:2"])
  rc, logs = _watch(pod, fake)
  assert rc == 1 and "exit status 2" in logs[-1] and fake.commands == []
  # `stop` ends it too.
  fake = Fake(["READY"], ["stopped"])
  assert _watch(pod, fake)[0] == 0


def test_state_and_status_parsing():
  assert tpu_pod.parse_state(0, "READY\n", "") == "READY"
  assert tpu_pod.parse_state(1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: "
                                    "Resource 'projects/p/locations/z/nodes/n' was not found") \
      == "NOT_FOUND"
  assert tpu_pod.parse_state(1, "", "ERROR: network unreachable") == "UNKNOWN"
  assert [tpu_pod.classify(s) for s in ("READY", "ACTIVE", "PREEMPTED", "SUSPENDED", "CREATING",
                                        "STOPPED", "UNKNOWN")] == [
      "healthy", "healthy", "gone", "gone", "wait", "stopped", "wait"]
  line = lambda h, s: f"{tpu_pod.STATUS_TAG} {h} {s}"
  agg = lambda *ss: tpu_pod.aggregate_status(
      "Using ssh batch size of 1.\n" + "\n".join(line(f"w-{i}", s) for i, s in enumerate(ss)))
  assert agg("running", "running") == "running"
  assert agg("exit:0", "exit:0") == "done"
  assert agg("exit:0", "running") == "running"
  assert agg("exit:75", "exit:75") == "preempted"
  assert agg("lost", "running") == "running"
  assert agg("lost", "lost") == "preempted"
  assert agg("exit:1", "running") == "failed:1"
  assert agg("stopped", "exit:137") == "stopped"
  assert agg("none", "none") == "none"
  assert tpu_pod.aggregate_status("ssh: connect to host 10.0.0.2 port 22: timed out") == "unknown"


# -------------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("argv, message", [
    (["train", "--zone", "us-east5-a", *MINI_TRAIN], "--tpu-name is required"),
    (["train", "--tpu-name", "t", "--zone", "useast5", *MINI_TRAIN], "not of the form REGION-ZONE"),
    (["setup", "--tpu-name", "t"], "--zone is required"),
    (["train", *MINI, "--", "--config", "configs/nope.py", "--workdir", "gs://bkt/r"],
     "--config configs/nope.py: no such file"),
    (["train", *MINI, "--", "--config", "configs/mini_sft_edit.py"], "need --workdir"),
    (["train", *MINI], "after `--`"),
    (["train", *MINI, "--config", "configs/mini_sft_edit.py"], "after `--`"),
    (["create", *MINI], "--accelerator-type is required"),
    (["create", *MINI, "--accelerator-type", "v6e"], "--accelerator-type 'v6e'"),
    (["create", *MINI, "--accelerator-type", "v9z-8"], "pass --runtime-version"),
    (["watch", *MINI, *MINI_TRAIN], "--accelerator-type is required"),
    (["watch", *MINI, "--accelerator-type", "v6e-8", "--max-restarts", "-1", *MINI_TRAIN],
     "--max-restarts must be >= 0"),
    (["train", *MINI, "--env", "1X=2", *MINI_TRAIN], "--env '1X=2'"),
    (["setup", *MINI, "--data", "/no/such/data"], "--data /no/such/data: no such file"),
    (["setup", *MINI, "--data", "gs://x"], "not a gs://BUCKET"),
    (["setup", *MINI, "--ref", "main"], "--ref needs --repo-url"),
    (["logs", *MINI, "--tail", "0"], "--tail must be >= 1"),
    (["stop", *MINI, "--remote-dir", "../x"], "--remote-dir '../x'"),
    (["stop", *MINI, "--grace", "abc"], "invalid int value"),
    (["stop", *MINI, *MINI_TRAIN], "takes no arguments after `--`"),
    ([], "give a subcommand"),
])
def test_bad_flags_one_line_exit_2(capsys, argv, message):
  rc = tpu_pod.main(argv[:1] + ["--dry-run"] + argv[1:] if argv else [], runner=no_runner)
  out = capsys.readouterr()
  assert rc == 2 and out.out == ""
  lines = out.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.err


def test_cli_entry_point_never_calls_gcloud(tmp_path):
  """The script as a user runs it: dry runs print, bad flags exit 2; a gcloud on PATH that
  records its calls is never run."""
  _exe(tmp_path / "bin" / "gcloud", f"#!/bin/sh\ntouch {tmp_path / 'called'}\nexit 1\n")
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  r = subprocess.run([sys.executable, TOOL, "train", *FLASH, "--dry-run", *FLASH_TRAIN],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("gcloud compute tpus tpu-vm ssh llada-flash ")
  assert len(r.stdout.splitlines()) == 1
  r = subprocess.run([sys.executable, TOOL, "train", "--zone", "us-east5-a", *FLASH_TRAIN],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert r.returncode == 2 and r.stderr == "error: --tpu-name is required\n"
  assert not (tmp_path / "called").exists()
