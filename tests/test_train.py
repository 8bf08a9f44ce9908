"""Trainer: exact resume after SIGKILL, each stage learns, bad configs and NaN stop cleanly."""

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


def _train_cli(workdir, config_overrides, check=True):
  cmd = [sys.executable, "-m", "llada_jax.train", "--config",
         os.path.join(ROOT, "configs", "tiny_pretrain.py"), "--workdir", str(workdir),
         "--no_progress"] + [f"--config.{k}={v}" for k, v in config_overrides.items()]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if check:
    assert out.returncode == 0, out.stderr[-2000:]
  return out


def _final_params(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]["params"]


def test_sigkill_and_resume_is_bit_identical(tmp_path):
  """A run SIGKILLed mid-way and resumed equals an uninterrupted run: metrics and params."""
  src = _corpus(tmp_path)
  common = {"data.source": str(src), "data.dataset_dir": str(tmp_path / "ds"), "steps": 12,
            "ckpt_every": 4, "log_every": 2}
  _train_cli(tmp_path / "a", common)
  killed = _train_cli(tmp_path / "b", dict(common, debug_kill_at_step=6), check=False)
  assert killed.returncode == -9  # really SIGKILLed
  assert not os.path.exists(tmp_path / "b" / "checkpoints" / "12")
  _train_cli(tmp_path / "b", common)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
  with open(tmp_path / "a" / "metrics.jsonl") as fa, open(tmp_path / "b" / "metrics.jsonl") as fb:
    rows_a = strip(json.loads(x) for x in fa)
    rows_b = strip(json.loads(x) for x in fb)
  assert [r["step"] for r in rows_a] == [2, 4, 6, 8, 10, 12]
  assert rows_a == rows_b
  pa, pb = _final_params(tmp_path / "a", 12), _final_params(tmp_path / "b", 12)
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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


def test_cli_rejects_unknown_key_in_one_line(tmp_path):
  out = _train_cli(tmp_path / "x", {"no_such_key": 1}, check=False)
  assert out.returncode == 2
  assert out.stderr.count("\n") == 1 and "no_such_key" in out.stderr, out.stderr


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
