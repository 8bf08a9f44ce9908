"""tools/decode_step_report.py: bytes a decode step reads and cache-sized copies in the program."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import decode_step_report  # noqa: E402

TEXT = """
    %5 = stablehlo.concatenate %3, %4, dim = 1 : (tensor<1x64x2x16xf32>, tensor<1x8x2x16xf32>) -> tensor<1x72x2x16xf32>
    %6 = stablehlo.transpose %5, dims = [0, 2, 1, 3] : (tensor<1x72x2x16xf32>) -> tensor<1x2x72x16xf32>
    %7 = stablehlo.concatenate %1, %2, dim = 1 : (tensor<1x4x2x16xf32>, tensor<1x4x2x16xf32>) -> tensor<1x8x2x16xf32>
    %8 = stablehlo.select %c, %a, %b : tensor<8x64xi1>, tensor<8x64xf32>
    %9 = stablehlo.dynamic_update_slice %k, %u, %i, %j : (tensor<1x64x2x16xf32>, tensor<1x8x2x16xf32>, tensor<i32>, tensor<i32>) -> tensor<1x64x2x16xf32>
    %10 = stablehlo.dot_general %q, %k : (tensor<1x72x2x16xf32>, tensor<1x72x2x16xf32>) -> tensor<1x72x2x16xf32>
"""


def test_cache_sized_ops_finds_key_value_copies_only():
  ops = decode_step_report.cache_sized_ops(TEXT, cache_len=64, head_dim=16, min_elements=1024)
  assert ops == [("concatenate", (1, 72, 2, 16)), ("transpose", (1, 2, 72, 16)),
                 ("dynamic_update_slice", (1, 64, 2, 16))]


def _run(*flags):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "decode_step_report.py"),
                         "--config", "tiny", "--mesh", "data=2,expert=2", "--devices", "4",
                         "--prompt", "32", "--gen", "32", "--block-length", "8", *flags],
                        capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_report_lines_and_the_copy_gate():
  p = _run()
  assert p.returncode == 0, p.stderr[-3000:]
  out = p.stdout
  assert "weights read: 742.19 KiB (all params)" in out
  assert "KV read: 48.00 KiB at cache capacity; 36.00 KiB live at mid-generation" in out
  copies = int(out.split("cache-sized copies: ")[1].split()[0])
  gated = _run("--require-no-cache-copy")
  assert gated.returncode == (1 if copies else 0), gated.stderr
