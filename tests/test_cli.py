"""`python -m llada_jax.decode` and `tools/logits.py`: fixture parity and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.decode.__main__ import main
from conftest import FIXTURE_NAMES, expected_output, golden, run_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_RUNS = [(name, i) for name in FIXTURE_NAMES for i in range(len(golden(name).runs()))]


def _flags(g, run):
  kw = run_kwargs(g, run)
  argv = ["--checkpoint", g.dir, "--prompt-ids", ",".join(map(str, g.prompt)), "--format",
          "json"]
  for k, v in kw.items():
    if isinstance(v, bool):
      argv.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
    else:
      argv += [f"--{k.replace('_', '-')}", str(v)]
  return argv


@pytest.mark.parametrize("name, i", ALL_RUNS,
                         ids=[f"{n}-{golden(n).runs()[i]['name']}" for n, i in ALL_RUNS])
def test_cli_reproduces_fixture_runs(name, i, capsys):
  g = golden(name)
  run = g.runs()[i]
  assert main(_flags(g, run)) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["output_ids"] == expected_output(g, run)
  assert out["nfe"] == run["nfe"]
  assert out["settings"]["algorithm"] == run_kwargs(g, run)["algorithm"]
  assert out["tpf"] == pytest.approx(len(out["output_ids"]) / run["nfe"])


@pytest.mark.parametrize("impl", ["fused", "pallas"])
def test_cli_sampler_impl_reproduces_fixture_runs(impl, capsys):
  """`--sampler-impl`: the LM head fused into the sampler gives the fixture's tokens and NFE."""
  g = golden("llada2_tiny")
  for run in g.runs()[:3]:
    assert main(_flags(g, run) + ["--sampler-impl", impl]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["output_ids"], out["nfe"]) == (expected_output(g, run), run["nfe"]), run["name"]


@pytest.mark.parametrize("argv, msg", [
    (["--mode", "turbo", "--prompt-ids", "1"], "unknown mode"),
    (["--prompt-ids", "1", "--gen-length", "x"], "invalid int value"),
    (["--prompt-ids", "1,a"], "comma-separated integers"),
    (["--prompt", "hello"], "needs a tokenizer.json"),
    (["--prompt-ids", "1", "--gen-length", "600"], "exceeds the model context"),
    (["--prompt-ids", "1", "--bogus"], "unrecognized arguments"),
    (["--prompt-ids", "1", "--algorithm", "x"], "invalid decode setting"),
    (["--prompt-ids", "1", "--threshold"], "expected one argument"),
    ([], "give --prompt"),
    (["--prompt-ids", ""], "empty"),
    (["--prompt-ids", "1", "--sampler-impl", "fast"], "unknown sampler_impl 'fast'"),
])
def test_cli_errors_are_one_line(tiny, argv, msg, capsys):
  assert main(["--checkpoint", tiny.dir] + argv) == 2
  err = capsys.readouterr().err
  assert msg in err and err.count("\n") == 1, err


def test_cli_bad_checkpoint(tmp_path, capsys):
  assert main(["--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
  assert "config.json" in capsys.readouterr().err


def test_cli_entry_point_subprocess(tiny, tmp_path):
  """The real module entry point: text output, exit status 2 on a bad flag, and the persistent
  compilation cache: the first call fills it, a repeat call of the same command finds every
  program there (no new entry) and prints the same answer."""
  cache = tmp_path / "cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu", LLADA_JAX_COMPILATION_CACHE="1",
             LLADA_JAX_CACHE_DIR=str(cache))
  argv = [sys.executable, "-m", "llada_jax.decode", "--checkpoint", tiny.dir, "--prompt-ids",
          "1,2,3", "--gen-length", "8", "--block-length", "8"]
  ok = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "nfe" in ok.stdout and "tpf" in ok.stdout
  entries = sorted(os.listdir(cache))
  assert entries  # the decode program (and the load's small programs) were stored
  again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert again.returncode == 0, again.stderr
  assert sorted(os.listdir(cache)) == entries  # every program came from the cache
  assert again.stdout.splitlines()[0] == ok.stdout.splitlines()[0]
  off = subprocess.run(argv + ["--no-compilation-cache"], capture_output=True, text=True,
                       env=dict(env, LLADA_JAX_CACHE_DIR=str(tmp_path / "unused")), cwd=ROOT,
                       timeout=300)
  assert off.returncode == 0 and not os.path.exists(tmp_path / "unused")
  bad = subprocess.run([sys.executable, "-m", "llada_jax.decode", "--checkpoint", tiny.dir,
                        "--mode", "warp", "--prompt-ids", "1"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip() == (
      "error: unknown mode 'warp'; choose from quality, speedy")


def test_cli_entry_point_bad_weights_one_line(tiny, tmp_path):
  """The real entry point on a corrupt safetensors file: one line, status 2, no traceback."""
  import shutil
  ckpt = tmp_path / "ckpt"
  shutil.copytree(tiny.dir, ckpt)
  (ckpt / "model.safetensors").write_bytes(b"\0" * 100)
  p = subprocess.run([sys.executable, "-m", "llada_jax.decode", "--checkpoint", str(ckpt),
                      "--prompt-ids", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
  assert p.stderr.startswith(f"error: {ckpt}/model.safetensors is not a readable safetensors")


def test_embedded_model_completes_code_and_chat_is_opt_in(capsys):
  """Without --checkpoint the embedded base model continues the prompt text as it is (and the
  text output starts with the prompt); --chat applies its chat template instead."""
  from llada_jax.decode.__main__ import DEFAULT_CHECKPOINT
  from llada_jax.tokenizer import Tokenizer
  tok = Tokenizer.from_dir(DEFAULT_CHECKPOINT)
  assert tok.chat_template  # the template ships, it is just not the default for this model
  base = ["--prompt", "def f(x):", "--gen-length", "32", "--format", "json"]
  assert main(base) == 0
  plain = json.loads(capsys.readouterr().out)
  assert plain["prompt_ids"] == tok.encode("def f(x):")
  assert main(base + ["--chat"]) == 0
  chat = json.loads(capsys.readouterr().out)
  assert chat["prompt_ids"] == tok.encode(tok.apply_chat_template("def f(x):"))
  assert main(base[:-2]) == 0
  text = capsys.readouterr().out
  assert text.startswith("def f(x):") and "-- " in text and "nfe" in text


def test_embedded_model_acceptance_more_than_one_token_per_forward(capsys):
  """The README's first command: Python-looking text from the shipped model; Quality fills more
  than one token per forward and Speedy (lower thresholds, editing) at least two, in fewer
  forwards than Quality (issue 18's acceptance on this prompt; the held-out prompt sets are
  measured by experiments/code_model_eval.py)."""
  out = {}
  for mode in ("quality", "speedy"):
    assert main(["--mode", mode, "--prompt", "def fibonacci(n):", "--format", "json"]) == 0
    out[mode] = json.loads(capsys.readouterr().out)
    assert len(out[mode]["output_ids"]) == 128
    assert out[mode]["tpf"] == pytest.approx(128 / out[mode]["nfe"])
    assert "return" in out[mode]["text"] and "\n    " in out[mode]["text"]
  assert out["quality"]["tpf"] > 1 and out["speedy"]["tpf"] >= 2, out
  assert out["speedy"]["nfe"] < out["quality"]["nfe"]


def test_logits_tool_reproduces_fixture(gold, tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  try:
    import logits as logits_tool
  finally:
    sys.path.pop(0)
  ids = ",".join(map(str, gold.npz["fwd_input_ids"]))
  for bl, key in ((["--block-length", "4"], "block4"), ([], "full")):
    out = tmp_path / f"{key}.npy"
    assert logits_tool.main(["--checkpoint", gold.dir, "--input-ids", ids, "--out", str(out)]
                            + bl) == 0
    np.testing.assert_allclose(np.load(out), gold.npz[f"fwd_{key}_logits"], atol=1e-4, rtol=0)
  assert logits_tool.main(["--checkpoint", gold.dir, "--input-ids", "1,x", "--out",
                           str(tmp_path / "x.npy")]) == 2


def test_cli_timing_reports_load_and_run_without_compilation(tiny, capsys):
  argv = _flags(tiny, tiny.runs()[0]) + ["--timing"]
  assert main(argv) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["output_ids"] == expected_output(tiny, tiny.runs()[0])
  assert out["load_seconds"] > 0 and out["run_seconds"] > 0
  # (run_seconds vs seconds is no contract: the first decode compiles only when no earlier
  # call in this process compiled the same program)
  # (both printed to 4 significant digits)
  assert 0 < out["seconds_per_forward"] * out["nfe"] <= out["run_seconds"] * 1.002
  assert out["mesh"] is None  # one device: --mesh auto is no mesh


def test_cli_loads_a_hub_id_from_the_local_cache(tiny, tmp_path):
  """`--checkpoint owner/name` as vLLM/SGLang take it: resolved through the Hugging Face cache
  (offline here), then decoded like the directory."""
  from test_checkpoint_sharded import HUB_ID, _hub_cache
  _hub_cache(tmp_path / "hub")
  run = tiny.runs()[0]
  argv = _flags(tiny, run)
  argv[argv.index("--checkpoint") + 1] = HUB_ID
  env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "llada_jax.decode"] + argv, capture_output=True,
                     text=True, timeout=300, env=env, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["output_ids"] == expected_output(tiny, run) and out["nfe"] == run["nfe"]
  assert out["checkpoint"].startswith(str(tmp_path / "hub"))


def test_cli_reports_finish_and_warns_on_budget(tiny, capsys):
  argv = ["--checkpoint", tiny.dir, "--prompt-ids", "1,2,3", "--gen-length", "16",
          "--block-length", "8", "--format", "json"]
  assert main(argv) == 0
  out, err = capsys.readouterr()
  assert json.loads(out)["finish"] in ("eos", "length") and "warning" not in err
  assert main(argv + ["--max-iterations", "2"]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out)["finish"] == "budget"
  assert err.startswith("warning: row(s) [0] stopped unfinished (finish 'budget')"), err
  assert err.count("\n") == 1
