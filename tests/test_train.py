"""Trainer: each stage learns, bad configs and NaN stop cleanly, SIGTERM and Ctrl-C save and
resume (exact resume after SIGKILL: `test_train_mesh.py`)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llada_jax.train import trainer as trainer_lib
from llada_jax.train import wsd
from llada_jax.train.defaults import base_config
from llada_jax.train.trainer import ConfigError, NonFiniteLoss, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE_MODEL = dict(vocab_size=264, pad_token_id=257, eos_token_id=256, mask_token_id=258)


def _config(stage="bdlm", **kw):
  c = base_config()
  c.model.overrides.update(BYTE_MODEL)
  c.stage = stage
  c.data.task = "repeat"
  c.data.seq_len, c.data.batch_size = 32, 8
  c.objective.block_length = 8
  c.log_every, c.ckpt_every = 5, 1000
  for key, value in kw.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _losses(workdir, key="loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)[key] for line in f]


def _corpus(tmp_path):
  src = tmp_path / "corpus"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    words = rng.choice(["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "+"], 40)
    (src / f"doc{i}.txt").write_text(" ".join(words) + "\n")
  return src


def _run(tmp_path, name, cfg):
  Trainer(cfg, str(tmp_path / name), progress=False).run()
  return tmp_path / name


def test_ar_loss_falls(tmp_path):
  d = _run(tmp_path, "ar", _config(steps=40, **{"objective.block_length": 1,
                                                  "objective.t_min": 1.0, "objective.t_max": 1.0,
                                                  "optim.lr": 3e-3}))
  losses = _losses(d)
  assert losses[-1] < 0.6 * losses[0], losses


def test_wsd_conversion_loss_falls(tmp_path):
  stages = wsd.wsd_stages(32, warmup=(1, 4), warmup_steps=10, stable_steps=10, decay=(16,),
                          decay_steps=10, target=8)
  assert [b for _, b in stages] == [1, 4, 32, 16, 8]
  d = _run(tmp_path, "wsd", _config(steps=wsd.total_steps(stages), **{
      "wsd.enabled": True, "wsd.stages": stages, "optim.lr": 3e-3, "noise_steps": 10,
      "objective.mask_embed_noise": 0.1}))
  with open(d / "metrics.jsonl") as f:
    rows = [json.loads(x) for x in f]
  assert [r["block_length"] for r in rows] == [1, 1, 4, 4, 32, 32, 16, 16, 8, 8]
  assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]


def test_sft_with_editing_losses_fall(tmp_path):
  d = _run(tmp_path, "sft", _config(steps=40, **{"data.task": "addition", "optim.lr": 3e-3,
                                                  "objective.edit_rate": 0.3,
                                                  "objective.complementary": True}))
  m2t, t2t = _losses(d, "m2t_loss"), _losses(d, "t2t_loss")
  assert m2t[-1] < 0.7 * m2t[0] and t2t[-1] < 0.7 * t2t[0], (m2t, t2t)


def test_dpo_margin_rises(tmp_path):
  d = _run(tmp_path, "dpo", _config("dpo", steps=30, **{"optim.lr": 3e-3}))
  margins = _losses(d, "margin")
  assert margins[0] < 1.0 and np.mean(margins[-3:]) > 1.0, margins


def test_ebpo_reward_rises(tmp_path):
  d = _run(tmp_path, "ebpo", _config("ebpo", steps=20, **{
      "optim.lr": 3e-3, "ebpo.group_size": 4, "data.batch_size": 2, "ebpo.gen_length": 8}))
  rewards = _losses(d, "reward")
  assert rewards[-1] > rewards[0] + 0.1, rewards


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  cfg = _config(steps=12, ckpt_every=4, **{"optim.lr": 1e30, "optim.warmup_steps": 0})
  t = Trainer(cfg, str(tmp_path / "nan"), progress=False)
  with pytest.raises(NonFiniteLoss, match="non-finite loss at step"):
    t.run()
  assert t.manager.latest_step() in (None, 4, 8)


@pytest.mark.parametrize("kw, msg", [
    ({"objective.block_length": 5}, "does not divide"),
    ({"stage": "rlhf"}, "stage"),
    ({"data.task": "", "data.source": ""}, "data.source"),
    ({"data.task": "", "data.source": "/nonexistent/corpus"}, "does not exist"),
    ({"data.task": "chess"}, "unknown task"),
    ({"optim.schedule": "step"}, "optim.schedule"),
    ({"wsd.enabled": True, "wsd.stages": ((5, 3),)}, "does not divide"),
])
def test_bad_configs_fail_at_start(tmp_path, kw, msg):
  with pytest.raises(ConfigError, match=msg):
    Trainer(_config(**kw), str(tmp_path / "bad"), progress=False)


def _load_config_file(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


STAGE_CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                       if f.startswith(("tiny_", "mini_", "flash_", "code_")))


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_stage_configs_load_and_validate(name, tmp_path):
  cfg = _load_config_file(os.path.join(ROOT, "configs", name))
  if not cfg.data.task:  # corpus configs: point them at a tiny corpus to validate
    cfg.data.source = str(_corpus(tmp_path))
  if cfg.stage in ("dpo", "ebpo") and not cfg.data.task:
    cfg.data.task = "addition"
  cfg.workdir = str(tmp_path)
  trainer_lib.validate(cfg)
  assert trainer_lib.block_stages(cfg)[0][1] >= 1


# ---- mixed precision, gradient accumulation, preemption, run identity ----------------------------
def _leaves(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_mixed_precision_keeps_float32_masters(tmp_path):
  """bf16 compute with fp32 master params: at lr 1e-6 every trained leaf still moves (pure
  bf16 rounds such updates away), and the checkpoint holds float32 params and moments."""
  import llada_jax
  cfg = _config(steps=3, ckpt_every=3, log_every=1, dtype="bfloat16", **{
      "optim.lr": 1e-6, "optim.schedule": "constant", "optim.warmup_steps": 0})
  t = Trainer(cfg, str(tmp_path / "mp"), progress=False)
  t.run()
  assert t.c.param_dtype == "float32" and t.c.dtype == "bfloat16"
  init = _leaves(llada_jax.init_params(t.c, jax.random.PRNGKey(cfg.seed)))
  final = _leaves(t.state["params"])
  for (name, a), (_, b) in zip(init, final, strict=True):
    assert b.dtype == np.float32, name
    if "expert_bias" not in name:  # routing-only (no gradient), zero-initialised
      assert not np.array_equal(a, b), f"{name} did not change"
  state = _final_state(tmp_path / "mp", 3)
  assert {x.dtype for _, x in _leaves(state["params"])} == {np.dtype(np.float32)}
  mu = state["opt_state"][1][0]["mu"]
  assert {x.dtype for _, x in _leaves(mu)} == {np.dtype(np.float32)}


def test_pure_bf16_is_explicit_and_warned(tmp_path, capsys):
  t = Trainer(_config(param_dtype="bfloat16", dtype="bfloat16"), str(tmp_path / "bf16"),
              progress=False)
  assert t.c.param_dtype == "bfloat16"
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "warning: param_dtype=bfloat16: pure-bf16 training" in err


def _final_state(workdir, step):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(getattr(tree, "item_metadata", None), "tree", tree)
  args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                                is_leaf=lambda x: hasattr(x, "shape"))
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def test_grad_accumulation_equals_one_big_batch(tmp_path):
  """4 micro-batches of 2 rows = one batch of 8 rows (same draws, global normalisers): every
  metric and the updated params agree to 1e-5, with every term of the objective on (editing
  stream, MTF drafts, complementary masks, CAP, embedding noise)."""
  kw = {"data.task": "addition", "optim.schedule": "constant", "optim.warmup_steps": 0,
        "objective.edit_rate": 0.2, "objective.mtf_rate": 0.2, "objective.complementary": True,
        "objective.cap_weight": 0.1, "objective.mask_embed_noise": 0.1, "noise_steps": 10}
  runs = {}
  for accum in (1, 4):
    t = Trainer(_config(steps=2, log_every=1, grad_accum_steps=accum, **kw),
                str(tmp_path / f"accum{accum}"), progress=False)
    t.run()
    runs[accum] = (t, _metric_rows(tmp_path / f"accum{accum}"))
  (one, rows1), (four, rows4) = runs[1], runs[4]
  for r1, r4 in zip(rows1, rows4, strict=True):
    for k, v in r1.items():
      if k != "tokens_per_s":
        assert abs(r4[k] - v) <= 1e-5 * max(abs(v), 1.0), (k, v, r4[k])
  for (name, a), (_, b) in zip(_leaves(one.state["params"]), _leaves(four.state["params"])):
    assert np.max(np.abs(a - b)) <= 1e-5, name


def _metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(x) for x in f]


def _cli(config, workdir, overrides, extra=()):
  cmd = [sys.executable, "-m", "llada_jax.train", "--config",
         os.path.join(ROOT, "configs", config), "--workdir", str(workdir), "--no_progress",
         *extra] + [f"--config.{k}={v}" for k, v in overrides.items()]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_then_resumes(tmp_path):
  """SIGTERM during step 2: the step finishes, step 3 is saved, exit 75; the rerun resumes at 3.
  (Resuming with another config: `test_ctrl_c_saves_the_current_step_and_exits_130`.)"""
  d = tmp_path / "run"
  kw = {"steps": 5, "log_every": 1, "ckpt_every": 100, "data.batch_size": 8}
  out = _cli("tiny_ar.py", d, dict(kw, debug_term_at_step=2))
  assert out.returncode == 75, out.stderr[-2000:]
  assert "preempted: stopped after step 3" in out.stderr
  assert sorted(os.listdir(d / "checkpoints")) == ["3"]
  assert [r["step"] for r in _metric_rows(d)] == [1, 2, 3]
  out = _cli("tiny_ar.py", d, kw)
  assert out.returncode == 0, out.stderr[-2000:]
  assert [r["step"] for r in _metric_rows(d)] == [1, 2, 3, 4, 5]
  with open(d / "config.json") as f:
    assert json.load(f)["train"]["optim"]["lr"] == 3e-3


def test_run_identity_rules(tmp_path):
  import copy
  from llada_jax.train import run_files
  cfg = _config()
  rec = lambda c: run_files.record(c, trainer_lib.model_config(c))
  a = rec(cfg)
  ops = _config(mesh="data=2", log_every=7, grad_accum_steps=2, **{"objective.moe_impl": "ep"})
  assert run_files.differences(a, rec(ops)) == []
  assert run_files.differences(a, rec(_config(seed=1))) == ["seed: 0 -> 1"]
  assert set(run_files.differences(a, rec(_config(**{"model.overrides.hidden_size": 32})))) == {
      "model_config.hidden_size: 64 -> 32", "model.overrides.hidden_size: '(unset)' -> 32"}
  run_files.write_json(str(tmp_path / "config.json"), a)
  check = lambda new, **kw: run_files.check(str(tmp_path), new, **{
      "has_checkpoint": True, "force": False, **kw})
  assert check(a) == "resume" and check(rec(ops)) == "resume"
  with pytest.raises(run_files.RunMismatch, match="seed: 0 -> 1"):
    check(rec(_config(seed=1)))
  assert check(rec(_config(seed=1)), force=True) == "forced"
  assert check(rec(_config(seed=1)), has_checkpoint=False) == "fresh"
  warm = copy.deepcopy(a)
  warm["train"]["init_from"] = "/some/hf_dir"
  assert check(warm) == "warm_start"


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_exits_130(tmp_path):
  """A real SIGINT sent to a running trainer: the step in flight finishes, its checkpoint is
  written, one line says so, status 130; the rerun resumes from that step."""
  import signal
  import time
  d = tmp_path / "run"
  kw = {"steps": 500, "log_every": 1, "ckpt_every": 1000, "data.batch_size": 8}
  cmd = [sys.executable, "-m", "llada_jax.train", "--config",
         os.path.join(ROOT, "configs", "tiny_ar.py"), "--workdir", str(d), "--no_progress"]
  cmd += [f"--config.{k}={v}" for k, v in kw.items()]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (d / "metrics.jsonl").exists() and len(_metric_rows(d)) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("interrupted: stopped after step "), err[-2000:]
  step = int(last.split("step ")[1].split()[0])
  assert 2 <= step < 500 and sorted(os.listdir(d / "checkpoints")) == [str(step)]
  # Resuming with another config is refused in one line; --force resumes anyway.
  out = _cli("tiny_ar.py", d, dict(kw, steps=step + 2, **{"optim.lr": 0.01}))
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert "started with another config" in out.stderr and "optim.lr: 0.003 -> 0.01" in out.stderr
  out = _cli("tiny_ar.py", d, dict(kw, steps=step + 2, **{"optim.lr": 0.01}), extra=("--force",))
  assert out.returncode == 0, out.stderr[-2000:]
  assert [r["step"] for r in _metric_rows(d)][-2:] == [step + 1, step + 2]
  with open(d / "config.json") as f:
    assert json.load(f)["train"]["optim"]["lr"] == 0.01
