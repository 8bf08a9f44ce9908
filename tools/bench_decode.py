"""Decode benchmark: KV-cached decoder vs no-cache recompute, and the loop's own overhead.

On one random mid-size LLaDA2 checkpoint (default: hidden 512, 8 layers, 16 experts), for each
prompt context it decodes `--gen-length` tokens with a fixed per-step schedule (LLaDA2.0,
threshold 1.0, `--steps` per block: every run makes the same number of forwards) and reports:
  * cached vs recompute wall time (the speed-up of the KV cache of finished blocks);
  * decode wall time vs (NFE + cache commits) x one cached window forward timed alone, on a
    prompt shorter than a block (no prefill): the overhead of the loop itself.
Compile time is measured separately from run time (best of `--repeats` runs).

  python tools/bench_decode.py [--contexts 128,256,512,1024] [--gen-length 64]
      [--overhead-gen 256]
"""

from __future__ import annotations

import sys

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import llada_jax
from llada_jax import masks, parallel
from llada_jax.model import kv_cache
from llada_jax.model.transformer import forward_core


def mid_config(args) -> llada_jax.ModelConfig:
  return llada_jax.tiny_config(
      vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=4 * args.hidden,
      num_experts=args.experts, num_experts_per_tok=4, n_group=4, topk_group=2,
      moe_intermediate_size=args.hidden // 2, max_position_embeddings=8192,
      pad_token_id=args.vocab - 2, eos_token_id=args.vocab - 2, mask_token_id=args.vocab - 1)


def timed(fn, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return first - best, best  # (compile estimate, run)


def window_forward_fn(params, c, ctx, block, moe_impl="ragged"):
  """A zero-argument function: one cached forward of a `block`-token window against a cache of
  `ctx` slots (jitted; `moe_impl` a resolved name, see `llada_jax.parallel.resolve_moe_impl`)."""
  cache = kv_cache.init_cache(c, 1, ctx + block)
  toks = jnp.zeros((1, block), jnp.int32)
  pos = ctx + jnp.arange(block, dtype=jnp.int32)[None]
  slots = jnp.arange(ctx + block, dtype=jnp.int32)[None]
  cache_layout = masks.Layout(slots // block, jnp.zeros_like(slots, bool),
                              jnp.where(slots < ctx, 0, -1))
  layout = masks.block_causal(pos, block)
  f = jax.jit(functools.partial(forward_core, c=c, moe_impl=moe_impl))
  return lambda: f(params, tokens=toks, positions=pos, layout=layout, cache=cache,
                   cache_layout=cache_layout).logits


def window_forward_time(params, c, ctx, block, repeats, moe_impl="ragged"):
  """One cached forward of a `block`-token window against a cache of `ctx` slots."""
  return timed(window_forward_fn(params, c, ctx, block, moe_impl), repeats)[1]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--contexts", default="128,256,512,1024")
  p.add_argument("--gen-length", type=int, default=64)
  p.add_argument("--block-length", type=int, default=32)
  p.add_argument("--steps", type=int, default=4, help="forwards per block")
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--overhead-gen", type=int, default=256)
  p.add_argument("--moe-impl", default="auto",
                 help="expert implementation (auto: what llada_jax.generate picks here)")
  args = p.parse_args(argv)
  moe_impl = parallel.resolve_moe_impl(args.moe_impl)

  c = mid_config(args)
  params = llada_jax.init_params(c, jax.random.PRNGKey(0))
  n = llada_jax.count_params(c)
  print(f"model: hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_experts} experts "
        f"({n / 1e6:.1f}M params); gen {args.gen_length}, block {args.block_length}, "
        f"{args.steps} forwards/block; moe_impl {moe_impl}; "
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform} "
        f"x{jax.device_count()}, jax {jax.__version__}")
  rng = np.random.default_rng(0)
  bl = args.block_length
  kw = dict(algorithm="llada2.0", threshold=1.0, steps=args.steps, block_length=bl,
            eos_early_stop=False, moe_impl=moe_impl)

  def decode(prompt, gen, use_cache):
    out = {}
    def run():
      out["r"] = llada_jax.generate(params, c, [prompt], use_cache=use_cache, gen_length=gen,
                                    **kw)
      return jnp.zeros(())
    compile_s, run_s = timed(run, args.repeats)
    return compile_s, run_s, out["r"]

  print("\n1) KV cache vs recompute: a prompt of `context` tokens, then "
        f"{args.gen_length} generated tokens")
  print(f"{'context':>8} {'nfe':>5} {'cached s':>9} {'recompute s':>12} {'speed-up':>9} "
        f"{'compile s':>10}")
  for ctx in [int(x) for x in args.contexts.split(",")]:
    prompt = rng.integers(0, c.vocab_size - 2, ctx).tolist()
    comp, cached, r = decode(prompt, args.gen_length, True)
    _, recompute, r2 = decode(prompt, args.gen_length, False)
    assert r.nfe == r2.nfe and r.output_ids == r2.output_ids
    print(f"{ctx:>8} {r.nfe[0]:>5} {cached:>9.3f} {recompute:>12.3f} "
          f"{recompute / cached:>8.2f}x {comp:>10.1f}", flush=True)

  print(f"\n2) loop overhead: a {bl - 1}-token prompt (no prefill), then "
        f"{args.overhead_gen} generated tokens")
  prompt = rng.integers(0, c.vocab_size - 2, bl - 1).tolist()
  comp, cached, r = decode(prompt, args.overhead_gen, True)
  canvas = bl + -(-args.overhead_gen // bl) * bl
  one = window_forward_time(params, c, canvas - bl, bl, args.repeats, moe_impl)
  forwards = r.nfe[0] + r.commits
  print(f"{'nfe':>5} {'commits':>8} {'decode s':>9} {'one forward s':>14} "
        f"{'(nfe+commits) x fwd':>20} {'overhead':>9}")
  print(f"{r.nfe[0]:>5} {r.commits:>8} {cached:>9.3f} {one:>14.4f} {forwards * one:>20.3f} "
        f"{cached / (forwards * one):>8.2f}x")
  print("\noverhead = decode wall time / ((NFE + cache commits) x one cached window forward "
        "timed alone); 1.00x means the loop costs nothing beyond its forwards.")


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
