"""Bytes the Pallas attention keeps from its forward for its backward (per layer, per device).

  python tools/attention_residuals.py [--config llada2_1_mini] [--seq 4096] [--batch 1] \
      [--block-length 32] [--dtype bfloat16] [--json]

The training forward runs the attention on the 2L layout `[x_t ; x_0]` (2 x `--seq` tokens) of
`--batch` rows (one device's share); under `jax.grad` the kernel's `custom_vjp` saves residuals
for the backward kernels, for every layer, until the backward reaches that layer (with `remat`
per layer they are recomputed, but one layer's set is still live during its backward). This
tool lists them, from shapes only (`jax.eval_shape` of `jax.vjp`: nothing is computed, no
device needed), with the Mosaic kernel (`interpret=False`), and their total; also the
transient per-row arrays the backward builds for its kernels (log-sum-exp and `di` rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llada_jax import masks  # noqa: E402
from llada_jax.config import get_preset  # noqa: E402
from llada_jax.kernels import block_attention as ba  # noqa: E402


def _bytes(x) -> int:
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def residuals(batch: int, length: int, block_length: int, heads: int, kv_heads: int,
              head_dim: int, dtype) -> list[tuple[tuple, str, int]]:
  """(shape, dtype, bytes) of every residual of the attention's vjp on the 2L layout of
  `length` tokens per half (shapes only)."""
  t = 2 * length
  s = jax.ShapeDtypeStruct
  seg = s((batch, length), jnp.int32)

  def fwd(q, k, v, seg):
    layout = masks.training(length, block_length, seg)
    attn = lambda q, k, v: ba.block_diffusion_attention(q, k, v, layout, layout,
                                                        interpret=False)
    return jax.vjp(attn, q, k, v)[1]

  vjp = jax.eval_shape(fwd, s((batch, t, heads, head_dim), dtype),
                       s((batch, t, kv_heads, head_dim), dtype),
                       s((batch, t, kv_heads, head_dim), dtype), seg)
  return [(tuple(x.shape), str(x.dtype), _bytes(x)) for x in jax.tree_util.tree_leaves(vjp)]


def fmt(b: float) -> str:
  for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if b >= size:
      return f"{b / size:.2f} {unit}"
  return f"{int(b)} B"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--config", default="llada2_1_mini", help="preset (heads, KV heads, head dim)")
  p.add_argument("--seq", type=int, default=4096, help="tokens per half of the 2L layout")
  p.add_argument("--batch", type=int, default=1, help="rows per device")
  p.add_argument("--block-length", type=int, default=32)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  a = p.parse_args(argv)
  c = get_preset(a.config)
  rows = residuals(a.batch, a.seq, a.block_length, c.num_attention_heads,
                   c.num_key_value_heads, c.head_dim, jnp.dtype(a.dtype))
  total = sum(b for *_, b in rows)
  per_row_f32 = [r for r in rows if r[1] == "float32"]
  if a.json:
    print(json.dumps(dict(config=a.config, tokens=2 * a.seq, batch=a.batch, total_bytes=total,
                          float32_row_bytes=sum(b for *_, b in per_row_f32),
                          residuals=[dict(shape=s, dtype=d, bytes=b) for s, d, b in rows])))
    return 0
  print(f"{a.config}: attention residuals per layer and device, 2L layout of {2 * a.seq} "
        f"tokens, batch {a.batch}, block {a.block_length}, {a.dtype}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads x {c.head_dim}")
  for shape, dtype, b in rows:
    print(f"  {str(list(shape)):32s} {dtype:9s} {fmt(b):>12s}")
  print(f"total {fmt(total)} ({total:,} bytes); float32 rows (log-sum-exp): "
        f"{fmt(sum(b for *_, b in per_row_f32))}; x {c.num_hidden_layers} layers without remat: "
        f"{fmt(total * c.num_hidden_layers)}")
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
