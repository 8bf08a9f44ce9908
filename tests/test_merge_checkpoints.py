"""tools/merge_checkpoints.py: the top-k checkpoint merge picks the k best checkpoints by a
held-out metric, writes the float32 mean of their params as a loadable, decodable HF checkpoint,
and reports bad input in one line (exit status 2) before restoring anything."""

import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

import llada_jax
from llada_jax.config import tiny_config
from llada_jax.train.defaults import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
try:
  import merge_checkpoints as tool
finally:
  sys.path.pop(0)

BYTE_MODEL = dict(vocab_size=264, pad_token_id=257, eos_token_id=256, mask_token_id=258)


def _config(**kw):
  """The smallest training run with held-out evaluation (a toy task: eval batches from another
  seed): the tiny preset on byte ids."""
  c = base_config()
  c.model.overrides.update(BYTE_MODEL)
  c.data.task = "repeat"
  c.data.seq_len, c.data.batch_size = 32, 8
  c.objective.block_length = 8
  c.eval_batches = 1
  for key, value in kw.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _error_line(err: str) -> str:
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def _rows(path):
  with open(path) as f:
    return [json.loads(x) for x in f if x.strip()]


def _restore_state(workdir, step):
  """The whole train state of checkpoint `step` as numpy arrays (orbax's own metadata; not
  the tool's partial restore)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(getattr(tree, "item_metadata", None), "tree", tree)
  args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                                is_leaf=lambda x: hasattr(x, "shape"))
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ---- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_merges_the_k_best_checkpoints_by_eval_loss(tmp_path, capsys):
  """A run saving every step and evaluating every second one: the odd steps have no eval_loss
  and are ignored (a line says so), the merged checkpoint holds exactly the float32 mean of the
  params of the k checkpoints with the lowest eval_loss in metrics.jsonl, loads and decodes."""
  from llada_jax.decode.__main__ import main as decode_main
  from llada_jax.train.trainer import Trainer
  workdir = str(tmp_path / "run")
  Trainer(_config(steps=6, log_every=2, eval_every=2, ckpt_every=1, keep=10), workdir,
          progress=False).run()
  capsys.readouterr()
  k = 2
  assert tool.main(["--workdir", workdir, "--k", str(k)]) == 0
  out = capsys.readouterr().out
  assert "3 checkpoint(s) without a finite eval_loss at their step ignored (steps 1, 3, 5)" in out

  on_disk = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert on_disk == [1, 2, 3, 4, 5, 6]
  evals = {r["step"]: r["eval_loss"] for r in _rows(os.path.join(workdir, "metrics.jsonl"))
           if "eval_loss" in r}
  assert sorted(evals) == [2, 4, 6]
  best = sorted((v, s) for s, v in evals.items() if s in on_disk)[:k]
  merged_dir = os.path.join(workdir, f"merged_top{k}")
  with open(os.path.join(merged_dir, "merge.json")) as f:
    record = json.load(f)
  assert record["metric"] == "eval_loss" and record["k"] == k
  assert record["steps"] == [s for _, s in best]
  assert record["values"] == [v for v, _ in best]
  assert record["ignored_steps"] == [1, 3, 5]
  for s in record["steps"]:  # the table shows each chosen step with its value
    assert f"{s:>8}  {evals[s]:>10.6g}" in out

  # the merged params: the float32 mean (summed in merge.json's order) of the chosen params
  states = [_leaves(_restore_state(workdir, s)["params"]) for s in record["steps"]]
  config, params = llada_jax.load_hf_checkpoint(merged_dir)
  assert config.dtype == "float32" and config.vocab_size == BYTE_MODEL["vocab_size"]
  merged = _leaves(params)
  assert set(merged) == set(states[0])
  moved = 0
  for name, got in merged.items():
    want = states[0][name].astype(np.float32)
    for st in states[1:]:
      want = want + st[name].astype(np.float32)
    want = want / np.float32(len(states))
    assert got.dtype == np.float32, name
    np.testing.assert_array_equal(got, want, err_msg=name)
    moved += not np.array_equal(got, states[0][name])
  assert moved > len(merged) // 2  # a mean, not a copy of one checkpoint

  assert decode_main(["--checkpoint", merged_dir, "--prompt-ids", "1,2,3", "--gen-length", "8",
                      "--block-length", "8", "--format", "json"]) == 0
  decoded = json.loads(capsys.readouterr().out)
  assert len(decoded["output_ids"]) == 8
  assert all(0 <= t < config.vocab_size for t in decoded["output_ids"])


# ---- choosing ------------------------------------------------------------------------------------
def test_select_lowest_first_ignoring_missing_and_non_finite():
  rows = [{"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 3.0}, {"step": 4, "eval_loss": 2.0},
          {"step": 6, "eval_loss": float("nan")}, {"step": 8, "eval_loss": 2.0},
          {"step": 10, "eval_loss": 9.0}, {"step": 10, "eval_loss": 1.5}]  # a rerun: last wins
  values = tool.metric_by_step(rows, "eval_loss")
  assert values[10] == 1.5 and math.isnan(values[6])
  chosen, ignored = tool.select([2, 4, 6, 8, 10, 12], values, 3)
  assert chosen == [(10, 1.5), (4, 2.0), (8, 2.0)]  # ties: the earlier step first
  assert ignored == [6, 12]
  assert tool.select([2, 4], values, 5) == ([(4, 2.0), (2, 3.0)], [])


def test_copies_the_tokenizer_files_there_are(tmp_path):
  src, dst = tmp_path / "tok", tmp_path / "out"
  src.mkdir()
  dst.mkdir()
  (src / "tokenizer.json").write_text("{}")
  (src / "tokenizer_config.json").write_text('{"chat_template": "x"}')
  (src / "notes.txt").write_text("not a tokenizer file")
  assert tool.copy_tokenizer(str(src), str(dst)) == ["tokenizer.json", "tokenizer_config.json"]
  assert sorted(os.listdir(dst)) == ["tokenizer.json", "tokenizer_config.json"]


# ---- bad input: one line, status 2, nothing restored or written ----------------------------------
def _fake_run(root, steps=(2, 4, 6), evals=None, metrics=True, config=True):
  """A run directory with the layout of python -m llada_jax.train but empty checkpoints (the
  checks come before any of them is read)."""
  evals = {2: 3.0, 4: 2.0} if evals is None else evals
  w = root / "run"
  for s in steps:
    (w / "checkpoints" / str(s)).mkdir(parents=True)
  w.mkdir(exist_ok=True)
  if config:
    record = dict(train=dict(tokenizer="bytes"),
                  model_config=dataclasses.asdict(tiny_config(**BYTE_MODEL)))
    (w / "config.json").write_text(json.dumps(record))
  if metrics:
    rows = [{"step": s, "loss": 5.0, "expert_load_max": [1.0, 2.0]} for s in steps]
    rows += [{"step": s, "eval_loss": v} for s, v in evals.items()]
    (w / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return w


@pytest.mark.parametrize("setup, argv, expected", [
    (None, ["--workdir", "{root}/nope", "--k", "2"], "no such run directory: {root}/nope"),
    ("empty", ["--workdir", "{root}/empty", "--k", "2"], "{root}/empty has no checkpoints"),
    ("run", ["--workdir", "{root}/run", "--k", "0"], "--k 0: must be >= 1"),
    ("run", ["--workdir", "{root}/run", "--k", "x"], "argument --k: invalid int value: 'x'"),
    ("run", ["--workdir", "{root}/run"], "the following arguments are required: --k"),
    ("run", ["--workdir", "{root}/run", "--k", "2", "--metric", "eval_los"],
     ("--metric eval_los: no row of {root}/run/metrics.jsonl records it (evaluation rows need "
      "eval_every > 0 in the run); it records eval_loss, loss")),
    ("run", ["--workdir", "{root}/run", "--k", "1", "--metric", "expert_load_max"],
     "--metric expert_load_max: not a number"),
    ("run", ["--workdir", "{root}/run", "--k", "3"],
     ("--k 3: only 2 checkpoint(s) in {root}/run have a value of eval_loss recorded at their "
      "step (steps 2, 4); lower --k or add --allow-fewer")),
    ("no_evals", ["--workdir", "{root}/run", "--k", "1", "--allow-fewer"],
     "none of the 3 checkpoints in {root}/run (steps 2, 4, 6) has a finite eval_loss"),
    ("no_metrics", ["--workdir", "{root}/run", "--k", "1"], "{root}/run has no metrics.jsonl"),
    ("no_config", ["--workdir", "{root}/run", "--k", "1"], "{root}/run has no config.json"),
], ids=["no_workdir", "no_checkpoints", "k0", "k_not_int", "k_missing", "unknown_metric",
        "list_metric", "fewer_than_k", "no_values", "no_metrics", "no_config"])
def test_bad_input_is_one_line_and_status_2(setup, argv, expected, tmp_path, capsys):
  if setup == "empty":
    (tmp_path / "empty").mkdir()
  elif setup == "no_evals":
    _fake_run(tmp_path, evals={})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:  # recorded, but at no checkpoint
      f.write(json.dumps({"step": 3, "eval_loss": 1.0}) + "\n")
  elif setup:
    _fake_run(tmp_path, metrics=setup != "no_metrics", config=setup != "no_config")
  root = str(tmp_path)
  assert tool.main([a.format(root=root) for a in argv]) == 2
  captured = capsys.readouterr()
  assert expected.format(root=root) in _error_line(captured.err)
  assert captured.out == ""
  assert not list(tmp_path.glob("**/merged_top*"))
