"""Two processes on localhost (gloo CPU collectives, 2 devices each, mesh fsdp=2 x expert=2)
run one sharded train step; the gathered results equal one unsharded process."""

import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import parallel_checks as pc  # noqa: E402
from parallel_checks import FAST_COMPILE  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(out: str, timeout: int = 240) -> list[str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE,
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "parallel_multihost_worker.py"),
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i), "--local_device_count", "2", "--out", out],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  return logs


def test_two_processes_match_one_process(tmp_path):
  out = str(tmp_path / "result.npz")
  logs = _run_two_processes(out)
  assert "process 0/2: 2 local / 4 global cpu devices" in logs[0]
  got = dict(np.load(out))

  config, params, gold = pc.load("llada2_tiny")
  ids, targets = pc.batch(config, gold)
  step = jax.jit(functools.partial(pc.train_step, config, "ragged"))
  new_params, _, loss, logits, grads = step(params, pc.OPTIMIZER.init(params), ids, targets)
  logits = np.asarray(logits)
  assert np.max(np.abs(got["logits"] - logits)) <= 1e-5 * np.max(np.abs(logits))
  assert abs(float(got["loss"]) - float(loss)) <= 1e-5
  for prefix, tree, tol in (("grads", grads, 1e-5), ("params", new_params, None)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      name = prefix + jax.tree_util.keystr(path)
      leaf = np.asarray(leaf)
      err = np.max(np.abs(got[name] - leaf))
      if tol is None:
        assert err <= 1e-6, name
      else:
        assert err <= tol * max(np.max(np.abs(leaf)), 1e-30), name
