"""MoE benchmark: ms per MoE layer call for each expert implementation, and the window forward.

1) One MoE layer (`moe_block`: router, routed experts, shared expert) on N tokens, for every
   implementation, at decode and prefill token counts of the mid-size model (hidden 256, 16
   experts top-4, expert width 128) and at LLaDA2.1-mini expert widths (hidden 2048, 256 experts
   top-8, expert width 512) with small N. Implementations are timed round-robin (one call of
   each per round) so a busy machine slows them alike; the table shows medians and each one's
   ratio to "ragged". What `moe_impl="auto"` picks for the size is named in the last column.
   An implementation that would take over --slow-s per call at the next N (linear in N from
   the last one) is left out there ("-"). "tile_loop" runs with its default tile height, i.e.
   the same program as "auto_local" wherever auto picks the tile loop: the two columns differ by
   the machine's noise only.
2) One jitted forward of the mid-size model (6 layers) on a 32-token window against a
   1024-slot KV cache, with moe_impl auto (as resolved here), ragged and dense.
3) value_and_grad of one mid-size MoE layer (training differentiates through moe_impl).

Besides the library's implementations (ragged, dense, bucketed, tile_loop, auto_local) it
times three dropless alternatives defined here: "bucket_wc" ([E, N, D] buffers at the worst-case
capacity N), "expert_map" (`lax.map` over the experts, every token through each) and "onehot"
(GShard-style one-hot dispatch/combine einsums at capacity N).

  python tools/bench_moe.py [--repeats 5] [--mid-n 32,128,1024,4096] [--mini-n 1,8,32]
      [--impls ragged,dense,...] [--slow-s 3] [--no-window] [--grad-n 1024]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llada_jax  # noqa: E402
from llada_jax import parallel  # noqa: E402
from llada_jax.model import moe  # noqa: E402

DEFAULT_IMPLS = "ragged,dense,bucket_wc,expert_map,onehot,bucketed,tile_loop,auto_local"


# ---- alternatives measured here only ------------------------------------------------------------
def experts_bucket_wc(x, idx, gate, up, down):
  """[E, N, D] buffers (capacity N: a token sits in slot n of each expert it picked)."""
  n = x.shape[0]
  pick = jnp.zeros((n, gate.shape[0]), bool).at[jnp.arange(n)[:, None], idx].set(True)
  buf = jnp.where(pick.T[:, :, None], x[None], 0)
  h = jax.nn.silu(jnp.einsum("end,edf->enf", buf, gate)) * jnp.einsum("end,edf->enf", buf, up)
  return jnp.einsum("enf,efd->end", h, down)[idx, jnp.arange(n)[:, None]]


def experts_expert_map(x, idx, gate, up, down):
  """`lax.map` over the experts, each on every token, then pick."""
  n = x.shape[0]
  run = lambda w: (jax.nn.silu(x @ w[0]) * (x @ w[1])) @ w[2]
  return jax.lax.map(run, (gate, up, down))[idx, jnp.arange(n)[:, None]]


def experts_onehot(x, idx, w, gate, up, down):
  """One-hot dispatch [N, E, C=N] and combine einsums (combined implementation)."""
  n, e = x.shape[0], gate.shape[0]
  pick = jax.nn.one_hot(idx, e, dtype=x.dtype).sum(1)  # [N, E]
  disp = pick[:, :, None] * jnp.eye(n, dtype=x.dtype)[:, None, :]  # [N, E, C]
  buf = jnp.einsum("nec,nd->ecd", disp, x)
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, gate)) * jnp.einsum("ecd,edf->ecf", buf, up)
  y = jnp.einsum("ecf,efd->ecd", h, down)
  weight = (jax.nn.one_hot(idx, e, dtype=jnp.float32) * w[:, :, None]).sum(1)  # [N, E]
  out = jnp.einsum("nec,ecd->nd", disp * weight[:, :, None].astype(x.dtype), y)
  stats = {"tokens_per_expert": jnp.bincount(idx.reshape(-1), length=e),
           "dropped": jnp.zeros((), jnp.int32)}
  return out.astype(jnp.float32), stats


moe.register_experts("bucket_wc", experts_bucket_wc)
moe.register_experts("expert_map", experts_expert_map)
moe.register_combined_experts("onehot", experts_onehot)


# ---- configs and params -------------------------------------------------------------------------
def mid_config() -> llada_jax.ModelConfig:
  """The issue's mid-size model: hidden 256, 6 layers, 16 experts top-4, vocab 4096."""
  v = 4096
  return llada_jax.tiny_config(
      vocab_size=v, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
      num_key_value_heads=2, head_dim=64, intermediate_size=1024, num_experts=16,
      num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=128,
      max_position_embeddings=8192, pad_token_id=v - 2, eos_token_id=v - 2,
      mask_token_id=v - 1)


def mini_moe_config(dtype: str) -> llada_jax.ModelConfig:
  """LLaDA2.1-mini's MoE layer widths (one layer is all this benchmark builds)."""
  return llada_jax.PRESETS["llada2_1_mini"].replace(num_hidden_layers=2, dtype=dtype,
                                                     param_dtype=dtype)


def moe_layer_params(c: llada_jax.ModelConfig, key) -> dict:
  d, e, f, s = c.hidden_size, c.num_experts, c.moe_intermediate_size, c.shared_intermediate_size
  dt = jnp.dtype(c.param_dtype)
  ks = iter(jax.random.split(key, 8))
  w = lambda shape: (0.02 * jax.random.normal(next(ks), shape, jnp.float32)).astype(dt)
  p = {"router": {"weight": 0.02 * jax.random.normal(next(ks), (d, e), jnp.float32),
                  "expert_bias": jnp.zeros((e,), jnp.float32)},
       "experts": {"gate": w((e, d, f)), "up": w((e, d, f)), "down": w((e, f, d))}}
  if s:
    p["shared"] = {"gate": w((d, s)), "up": w((d, s)), "down": w((s, d))}
  return p


def auto_choice(c: llada_jax.ModelConfig, n: int) -> str:
  name, tile = moe.choose_experts(n, c.num_experts_per_tok, c.num_experts, c.hidden_size,
                                  c.moe_intermediate_size, jnp.dtype(c.param_dtype).itemsize)
  return name if tile is None else f"{name}(C={tile})"


# ---- timing -------------------------------------------------------------------------------------
def round_robin(fns: dict, repeats: int, slow_s: float) -> dict:
  """Median seconds per call of each zero-argument fn, one call of each per round; a fn slower
  than `slow_s` on its warm call is timed once (its value is that call)."""
  times, once = {}, {}
  for name, fn in fns.items():
    jax.block_until_ready(fn())  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    dt = time.perf_counter() - t0
    times[name] = [dt]
    if dt > slow_s:
      once[name] = True
  for _ in range(repeats - 1):
    for name, fn in fns.items():
      if name in once:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def layer_table(title: str, c, params, ns, impls, repeats, slow_s):
  print(f"\n{title}")
  head = f"{'N':>6} " + " ".join(f"{i:>11}" for i in impls) + "   auto picks"
  print(head)
  skipped, last = set(), {}
  key = jax.random.PRNGKey(1)
  for n in ns:
    # skip what would take more than slow_s per call here (linear in N from the last size)
    skipped |= {i for i, (n0, t0) in last.items() if t0 * n / n0 > slow_s}
    x = jax.random.normal(jax.random.fold_in(key, n), (1, n, c.hidden_size)).astype(c.dtype)
    fns = {}
    for impl in impls:
      if impl in skipped:
        continue
      f = jax.jit(functools.partial(moe.moe_block, c=c, impl=impl))
      fns[impl] = functools.partial(lambda f: f(params, x)[0], f)
    ts = round_robin(fns, repeats, slow_s)
    ref = ts.get("ragged")
    cells = []
    for impl in impls:
      if impl not in ts:
        cells.append(f"{'-':>11}")
        continue
      cell = f"{ts[impl] * 1e3:.2f}"
      if ref and impl != "ragged":
        cell += f" {ref / ts[impl]:.1f}x"
      cells.append(f"{cell:>11}")
      last[impl] = (n, ts[impl])
    print(f"{n:>6} " + " ".join(cells) + f"   {auto_choice(c, n)}", flush=True)


def window_table(repeats, slow_s, ctx=1024, block=32):
  """Mid-size model: one jitted forward of a `block` window against a `ctx`-slot cache."""
  import bench_decode  # noqa: PLC0415 (tools/ sibling)
  c = mid_config()
  params = llada_jax.init_params(c, jax.random.PRNGKey(0))
  auto = parallel.resolve_moe_impl("auto")
  fns = {f"auto ({auto})": bench_decode.window_forward_fn(params, c, ctx, block, auto),
         "ragged": bench_decode.window_forward_fn(params, c, ctx, block, "ragged"),
         "dense": bench_decode.window_forward_fn(params, c, ctx, block, "dense")}
  ts = round_robin(fns, repeats, slow_s)
  ref = ts["ragged"]
  print(f"\n2) window forward, mid-size model ({c.num_hidden_layers} layers): {block} tokens "
        f"against a {ctx}-slot KV cache, one jitted forward_core call")
  print(f"{'moe_impl':>28} {'ms':>9} {'vs ragged':>10}")
  for name, t in ts.items():
    print(f"{name:>28} {t * 1e3:>9.2f} {ref / t:>9.2f}x")


def grad_table(n, impls, repeats, slow_s):
  """Mid-size MoE layer, value and gradient (params and input) of a scalar of the output."""
  c = mid_config()
  params = moe_layer_params(c, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (1, n, c.hidden_size))
  fns = {}
  for impl in impls:
    loss = lambda p, x, impl=impl: jnp.sum(moe.moe_block(p, x, c, impl=impl)[0] ** 2)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    fns[impl] = functools.partial(lambda f: f(params, x), f)
  ts = round_robin(fns, repeats, slow_s)
  ref = ts.get("ragged")
  print(f"\n3) value_and_grad of one mid-size MoE layer, N={n} (training uses moe_impl too)")
  for impl, t in ts.items():
    print(f"{impl:>11} {t * 1e3:>9.2f} ms" + (f" {ref / t:>6.1f}x" if ref else ""))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--mid-n", default="32,128,1024,4096")
  p.add_argument("--mini-n", default="1,8,32")
  p.add_argument("--mini-dtype", default="float32")
  p.add_argument("--impls", default=DEFAULT_IMPLS)
  p.add_argument("--slow-s", type=float, default=3.0,
                 help="time a call slower than this once, and skip an implementation at a "
                      "larger N where it would take longer than this (linear in N)")
  p.add_argument("--no-window", action="store_true")
  p.add_argument("--grad-n", type=int, default=1024, help="0: skip the gradient table")
  args = p.parse_args(argv)
  impls = args.impls.split(",")

  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}; medians of "
        f"{args.repeats} round-robin calls (ms per call, and speed-up over ragged)")
  if args.mid_n:
    c = mid_config()
    layer_table(f"1a) one MoE layer, mid-size widths: hidden {c.hidden_size}, {c.num_experts} "
                f"experts top-{c.num_experts_per_tok}, expert width {c.moe_intermediate_size}, "
                f"{c.dtype}", c, moe_layer_params(c, jax.random.PRNGKey(0)),
                [int(v) for v in args.mid_n.split(",")], impls, args.repeats, args.slow_s)
  if args.mini_n:
    c = mini_moe_config(args.mini_dtype)
    layer_table(f"1b) one MoE layer, LLaDA2.1-mini widths: hidden {c.hidden_size}, "
                f"{c.num_experts} experts top-{c.num_experts_per_tok}, expert width "
                f"{c.moe_intermediate_size}, {c.dtype}", c,
                moe_layer_params(c, jax.random.PRNGKey(0)),
                [int(v) for v in args.mini_n.split(",")], impls, args.repeats, args.slow_s)
  if not args.no_window:
    window_table(args.repeats, args.slow_s)
  if args.grad_n:
    grad_table(args.grad_n, ["ragged", "dense", "tile_loop", "auto_local"], args.repeats,
               args.slow_s)


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
