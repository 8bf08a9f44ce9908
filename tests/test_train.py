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


def _preference_pairs(path, n=64, seed=0):
  """JSONL preference pairs from the toy "repeat" task: the right answer is chosen, another
  example's answer rejected; plain-text records and implicit-prompt conversations mixed."""
  import random
  from llada_jax.train import toy_tasks
  rng = random.Random(seed)
  ex = [toy_tasks.get_task("repeat")(rng) for _ in range(n)]
  with open(path, "w") as f:
    for i, (prompt, answer) in enumerate(ex):
      wrong = ex[(i + 1) % n][1]
      if i % 2:
        rec = {"prompt": prompt, "chosen": answer, "rejected": wrong}
      else:  # a whole conversation per answer (no prompt field): a user turn, then the answer
        turn = [{"role": "user", "content": prompt}]
        rec = {"chosen": turn + [{"role": "assistant", "content": answer}],
               "rejected": turn + [{"role": "assistant", "content": wrong}]}
      f.write(json.dumps(rec) + "\n")
  return path


def test_dpo_on_preference_pairs(tmp_path):
  """configs/tiny_dpo.py (the file the train CLI loads) on a JSONL file of preference pairs
  (`data.source`): the reward margin rises."""
  cfg = _load_config_file(os.path.join(ROOT, "configs", "tiny_dpo.py"))
  pairs = _preference_pairs(tmp_path / "pairs.jsonl")
  with cfg.unlocked():
    cfg.data.task, cfg.data.source = "", str(pairs)
    cfg.optim.lr, cfg.steps, cfg.log_every = 3e-3, 30, 5
  _run(tmp_path, "run", cfg)
  margins = _losses(tmp_path / "run", "margin")
  assert margins[0] < 1.0 and np.mean(margins[-3:]) > 1.0, margins


def test_tiny_dpo_learns_at_its_defaults(tmp_path):
  """configs/tiny_dpo.py as shipped: the reward margin and accuracy on each fresh batch (measured
  before that batch's update) rise well above their start within the default 30 steps."""
  cfg = _load_config_file(os.path.join(ROOT, "configs", "tiny_dpo.py"))
  with cfg.unlocked():
    cfg.log_every = 1
  d = _run(tmp_path, "dpo", cfg)
  margins, acc = _losses(d, "margin"), _losses(d, "reward_accuracy")
  assert abs(margins[0]) < 0.3 and np.mean(margins[-10:]) > 1.0, margins
  assert np.mean(acc[-10:]) > 0.7, acc


def test_ebpo_reward_rises_against_an_lr0_control(tmp_path):
  """configs/tiny_ebpo.py from a briefly SFT-trained model (RL needs a policy that sometimes
  succeeds): the reward climbs well above the same run with lr = 0 (same rollout seeds)."""
  sft = _config(steps=40, **{"optim.lr": 3e-3, "data.eos_padding": "block",
                             "objective.t_min": 0.1, "objective.t_max": 1.0})
  sft.export_hf = str(tmp_path / "sft_hf")
  _run(tmp_path, "sft", sft)
  rewards = {}
  for lr in (None, 0.0):
    cfg = _load_config_file(os.path.join(ROOT, "configs", "tiny_ebpo.py"))
    with cfg.unlocked():
      cfg.init_from, cfg.steps, cfg.log_every = sft.export_hf, 10, 1
      if lr is not None:
        cfg.optim.lr = lr
    d = _run(tmp_path, f"ebpo_{lr}", cfg)
    rewards[lr] = _losses(d, "reward")
    rows = _metric_rows(d)
    assert {"clip_fraction_last", "live", "ratio_std_last", "reward_std",
            "response_length"} <= set(rows[0]), rows[0]
  learnt, control = np.mean(rewards[None][-4:]), np.mean(rewards[0.0][-4:])
  assert 0.2 < rewards[0.0][0] < 0.95, rewards  # the start is mid-range: there is signal
  assert learnt > control + 0.15, rewards


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
  metric agrees to 1e-5 and the updated params to 1e-4, with every term of the objective on
  (editing stream, MTF drafts, complementary masks, CAP, embedding noise). (Adam's first steps
  are sign-like: a near-zero gradient's rounding moves its param by up to ~lr; 6.3e-5 at the
  tests' XLA optimisation level 0, 1.3e-6 at the default level.)"""
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
      if k != "tokens_per_s":  # scalars, and the per-layer MoE loads
        a, b = np.asarray(r4[k], np.float64), np.asarray(v, np.float64)
        assert np.all(np.abs(a - b) <= 1e-5 * np.maximum(np.abs(b), 1.0)), (k, v, r4[k])
  for (name, a), (_, b) in zip(_leaves(one.state["params"]), _leaves(four.state["params"])):
    assert np.max(np.abs(a - b)) <= 1e-4, name


def _metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(x) for x in f]


def _cli_cmd(config, workdir, overrides, extra=()):
  return [sys.executable, "-m", "llada_jax.train", "--config",
          os.path.join(ROOT, "configs", config), "--workdir", str(workdir), "--no_progress",
          *extra] + [f"--config.{k}={v}" for k, v in overrides.items()]


def _cli(config, workdir, overrides, extra=()):
  return subprocess.run(_cli_cmd(config, workdir, overrides, extra), capture_output=True,
                        text=True, cwd=ROOT, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _start_cli(config, workdir, overrides, **popen_kw):
  """The train CLI started in the background (for tests that signal or limit it mid-run)."""
  return subprocess.Popen(_cli_cmd(config, workdir, overrides), cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), **popen_kw)


def test_run_identity_rules(tmp_path):
  import copy
  from llada_jax.train import run_files
  cfg = _config()
  rec = lambda c: run_files.record(c, trainer_lib.model_config(c))
  a = rec(cfg)
  ops = _config(mesh="data=2", log_every=7, grad_accum_steps=2, **{"objective.moe_impl": "ep"})
  assert run_files.differences(a, rec(ops)) == []
  assert run_files.differences(a, rec(_config(seed=1))) == ["seed: 0 -> 1"]
  older = copy.deepcopy(a)  # a run recorded before dpo.reference existed ran it online
  del older["train"]["dpo"]["reference"]
  assert run_files.differences(older, a) == []
  assert run_files.differences(older, rec(_config(**{"dpo.reference": "precomputed"}))) == [
      "dpo.reference: 'online' -> 'precomputed'"]
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
def test_ctrl_c_and_sigterm_save_the_current_step_then_resume(tmp_path):
  """A real SIGINT sent to a running trainer: the step in flight finishes, its checkpoint is
  written, one line says so, status 130. Resuming with another config is refused in one line
  (exit 2); with --force it resumes, and a SIGTERM (a TPU preemption) during its first step
  finishes that step, saves it and exits 75; the rerun resumes and finishes."""
  import signal
  import time
  d = tmp_path / "run"
  kw = {"steps": 500, "log_every": 1, "ckpt_every": 1000, "data.batch_size": 8}
  proc = _start_cli("tiny_ar.py", d, kw)
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
  new = dict(kw, steps=step + 3, **{"optim.lr": 0.01})
  out = _cli("tiny_ar.py", d, new)
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert "started with another config" in out.stderr and "optim.lr: 0.003 -> 0.01" in out.stderr
  out = _cli("tiny_ar.py", d, dict(new, debug_term_at_step=step), extra=("--force",))
  assert out.returncode == 75, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      f"preempted: stopped after step {step + 1} and saved a checkpoint")
  assert str(step + 1) in os.listdir(d / "checkpoints")
  with open(d / "config.json") as f:
    assert json.load(f)["train"]["optim"]["lr"] == 0.01
  out = _cli("tiny_ar.py", d, dict(new, debug_term_at_step=step))  # same config: no --force
  assert out.returncode == 0, out.stderr[-2000:]
  steps = [r["step"] for r in _metric_rows(d)]
  assert steps[-3:] == [step + 1, step + 2, step + 3] and len(steps) == len(set(steps))


def test_balance_expert_bias_nudges_towards_the_mean_and_skips_the_optimizer():
  from llada_jax.train.steps import balance_expert_bias
  old = {"moe": {"router": {"expert_bias": np.zeros((2, 4), np.float32),
                            "weight": np.zeros((3, 4))}}, "embed": np.ones(2)}
  new = {"moe": {"router": {"expert_bias": np.full((2, 4), 0.5, np.float32),  # decayed / moved
                            "weight": np.ones((3, 4))}}, "embed": np.zeros(2)}
  load = np.array([[0, 2, 2, 4], [1, 1, 1, 1]], np.float32)  # layer means 2 and 1
  out = balance_expert_bias(new, old, load, 1e-3)
  np.testing.assert_allclose(out["moe"]["router"]["expert_bias"],
                             [[1e-3, 0, 0, -1e-3], [0, 0, 0, 0]])
  assert out["moe"]["router"]["weight"] is new["moe"]["router"]["weight"]
  assert out["embed"] is new["embed"]
  kept = balance_expert_bias(new, old, load, 0.0)["moe"]["router"]["expert_bias"]
  np.testing.assert_array_equal(kept, old["moe"]["router"]["expert_bias"])


def test_moe_load_is_logged_and_the_bias_balances_it(tmp_path):
  """metrics.jsonl holds per-layer tokens per expert (every real token of the 2L forward, K
  copies each) and max/min load over the mean; with moe_bias_rate the biases move by exactly
  rate * sign(mean - load) per step, and without it they stay as initialised (weight decay on)."""
  import llada_jax
  rows = {}
  for name, rate in (("off", 0.0), ("on", 1e-2)):
    cfg = _config(steps=4, log_every=1, moe_bias_rate=rate, **{"optim.weight_decay": 0.1})
    t = Trainer(cfg, str(tmp_path / name), progress=False)
    t.run()
    with open(tmp_path / name / "metrics.jsonl") as f:
      rows[name] = [json.loads(x) for x in f]
    init = llada_jax.init_params(t.c, jax.random.PRNGKey(cfg.seed))["moe"]["router"]
    bias = np.asarray(t.state["params"]["moe"]["router"]["expert_bias"])
    moved = np.abs(bias - np.asarray(init["expert_bias"]))
    if rate == 0:
      assert moved.max() == 0.0
    else:  # each step moves each entry by -rate, 0 or +rate
      assert moved.max() > 0
      steps = moved / rate
      np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
  c = t.c
  r = rows["off"][0]
  tokens = np.asarray(r["expert_tokens"])
  assert tokens.shape == (c.num_hidden_layers - c.first_k_dense_replace, c.num_experts)
  per_layer = tokens.sum(-1)  # 2L layout: each real token twice, K experts each
  assert len(set(per_layer.tolist())) == 1 and per_layer[0] % (2 * c.num_experts_per_tok) == 0
  real = per_layer[0] / (2 * c.num_experts_per_tok)
  assert 0 < real <= 32 * 8  # at most seq 32 x batch 8 (the task pads its rows)
  np.testing.assert_allclose(r["expert_load_max"], tokens.max(-1) / tokens.mean(-1), rtol=1e-3)
  assert all(x >= 1.0 for x in r["expert_load_max"])
  assert all(0.0 <= x <= 1.0 for x in r["expert_load_min"])


def test_held_out_evaluation_every_n_steps(tmp_path):
  """eval_every: rows of eval_* metrics at those steps, on batches never trained on (a corpus's
  validation split), the same batches and noise each time; the untrained model's held-out loss
  falls as it trains. A corpus without a validation split is refused before any work."""
  src = _corpus(tmp_path)
  cfg = _config(steps=12, log_every=4, eval_every=6, eval_batches=2, **{
      "data.task": "", "data.source": str(src), "data.validation_fraction": 0.25,
      "data.dataset_dir": str(tmp_path / "ds"), "optim.lr": 3e-3})
  t = Trainer(cfg, str(tmp_path / "ev"), progress=False)
  t.run()
  with open(tmp_path / "ev" / "metrics.jsonl") as f:
    rows = [json.loads(x) for x in f]
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [6, 12]
  assert {"eval_m2t_loss", "eval_accuracy", "eval_mask_ratio"} <= set(evals[0])
  assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
  assert evals[0]["eval_masked_tokens"] == evals[1]["eval_masked_tokens"]  # same batches, noise
  from llada_jax.train import data as data_lib
  path = t._train_source.path
  train_docs = data_lib.load_source(path, "train")[1]["documents"]
  held_docs = data_lib.load_source(path, "validation")[1]["documents"]
  assert train_docs + held_docs == 12 and held_docs == 3
  with pytest.raises(ConfigError, match="data.validation_fraction"):
    Trainer(_config(eval_every=5, **{"data.task": "", "data.source": str(src)}),
            str(tmp_path / "x"), progress=False)
  with pytest.raises(ConfigError, match="bdlm stage"):
    Trainer(_config("dpo", eval_every=5), str(tmp_path / "y"), progress=False)


@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_last_checkpoint_and_says_so(tmp_path):
  """The disk 'fills up' mid-run (RLIMIT_FSIZE lowered on the running trainer: every write past
  64 KiB fails, as on a full disk): exit 2, the last line names the error and the intact
  checkpoint, no partial checkpoint is left; the rerun resumes from it and finishes."""
  import resource
  import signal
  import time
  d = tmp_path / "run"
  kw = {"steps": 400, "log_every": 1, "ckpt_every": 3, "data.batch_size": 8}
  proc = _start_cli("tiny_ar.py", d, kw,
                    preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
  deadline = time.time() + 300
  while time.time() < deadline and not (d / "checkpoints" / "3").exists():
    time.sleep(0.1)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (65536, 65536))
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"error: cannot write a checkpoint in {d / 'checkpoints'} (File too "
                         "large): training stopped; the last complete checkpoint, step "), last
  kept = int(last.split("checkpoint, step ")[1].split(",")[0])
  names = sorted(os.listdir(d / "checkpoints"))
  assert str(kept) in names and all(n.isdigit() for n in names), names
  out = _cli("tiny_ar.py", d, dict(kw, steps=kept + 3), extra=("--force",))  # a shorter run
  assert out.returncode == 0, out.stderr[-2000:]
  steps = [r["step"] for r in _metric_rows(d)]
  assert steps[-3:] == [kept + 1, kept + 2, kept + 3] and len(steps) == len(set(steps))


def test_eval_in_micro_batches_equals_one_batch():
  """Held-out evaluation splits its batch like the training step (same peak memory): the
  metrics of 4 micro-batches equal one pass over the batch."""
  import llada_jax
  from llada_jax.train import steps
  cfg = _config(**{"data.task": "addition", "objective.edit_rate": 0.2,
                   "objective.moe_impl": "ragged", "objective.attention_impl": "xla"})
  c = trainer_lib.model_config(cfg)
  params = llada_jax.init_params(c, jax.random.PRNGKey(0))
  src = trainer_lib.make_source(cfg, trainer_lib.make_tokenizer(cfg, c), 8)
  batch = {k: jax.numpy.asarray(v) for k, v in next(src).items()}
  oc = trainer_lib.objective_config(cfg, 8, 0)
  run = lambda accum: jax.jit(steps.bdlm_eval, static_argnums=0)(
      steps.StepSpec(c, oc=oc, accum=accum), params, batch, jax.random.PRNGKey(1))
  one, four = run(1), run(4)
  for k, v in one.items():
    np.testing.assert_allclose(np.asarray(four[k]), np.asarray(v), rtol=1e-5, atol=1e-6,
                               err_msg=k)


def test_export_hf_carries_the_runs_tokenizer(tmp_path):
  """A run with a tokenizer directory exports it next to the weights: the exported directory is
  a checkpoint that `llada_jax.LLM` (text in, text out) loads on its own."""
  from llada_jax.llm import DEFAULT_CHECKPOINT, LLM
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("def add(a, b):\n    return a + b\n" * 40)
  cfg = _config(steps=1, **{"data.task": "", "data.source": str(corpus)})
  cfg.init_from = cfg.tokenizer = DEFAULT_CHECKPOINT
  cfg.model.overrides = {}
  cfg.export_hf = str(tmp_path / "export")
  _run(tmp_path, "ft", cfg)
  names = sorted(os.listdir(cfg.export_hf))
  assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names), names
  llm = LLM(cfg.export_hf)
  assert llm.decode(llm.prompt_ids("def add(a, b):")) == "def add(a, b):"  # the code tokenizer
  out = llm.generate("def add(a, b):", gen_length=8, block_length=8)[0]
  assert isinstance(out.text, str) and out.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["math", "code"])
def test_ebpo_on_a_prompt_set_through_the_cli(tmp_path, reward):
  """The acceptance command: `python -m llada_jax.train --config configs/tiny_ebpo.py
  --config.data.source=PROMPTS.jsonl --config.reward=math|code`, on `{"prompt", "answer"}` /
  `{"prompt", "tests"}` records (chat `messages` too); a bad record is one line naming it, or is
  skipped and counted with data.bad_records=skip; the run resumes where it stopped."""
  src = tmp_path / "prompts.jsonl"
  recs = []
  for i in range(6):
    rec = ({"prompt": f"{i}+{i}=", "answer": 2 * i} if reward == "math" else
           {"prompt": f"def f(x): return x*{i}", "tests": [f"assert f(1) == {i}"]})
    if i % 2:
      rec["messages"] = [{"role": "user", "content": rec.pop("prompt")}]
    recs.append(rec)
  src.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"prompt": "no answer"}\n')
  kw = {"data.task": "", "data.source": str(src), "reward": reward, "steps": 2, "log_every": 1,
        "ckpt_every": 1, "data.batch_size": 2, "ebpo.group_size": 2}
  out = _cli("tiny_ebpo.py", tmp_path / "bad", kw)
  need = "answer" if reward == "math" else "tests"
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
      f"error: {src}:7: missing field '{need}' (the reward needs it)"), out.stderr[-2000:]
  d = tmp_path / "run"
  kw["data.bad_records"] = "skip"
  out = _cli("tiny_ebpo.py", d, kw)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = _metric_rows(d)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["data_skipped"] == 1 and 0.0 <= r["reward"] <= 1.0 for r in rows), rows
  if reward == "math":  # (resuming does not depend on the reward)
    out = _cli("tiny_ebpo.py", d, dict(kw, steps=3), extra=("--force",))
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in _metric_rows(d)] == [1, 2, 3]


def test_sft_block_padding_and_packing_are_reachable_from_the_config(tmp_path):
  """data.block_padding and data.pack (SFT): the trainer's batches hold several examples per row,
  each starting on a block boundary and padded (and trained) to a whole block; a run trains on
  them; data.pack on a pretraining corpus is one line."""
  src = tmp_path / "chat.jsonl"
  src.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n"
                         for i in range(40)))
  kw = {"data.task": "", "data.source": str(src), "data.kind": "sft", "data.pack": True,
        "data.block_padding": True, "steps": 2}
  cfg = _config(**kw)
  d = _run(tmp_path, "sft", cfg)
  assert all(np.isfinite(_losses(d)))
  t = Trainer(_config(**kw), str(tmp_path / "sft2"), progress=False)
  batch = next(trainer_lib.make_source(t.cfg, t.tokenizer, 8))
  seg, mask = batch["segment_ids"], batch["loss_mask"]
  assert seg.max() >= 2  # several examples in a row
  for row_seg, row_mask in zip(seg, mask):
    for k in range(row_seg.max() + 1):
      idx = np.flatnonzero(row_seg == k)
      assert idx[0] % 8 == 0 and len(idx) % 8 == 0 and row_mask[idx[-1]]  # trained padding
  with pytest.raises(ConfigError, match="data.pack=True packs SFT examples"):
    Trainer(_config(**dict(kw, **{"data.kind": "pretrain"})), str(tmp_path / "x"),
            progress=False)


def test_dpo_on_a_tfds_dataset_of_pairs(tmp_path):
  """configs/tiny_dpo.py with data.source a prepared tfds (array_record) dataset of chat
  preference pairs: it trains and logs the reward accuracy and margins."""
  from conftest import write_tfds
  msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  recs = [{"chosen": msgs(f"{i}+1=", str(i + 1)), "rejected": msgs(f"{i}+1=", str(i + 3))}
          for i in range(8)]
  ds = write_tfds(recs, {"chosen": "messages", "rejected": "messages"}, tmp_path / "data",
                  "pairs")
  cfg = _load_config_file(os.path.join(ROOT, "configs", "tiny_dpo.py"))
  with cfg.unlocked():
    cfg.data.task, cfg.data.source = "", ds
    cfg.steps, cfg.log_every = 3, 1
  rows = _metric_rows(_run(tmp_path, "run", cfg))
  assert len(rows) == 3 and all(
      {"reward_accuracy", "margin", "chosen_delta"} <= set(r) for r in rows)


def test_dpo_with_precomputed_reference(tmp_path):
  """dpo.reference=precomputed: the reference's ELBOs are computed once per pair (a table the
  steps read; no reference params while training). The table is batch-independent (each pair
  alone gives the same value: per-record noise, right ids), the first step's policy-minus-
  reference deltas are 0 up to float rounding of a different batch composition (the step draws
  each record's noise as the table did: another draw would move an ELBO by whole nats), and the
  reward margin rises as with the online reference."""
  from llada_jax.train import dpo as dpo_lib
  from llada_jax.train.preferences import PairSource
  cfg = _load_config_file(os.path.join(ROOT, "configs", "tiny_dpo.py"))
  pairs = _preference_pairs(tmp_path / "pairs.jsonl")
  with cfg.unlocked():
    cfg.data.task, cfg.data.source = "", str(pairs)
    cfg.dpo.reference = "precomputed"
    cfg.optim.lr, cfg.steps, cfg.log_every = 3e-3, 30, 1
  trainer = Trainer(cfg, str(tmp_path / "run"), progress=False)
  rows = _metric_rows(_run(tmp_path, "run", cfg))
  assert abs(rows[0]["chosen_delta"]) < 1e-3 and abs(rows[0]["rejected_delta"]) < 1e-3, rows[0]
  margins = [r["margin"] for r in rows]
  assert np.mean(margins[-3:]) > 1.0, margins

  src = PairSource(str(pairs), trainer.tokenizer, cfg.data.seq_len, cfg.data.batch_size,
                   cfg.seed)
  params = trainer._reference_params(trainer._initial_state()["params"])
  table = trainer._precompute_reference(src, params, cfg.objective.block_length)
  oc = trainer._objective(cfg.objective.block_length, 0)
  for i in (0, 3, src.size - 1):  # one pair alone: a batch of 1 row
    ch, rj = src._pair([src.pairs[i]])
    noise = dpo_lib.record_noise(trainer._record_key, ch, rj, oc)
    alone = dpo_lib.reference_elbos(params, trainer.c, ch, rj, noise, oc)
    np.testing.assert_allclose(table[i], [alone["chosen"][0], alone["rejected"][0]], rtol=1e-5)


def test_precomputed_reference_needs_pairs_and_one_block():
  cases = [(dict(reference="precomputed"), "needs data.source"),  # tiny_dpo: a toy task
           (dict(reference="precomputed", source=ROOT), "and no data.task"),
           (dict(reference="precomputed", source=ROOT, task="", wsd=True), "one block length"),
           (dict(reference="cached"), "choose from online, precomputed")]
  for case, words in cases:
    cfg = _load_config_file(os.path.join(ROOT, "configs", "tiny_dpo.py"))
    with cfg.unlocked():
      cfg.dpo.reference = case["reference"]
      cfg.data.source = case.get("source", cfg.data.source)
      cfg.data.task = case.get("task", cfg.data.task)
      if case.get("wsd"):
        cfg.wsd.enabled, cfg.wsd.stages = True, ((5, 4), (cfg.steps - 5, 8))
    with pytest.raises(ConfigError, match=words):
      trainer_lib.validate(cfg)
