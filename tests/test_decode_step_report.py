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
    %11 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<2x1x2x64x16xf32>
    %12 = stablehlo.broadcast_in_dim %x, dims = [0, 1, 2, 3, 4] : (tensor<2x1x2x1x16xf32>) -> tensor<2x1x2x64x16xf32>
    %13 = "stablehlo.scatter"(%11, %i, %u) <{indices_are_sorted = true, scatter_dimension_numbers = #stablehlo.scatter<update_window_dims = [0, 2, 3, 4], input_batching_dims = [1], scatter_indices_batching_dims = [0], scatter_dims_to_operand_dims = [3], index_vector_dim = 1>, unique_indices = true}> ({
    ^bb0(%arg4: tensor<f32>, %arg5: tensor<f32>):
      stablehlo.return %arg5 : tensor<f32>
    }) : (tensor<2x1x2x64x16xf32>, tensor<1x1xi32>, tensor<2x1x2x8x16xf32>) -> tensor<2x1x2x64x16xf32>
    %14 = stablehlo.dynamic_slice %11, %i, %c, %c, %c, %c, sizes = [1, 1, 2, 64, 16] : (tensor<2x1x2x64x16xf32>, tensor<i32>, tensor<i32>, tensor<i32>, tensor<i32>, tensor<i32>) -> tensor<1x1x2x64x16xf32>
    %15 = "stablehlo.gather"(%11, %i) <{dimension_numbers = #stablehlo.gather<offset_dims = [0, 2, 3, 4], operand_batching_dims = [1], start_indices_batching_dims = [0], start_index_map = [3], index_vector_dim = 1>, slice_sizes = array<i64: 2, 1, 2, 8, 16>}> : (tensor<2x1x2x64x16xf32>, tensor<1x1xi32>) -> tensor<2x1x2x8x16xf32>
"""


def test_cache_sized_ops_finds_key_value_copies_only():
  """Copies of cache-sized K/V (not smaller blocks, other dims or dot results); updates and
  slices by name; a scalar broadcast is a fill; a scatter's type is on its closing line."""
  ops = decode_step_report.cache_sized_ops(TEXT, cache_len=64, head_dim=16, min_elements=1024)
  assert ops == [("concatenate", (1, 72, 2, 16)), ("transpose", (1, 2, 72, 16)),
                 ("dynamic_update_slice", (1, 64, 2, 16)), ("fill", (2, 1, 2, 64, 16)),
                 ("broadcast_in_dim", (2, 1, 2, 64, 16)), ("scatter", (2, 1, 2, 64, 16)),
                 ("dynamic_slice", (1, 1, 2, 64, 16))]
  copies = [op for op, _ in ops if op in decode_step_report.COPY_OPS]
  assert copies == ["concatenate", "transpose", "broadcast_in_dim"]


def _run(*flags):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "decode_step_report.py"),
                         "--config", "tiny", "--mesh", "data=2,expert=2", "--devices", "4",
                         "--prompt", "32", "--gen", "32", "--block-length", "8", *flags],
                        capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _copies(out: str) -> int:
  return int(out.split("cache-sized copies: ")[1].split()[0])


def test_report_lines_and_the_copy_gate():
  """The tiny config's decode program, XLA attention: reads the cache in place (no
  concatenate / transpose / pad / select of it), writes it with scatters; the gate passes."""
  p = _run()
  assert p.returncode == 0, p.stderr[-3000:]
  out = p.stdout
  assert "weights read: 614.19 KiB (all params)" in out
  assert "KV read: 48.00 KiB at cache capacity; 36.00 KiB live at mid-generation" in out
  assert _copies(out) == 0, out
  assert "4 x scatter -> [2, 1, 2, 64, 16]" in out  # prefill + commit writes, k and v
  gated = _run("--require-no-cache-copy")
  assert gated.returncode == 0, gated.stdout + gated.stderr


def test_pallas_decode_program_copies_no_cache():
  """With the Pallas kernel (Mosaic, lowered for TPU) the cache reaches the kernel as its own
  operands: no copy and no per-layer slice of it."""
  p = _run("--attention-impl", "pallas_tpu", "--require-no-cache-copy")
  assert p.returncode == 0, p.stdout + p.stderr[-3000:]
  assert _copies(p.stdout) == 0
  assert "cache-sized slices (dynamic_slice, gather: one layer read by index): 0" in p.stdout
