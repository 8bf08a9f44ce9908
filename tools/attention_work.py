"""Work accounting of the block-diffusion attention kernel: tiles skipped and FLOPs vs dense.

For each context length and tile size it classifies every (q tile, k tile) pair exactly as the
kernel does (`llada_jax.kernels.block_attention.tile_kinds`) and prints one row per layout:
  decode-last   one denoising step of the last block: block_length window queries against the
                KV cache (context slots, all but the window valid) + the window;
  decode-avg    the same step averaged over every block of a generation from an empty cache;
  prefill       a block-causal forward of the whole context (the no-cache / prefill path);
  train-2L      the training layout [x_t ; x_0] (2 x context tokens), `--docs` packed documents.
Columns: tiles (per batch row), skipped / partial / full tiles in %, FLOPs executed by the
kernel vs the dense XLA path (same tiles for forward and backward, so the ratio holds for both),
and the ideal ratio (visible pairs / dense pairs; what an exact mask-sparse kernel would do).
GFLOP columns are per layer, forward only (QK^T and PV: 4 * d * H per query-key pair).

  python tools/attention_work.py --context 4096 --block 32
  python tools/attention_work.py --context 4096 32768 --block 32 --block-q 128 --block-k 512
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from llada_jax import masks
from llada_jax.kernels.block_attention import FULL, PARTIAL, SKIP, tile_kinds


def _row(name, kinds, ql, kl, block_q, block_k, heads, head_dim, exact=True) -> dict:
  """Summary of one layout; kinds `[B, nq, nk]` (rows of B averaged)."""
  kinds = np.asarray(kinds)
  batch, tq, tk = ql.block.shape[0], ql.block.shape[1], kl.block.shape[1]
  tiles = kinds.shape[1] * kinds.shape[2]
  live = np.sum(kinds != SKIP) / batch
  dense_pairs = tq * tk
  row = dict(layout=name, tq=tq, tk=tk, tiles=tiles,
             skipped_frac=float(np.mean(kinds == SKIP)),
             partial_frac=float(np.mean(kinds == PARTIAL)),
             full_frac=float(np.mean(kinds == FULL)),
             flops_frac=float(live * block_q * block_k / dense_pairs),
             dense_gflop=4.0 * head_dim * heads * dense_pairs / 1e9)
  row["kernel_gflop"] = row["dense_gflop"] * row["flops_frac"]
  if exact:
    row["ideal_frac"] = float(np.mean(np.asarray(masks.visible(ql, kl))))
  return row


def decode_layouts(context: int, block: int, active_blocks) -> tuple:
  """Window queries of each active block (one batch row each) and cache + window keys."""
  a = np.asarray(active_blocks, np.int32)[:, None]
  rows = a.shape[0]
  slots = np.arange(context, dtype=np.int32)[None]
  q = masks.Layout(jnp.asarray(np.broadcast_to(a, (rows, block))), jnp.zeros((rows, block), bool),
                   jnp.zeros((rows, block), jnp.int32))
  cache = masks.Layout(jnp.asarray(np.broadcast_to(slots // block, (rows, context))),
                       jnp.zeros((rows, context), bool),
                       jnp.asarray(np.where(slots < a * block, 0, -1).astype(np.int32)))
  return q, cache.concat(q)


def decode_work(context, block, block_q, block_k, *, average=False, heads=16, head_dim=128,
                exact=True):
  nb = context // block
  active = np.arange(nb) if average else np.array([nb - 1])
  ql, kl = decode_layouts(context, block, active)
  kinds = tile_kinds(ql, kl, min(block_q, block), block_k)
  name = "decode-avg" if average else "decode-last"
  return _row(name, kinds, ql, kl, min(block_q, block), block_k, heads, head_dim, exact=exact)


def prefill_work(context, block, block_q, block_k, *, heads=16, head_dim=128, exact=True):
  lay = masks.from_block_length(1, context, block)
  kinds = tile_kinds(lay, lay, block_q, block_k)
  return _row("prefill", kinds, lay, lay, block_q, block_k, heads, head_dim, exact=exact)


def training_work(context, block, block_q, block_k, *, docs=1, heads=16, head_dim=128,
                  exact=True):
  """The 2L layout of `context` tokens split into `docs` equal documents."""
  seg = (np.arange(context) * docs // context).astype(np.int32)[None]
  lay = masks.training(context, block, jnp.asarray(seg))
  kinds = tile_kinds(lay, lay, block_q, block_k)
  name = "train-2L" if docs == 1 else f"train-2L/{docs}doc"
  return _row(name, kinds, lay, lay, block_q, block_k, heads, head_dim, exact=exact)


COLUMNS = [("layout", "layout", "{}"), ("tq", "Tq", "{}"), ("tk", "Tk", "{}"),
           ("tiles", "tiles", "{}"), ("skipped_frac", "skip", "{:.1%}"),
           ("partial_frac", "partial", "{:.1%}"), ("full_frac", "full", "{:.1%}"),
           ("flops_frac", "FLOPs", "{:.1%}"), ("ideal_frac", "ideal", "{:.1%}"),
           ("dense_gflop", "dense GF", "{:.2f}"), ("kernel_gflop", "kernel GF", "{:.2f}")]


def format_table(rows) -> str:
  """Fixed-width text table of `_row` dicts (layout left-aligned, numbers right-aligned)."""
  cells = [[h for _, h, _ in COLUMNS]]
  cells += [["-" if r.get(k) is None else f.format(r[k]) for k, _, f in COLUMNS] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
  fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(row, widths)))
  lines = [fmt(cells[0]), "-" * len(fmt(cells[0]))] + [fmt(r) for r in cells[1:]]
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--context", type=int, nargs="+", default=[4096], help="context lengths")
  ap.add_argument("--block", type=int, default=32, help="block length L_B")
  ap.add_argument("--block-q", type=int, default=128, help="query tile (tokens)")
  ap.add_argument("--block-k", type=int, default=128, help="key tile (tokens)")
  ap.add_argument("--docs", type=int, nargs="+", default=[1, 4],
                  help="documents packed into the training sequence")
  ap.add_argument("--heads", type=int, default=16, help="query heads (GFLOP columns only)")
  ap.add_argument("--head-dim", type=int, default=128, help="head dim (GFLOP columns only)")
  ap.add_argument("--no-ideal", action="store_true",
                  help="skip the dense visibility count (the ideal column; slow beyond 8k)")
  a = ap.parse_args(argv)
  kw = dict(heads=a.heads, head_dim=a.head_dim, exact=not a.no_ideal)
  for context in a.context:
    rows = [decode_work(context, a.block, a.block_q, a.block_k, **kw),
            decode_work(context, a.block, a.block_q, a.block_k, average=True, **kw),
            prefill_work(context, a.block, a.block_q, a.block_k, **kw)]
    rows += [training_work(context, a.block, a.block_q, a.block_k, docs=n, **kw)
             for n in a.docs]
    print(f"context {context}, block {a.block}, tiles q={a.block_q} k={a.block_k}"
          f" (decode q tile = min(block_q, block))")
    print(format_table(rows))
    print()
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
