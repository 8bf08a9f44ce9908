"""The trainer on a device mesh (8 fake CPU devices in subprocesses): sharded runs log the losses
of the 1-device run, the state is really sharded, a SIGKILLed sharded run resumes
bit-identically (metrics and the whole saved state, data iterator included: the test of exact
resume), and 2 processes x 4 devices equal 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Small and short: seq 32, block 8, 8 rows (one per device on data x expert = 8), 6 steps.
COMMON = {"data.seq_len": 32, "objective.block_length": 8, "data.batch_size": 8, "steps": 6,
          "log_every": 1, "ckpt_every": 2}


def corpus(tmp_path):
  src = tmp_path / "corpus"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(16):
    words = rng.choice(["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "+"], 40)
    (src / f"doc{i}.txt").write_text(" ".join(words) + "\n")
  return src


def env(devices: int = 8) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")


def train_cmd(workdir, overrides, config="tiny_pretrain.py", extra=()):
  return ([sys.executable, "-m", "llada_jax.train", "--config",
           os.path.join(ROOT, "configs", config), "--workdir", str(workdir), "--no_progress"]
          + [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra))


def train_cli(workdir, overrides, check=True, devices=8, **kw):
  out = subprocess.run(train_cmd(workdir, overrides, **kw), capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env=env(devices))
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def metrics(workdir):
  """metrics.jsonl rows without the timing column."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in f]


def losses_close(rows, ref, rtol=1e-5, atol=1e-6):
  """Same steps and losses within rtol (plus atol: an EBPO loss can be ~1e-8, pure rounding)."""
  assert [r["step"] for r in rows] == [r["step"] for r in ref]
  for r, q in zip(rows, ref):
    assert abs(r["loss"] - q["loss"]) <= rtol * abs(q["loss"]) + atol, (
        r["step"], r["loss"], q["loss"])


def checkpoint_state(workdir, step):
  """The saved train state as numpy (a sharded checkpoint read on this 1-device process)."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(getattr(tree, "item_metadata", None), "tree", tree)
  args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                                is_leaf=lambda x: hasattr(x, "shape"))
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def run_info(workdir):
  with open(os.path.join(workdir, "run_info.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_sharded_runs_match_one_device_and_resume_bit_identically(tmp_path):
  common = dict(COMMON, **{"data.source": str(corpus(tmp_path)),
                           "data.dataset_dir": str(tmp_path / "ds")})
  train_cli(tmp_path / "one", common)
  ref = metrics(tmp_path / "one")
  assert run_info(tmp_path / "one")["devices"] == 8 and run_info(tmp_path / "one")["mesh"] == \
      "data=1"
  for name, mesh, moe in (("ep", "data=2,expert=4", "ep"),
                          ("fet", "fsdp=2,expert=2,tensor=2", "ragged")):
    train_cli(tmp_path / name, dict(common, mesh=mesh, **{"objective.moe_impl": moe}))
    losses_close(metrics(tmp_path / name), ref)
    info = run_info(tmp_path / name)
    assert info["mesh"] == mesh and info["devices"] == 8 and info["processes"] == 1
    for what in ("params_bytes", "opt_state_bytes"):
      assert info[what]["per_device"] < info[what]["total"], (name, what, info[what])
  # SIGKILL the fsdp x expert x tensor run after its step-2 checkpoint, then rerun.
  kw = dict(common, mesh="fsdp=2,expert=2,tensor=2", **{"objective.moe_impl": "ragged"})
  killed = train_cli(tmp_path / "killed", dict(kw, debug_kill_at_step=3), check=False)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert not os.path.exists(tmp_path / "killed" / "checkpoints" / "6")
  train_cli(tmp_path / "killed", kw)
  assert metrics(tmp_path / "killed") == metrics(tmp_path / "fet")
  a, b = checkpoint_state(tmp_path / "fet", 6), checkpoint_state(tmp_path / "killed", 6)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 4 devices (localhost, gloo) = 1 process x 8 devices: same global batch read
  as 2 data shards (one per process in the 2-process run), same metrics."""
  common = dict(COMMON, mesh="data=2,expert=4", steps=4, ckpt_every=4,
                **{"data.source": str(corpus(tmp_path)), "data.dataset_dir": str(tmp_path / "ds"),
                   "data.shards": 2})
  train_cli(tmp_path / "single", common)
  logs = _two_processes(tmp_path / "multi", common, "tiny_pretrain.py")
  assert "process 0/2" in logs[0] and "data shards [0] of 2" in logs[0], logs[0][-2000:]
  assert "process 1/2" in logs[1] and "data shards [1] of 2" in logs[1], logs[1][-2000:]
  single, multi = metrics(tmp_path / "single"), metrics(tmp_path / "multi")
  losses_close(multi, single)
  for r, q in zip(multi, single):
    assert r["masked_tokens"] == q["masked_tokens"]
  info = run_info(tmp_path / "multi")
  assert info["processes"] == 2 and info["devices"] == 8 and info["local_devices"] == 4
  with open(tmp_path / "multi" / "checkpoints" / "4" / "data" / "metadata") as f:
    data_state = json.load(f)
  shards = data_state["grain_shards"]
  assert sorted(shards) == ["0", "1"] and shards["0"] != shards["1"]
  assert shards["0"]["settings"]["shard_index"] == 0 and shards["1"]["settings"]["shard_index"] == 1


def _two_processes(workdir, overrides, config):
  """The train CLI as 2 processes x 4 fake devices on localhost; returns their logs."""
  port = _free_port()
  procs = [subprocess.Popen(
      train_cmd(workdir, overrides, config=config, extra=(
          "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
          "--process_id", str(i), "--local_device_count", "4")),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  return logs


OBJECTIVES_WORKER = r"""
import importlib.util, json, sys
from llada_jax.train.defaults import tiny_byte_config
from llada_jax.train.trainer import Trainer
spec = importlib.util.spec_from_file_location("tiny_ebpo", "configs/tiny_ebpo.py")
tiny_ebpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny_ebpo)
out = {}
for stage in ("dpo", "ebpo"):
  for mesh, moe in (("", "ragged"), ("data=2,expert=4", "ep")):
    c = tiny_ebpo.get_config() if stage == "ebpo" else tiny_byte_config(stage)
    c.steps, c.log_every, c.ckpt_every = 2, 1, 100
    c.mesh, c.objective.moe_impl = mesh, moe
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    if stage == "dpo":
      c.data.batch_size = 8
    t = Trainer(c, f"{sys.argv[1]}/{stage}_{mesh or 'one'}", progress=False)
    t.run()
    with open(f"{sys.argv[1]}/{stage}_{mesh or 'one'}/metrics.jsonl") as f:
      out[f"{stage}|{mesh}"] = [json.loads(x) for x in f]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_dpo_and_ebpo_under_a_mesh_match_one_device(tmp_path):
  """The DPO reference pass and the EBPO rollouts / log-ratios run under the mesh with
  expert parallelism and log what one device logs; EBPO as 2 processes x 4 devices (the train
  CLI: rollouts decoded on the global mesh, each process gathering every row's response)
  logs what 1 process x 8 devices logs."""
  out = subprocess.run([sys.executable, "-c", OBJECTIVES_WORKER, str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900, env=env())
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  for stage, keys in (("dpo", ("loss", "margin", "grad_norm")),
                      ("ebpo", ("loss", "ratio", "reward", "grad_norm"))):
    one, mesh = res[f"{stage}|"], res[f"{stage}|data=2,expert=4"]
    assert len(one) == len(mesh) == 2
    for r, q in zip(mesh, one):
      for k in keys:
        assert abs(r[k] - q[k]) <= 1e-5 * max(abs(q[k]), 1.0), (stage, k, r[k], q[k])
  # The same EBPO run (tiny_ebpo.py = the worker's config) on 2 processes x 4 devices.
  kw = dict(mesh="data=2,expert=4", steps=2, log_every=1, ckpt_every=100,
            **{"optim.warmup_steps": 0, "optim.schedule": "constant"})
  _two_processes(tmp_path / "multi", kw, "tiny_ebpo.py")
  multi, single = metrics(tmp_path / "multi"), res["ebpo|data=2,expert=4"]
  assert [r["reward"] for r in multi] == [r["reward"] for r in single]
  losses_close(multi, single)
