"""The benchmark tools behind the results files: `tools/bench_modes.py` and the held-out
likelihoods of `experiments/code_model_eval.py`."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import llada_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "llada2_tiny")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_modes  # noqa: E402
from experiments import code_model_eval  # noqa: E402


@pytest.fixture(scope="module")
def model():
  return llada_jax.load_hf_checkpoint(TINY)


def test_bench_modes_prints_one_row_per_setting(tmp_path, capsys):
  out = tmp_path / "rows.json"
  assert bench_modes.main(["--checkpoint", TINY, "--per-task", "2", "--tasks", "add2,pick",
                           "--settings", "quality,speedy", "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "hardware:" in text and "compile s" in text and "tok/s" in text
  rows = json.loads(out.read_text())
  assert [r["name"] for r in rows] == ["quality", "speedy"]
  for r in rows:
    assert r["n"] == r["batch_size"] == 4 and 0.0 <= r["accuracy"] <= 1.0
    assert set(r["accuracy_by_task"]) == {"add2", "pick"}
    assert r["mean_tpf"] > 0 and r["jax_version"]
    assert f"{r['accuracy']:.3f}" in text


@pytest.mark.parametrize("argv, msg", [
    (["--settings", "warp"], "unknown setting 'warp'"),
    (["--checkpoint", "/nonexistent"], "no checkpoint in /nonexistent"),
])
def test_bench_modes_bad_flags(argv, msg, capsys):
  with pytest.raises(SystemExit) as e:
    bench_modes.main(["--checkpoint", TINY] + argv)
  assert e.value.code == 2 and msg in capsys.readouterr().err


class _Chars:
  def encode(self, text):
    return [ord(ch) % 256 for ch in text]


def test_held_out_windows_take_files_in_turn(tmp_path):
  files = []
  for i, n in enumerate((3 * code_model_eval.WINDOW + 5, code_model_eval.WINDOW)):
    p = tmp_path / f"m{i}.py"
    p.write_text(chr(ord("a") + i) * n)
    files.append(str(p))
  w = code_model_eval.held_out_windows(files, _Chars(), 3)
  assert w.shape == (3, code_model_eval.WINDOW)
  assert [chr(r[0]) for r in w] == ["a", "b", "a"]  # file 0, file 1, then file 0 again
  with pytest.raises(SystemExit, match="only 4 held-out windows"):
    code_model_eval.held_out_windows(files, _Chars(), 5)


def test_ar_nll_is_the_next_token_log_likelihood(model):
  """The AR NLL of the 2L block-1 layout equals, position by position, -log p(x_i) from the
  inference forward of `x_<i` followed by a mask (block length 1: causal)."""
  config, params = model
  rng = np.random.default_rng(0)
  windows = rng.integers(0, 500, (2, 8)).astype(np.int32)
  got = code_model_eval.likelihoods(params, config, windows, draws=2, seed=0)
  ref = []
  for row in windows:
    for i in range(len(row)):
      ids = np.full(len(row), config.pad_token_id, np.int32)
      ids[:i] = row[:i]
      ids[i] = config.mask_token_id
      logits = llada_jax.forward(params, config, jnp.asarray(ids)[None], block_length=1)
      logp = np.asarray(jnp.log(jnp.exp(logits[0, i] - logits[0, i].max()).sum())
                        + logits[0, i].max() - logits[0, i, row[i]])
      ref.append(float(logp))
  np.testing.assert_allclose(got["ar_nll"], np.mean(ref), rtol=1e-4)
  assert got["ar_ppl"] == pytest.approx(np.exp(got["ar_nll"]))
  assert got["bdlm_nelbo"] > 0 and got["mdlm_nelbo"] > 0


def test_corpus_pieces_cut_at_blank_lines_and_join_back():
  from experiments.train_default_model import split_source
  text = "".join(f"def f{i}():\n    return {i}\n\n" for i in range(200)) + "x = 1\n" * 500
  pieces = split_source(text, chunk_chars=300)
  assert "".join(pieces) == text and len(pieces) > 5
  for p in pieces[:-1]:
    assert len(p) >= 300 and (p.endswith("\n\n") or len(p) >= 900)
  assert any(p.endswith("\n\n") for p in pieces) and max(map(len, pieces)) < 950


def test_idiom_corpus_is_python_and_keeps_its_held_out_words_out_of_training():
  import re

  from experiments import python_idioms
  train = python_idioms.documents(300, seed=0)
  held = python_idioms.documents(50, seed=1, split="held_out")
  assert train == python_idioms.documents(300, seed=0) and train != python_idioms.documents(
      300, seed=1)
  for doc in train + held:
    compile(doc, "<idiom>", "exec")
  words = lambda docs: set(re.findall(r"[a-z]+", " ".join(docs).lower()))
  held_out = set(python_idioms.HELD_OUT)
  assert not words(train) & held_out
  assert len(words(held) & held_out) > len(held_out) // 2
  # every held-out document names things with held-out words (in plurals and CamelCase too)
  assert all(any(w in d.lower() for w in held_out) for d in held)
  # ... and none holds an algorithm unit (the same text in every split)
  assert not any(f"def {name}(" in d for d in held for name in python_idioms.ALGORITHMS)
  assert any(d.count("def __init__") for d in train) and any("Args:" in d for d in train)


def test_paired_gain_compares_the_same_steps_of_run_and_control():
  from experiments.post_training import paired_gain
  run = [{"step": k, "reward": r} for k, r in enumerate([0.5, 0.5, 0.7, 0.9], 1)]
  control = [{"step": k, "reward": r} for k, r in enumerate([0.5, 0.6, 0.5, 0.6], 1)]
  mean, se = paired_gain(run, control, start=3)  # steps 3 and 4: +0.2, +0.3
  assert mean == pytest.approx(0.25) and se == pytest.approx(0.05)
  assert paired_gain(run, control, start=1)[0] == pytest.approx(0.1)


@pytest.mark.slow
def test_post_training_experiment_runs_end_to_end(tmp_path):
  """`experiments/post_training.py` in miniature (a few steps each): the data files, the base
  model, EBPO / DPO and their lr = 0 controls, the held-out evaluation, the tables and the plot."""
  pytest.importorskip("matplotlib")
  from experiments import post_training
  res = tmp_path / "results"
  assert post_training.main(["--sft-steps", "4", "--rl-steps", "3", "--dpo-steps", "3",
                             "--rl-prompts", "2", "--n-test", "8",
                             "--workdir", str(tmp_path / "work"),
                             "--results", str(res)]) == 0
  rec = json.loads((res / "post_training.json").read_text())
  assert set(rec["summary"]) == {"ebpo", "ebpo_lr0", "dpo", "dpo_lr0"}
  for name, s in rec["summary"].items():
    assert 0.0 <= s["greedy_accuracy"] <= 1.0 and np.isfinite(s["first10"]), (name, s)
  assert len(rec["curves"]["ebpo"]) == 3 and len(rec["curves"]["dpo"]) == 3
  # the lr = 0 control does not move: its policy equals its reference (margin 0 at every step)
  assert all(abs(r["margin"]) < 1e-5 for r in rec["curves"]["dpo_lr0"])
  assert rec["summary"]["ebpo"]["gain_from_step"] == 2  # the second half of 3 steps
  md = (res / "post_training.md").read_text()
  assert "| ebpo_lr0 |" in md and "| dpo |" in md and (res / "post_training.png").stat().st_size
  assert "post_training.py --sft-steps 4 --rl-steps 3" in md  # the command, as it was run
  with open(tmp_path / "work" / "prompts.jsonl") as f:
    assert all({"prompt", "answer"} <= set(json.loads(line)) for line in f)
