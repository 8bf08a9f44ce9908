"""The benchmark tools run end to end at toy sizes (no timing is asserted: speed is measured by
the tools themselves, see the README's Performance section)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_decode  # noqa: E402
import bench_train  # noqa: E402
from llada_jax.errors import InputError  # noqa: E402

TOY = ["--hidden", "64", "--layers", "2", "--experts", "8", "--vocab", "256", "--repeats", "1"]


def test_bench_decode_step_breakdown(capsys):
  bench_decode.main(["--sections", "breakdown", "--prompt", "40", "--breakdown-gen", "32",
                     "--modes", "speedy", *TOY])
  out = capsys.readouterr().out
  assert "where a speedy step goes" in out
  for part in ("window forward", "attention", "MoE blocks", "LM head", "sampler",
               "cache commits", "prompt prefill", "loop overhead", "roofline"):
    assert part in out, part


def test_window_work_counts_the_weights_and_the_cache():
  c = bench_decode.mid_config(type("A", (), dict(hidden=256, layers=6, experts=16, vocab=4096)))
  nbytes0, flops0 = bench_decode.window_work(c, 0, 32)
  nbytes1, flops1 = bench_decode.window_work(c, 1024, 32)
  kv = 2 * c.num_hidden_layers * c.num_key_value_heads * 1024 * c.head_dim * 4
  assert nbytes1 - nbytes0 == kv
  scores = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 32 * 1024
  assert flops1 - flops0 == scores
  assert nbytes0 < 4 * __import__("llada_jax").count_params(c)  # the embedding's rows only


@pytest.mark.parametrize("argv, words", [
    (["--sections", "reference"], "needs --reference-python and --reference-code"),
    (["--sections", "everything"], "unknown ['everything']"),
])
def test_bench_decode_bad_sections(argv, words):
  with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]")):
    bench_decode.main(argv)


def test_bench_decode_reference_code_must_hold_the_official_files(tmp_path):
  with pytest.raises(InputError, match="missing modeling_llada2_moe.py"):
    bench_decode.main(["--sections", "reference", "--reference-python", sys.executable,
                       "--reference-code", str(tmp_path), *TOY])


def test_bench_train_reports_the_ratio(capsys):
  bench_train.main(["--seq-len", "64", "--batch", "1", "--block-length", "16", "--hidden", "64",
                    "--layers", "2", "--experts", "8", "--vocab", "256", "--repeats", "1"])
  out = capsys.readouterr().out
  assert "BDLM (2L layout, block 16)" in out and "vs AR" in out and "bwd+update s" in out
