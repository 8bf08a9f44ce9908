"""Decode benchmark: cache vs recompute, loop overhead, a step's parts, the official generate.

On a random mid-size LLaDA2 checkpoint (default: hidden 512, 8 layers, 16 experts; heads of 64
features spanning the hidden size), `--sections` picks what runs (default: cache,overhead):
  cache      for each prompt context, decodes `--gen-length` tokens with a fixed per-step
             schedule (LLaDA2.0, threshold 1.0, `--steps` per block: every run makes the same
             forwards): cached vs recompute wall time;
  overhead   decode wall time vs (NFE + cache commits) x one cached window forward timed alone
             (a prompt shorter than a block: no prefill): the loop's own cost;
  breakdown  a `--prompt` + `--breakdown-gen` decode in each of `--modes`, and at its mean
             context the window forward's parts timed alone (attention, MoE, LM head), the
             sampler, commits, prefill and the loop, next to the forward's roofline bound
             (weight and KV bytes at the measured bandwidth, FLOPs at the measured matmul rate);
  reference  the official `generate` (HF remote code, in the reference environment of
             `--reference-python` / `--reference-code`, via tools/reference_generate.py) and
             `llada_jax.generate` on the same checkpoint and prompt, LLaDA2.0 threshold decoding
             at each of `--reference-thresholds`: NFE, wall time, speed-up, token agreement.
Compile time is measured separately from run time (best of `--repeats` runs).

  python tools/bench_decode.py [--sections cache,overhead,breakdown,reference]
      [--contexts 128,256,512,1024] [--gen-length 64] [--overhead-gen 256] [--moe-impl auto]
      [--hidden 256 --layers 6 --head-scale 4] [--prompt 768 --breakdown-gen 256]
      [--reference-python ref/bin/python --reference-code refcode]
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
from llada_jax.errors import InputError
from llada_jax import masks, parallel
from llada_jax.model import kv_cache
from llada_jax.model.transformer import forward_core


def mid_config(args) -> llada_jax.ModelConfig:
  """A random mid-size LLaDA2: heads of 64 features spanning the hidden size, as in the released
  models (attention width = hidden size), 4 query heads per KV head."""
  heads = max(1, args.hidden // 64)
  return llada_jax.tiny_config(
      vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
      intermediate_size=4 * args.hidden,
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
  f = jax.jit(functools.partial(forward_core, c=c, moe_impl=moe_impl, experts_in_place=True))
  return lambda: f(params, tokens=toks, positions=pos, layout=layout, cache=cache,
                   cache_layout=cache_layout).logits


def window_forward_time(params, c, ctx, block, repeats, moe_impl="ragged"):
  """One cached forward of a `block`-token window against a cache of `ctx` slots."""
  return timed(window_forward_fn(params, c, ctx, block, moe_impl), repeats)[1]


def machine_rates(repeats: int = 5) -> tuple[float, float]:
  """(memory read bandwidth in bytes/s: a jitted sum over 256 MiB of float32; matmul rate in
  FLOP/s: a float32 [1024, 1024] x [1024, 1024] dot), best of `repeats`: the roofline's two
  ceilings on this machine."""
  big = jnp.ones((64 << 20,), jnp.float32)
  a = jnp.ones((1024, 1024), jnp.float32)
  read_s = timed(lambda: jnp.sum(big), repeats)[1]
  dot = jax.jit(lambda x: x @ x)
  dot_s = timed(lambda: dot(a), repeats)[1]
  return big.nbytes / read_s, 2 * 1024 ** 3 / dot_s


def window_work(c: llada_jax.ModelConfig, ctx: int, block: int, itemsize: int = 4
                ) -> tuple[float, float]:
  """(bytes read, FLOPs) of one `block`-token window forward against `ctx` cached slots: every
  weight once (the embedding only for the window's rows; experts: all of them, since a window
  of 32 tokens x top-k touches nearly every expert), the cache's K/V once; FLOPs 2 x the weights
  each token uses, plus QK^T and PV against ctx + block keys."""
  d, v = c.hidden_size, c.vocab_size
  total = llada_jax.count_params(c)
  weight_bytes = (total - v * d + block * d) * itemsize
  kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * ctx * c.head_dim * itemsize
  attn = d * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + (
      c.num_attention_heads * c.head_dim * d)
  expert = 3 * d * c.moe_intermediate_size
  per_token = (c.num_hidden_layers * attn + c.num_dense_layers * 3 * d * c.intermediate_size
               + c.num_moe_layers * (d * c.num_experts
                                     + (c.num_experts_per_tok + c.num_shared_experts) * expert)
               + d * v)
  scores = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * block * (ctx + block)
  return weight_bytes + kv_bytes, 2 * per_token * block + scores


def step_breakdown(params, c, moe_impl, *, prompt_len, gen, block, mode, repeats):
  """Where one decode step's time goes: decodes `gen` tokens after a `prompt_len`-token prompt in
  `mode`, and times at the run's mean context the window forward and its parts alone: the
  attention of every layer against the cache, the MoE blocks, the final norm + LM head, the
  sampler; the rest of the forward (projections, norms, dense MLP, embedding) is the remainder;
  the prompt's prefill and the cache commits are spread over the steps.
  Prints a table in ms per step next to the roofline lower bound of the forward."""
  from llada_jax.decode.update import sample  # noqa: PLC0415
  from llada_jax.model import layers, transformer  # noqa: PLC0415
  from llada_jax.model.moe import moe_block  # noqa: PLC0415
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, c.vocab_size - 2, prompt_len).tolist()
  out = {}

  def run():
    out["r"] = llada_jax.generate(params, c, [prompt], mode=mode, gen_length=gen,
                                  block_length=block, eos_early_stop=False, moe_impl=moe_impl)
    return jnp.zeros(())
  decode_s = timed(run, repeats)[1]
  r = out["r"]
  nfe = r.nfe[0]
  ctx = (prompt_len + gen // 2) // block * block  # mean cached context of the run
  fwd_s = timed(window_forward_fn(params, c, ctx, block, moe_impl), max(repeats, 10))[1]

  b, h, kv, hd = 1, c.num_attention_heads, c.num_key_value_heads, c.head_dim
  key = jax.random.PRNGKey(0)
  q = jax.random.normal(key, (b, block, h, hd))
  kw = jax.random.normal(key, (b, block, kv, hd))
  cache = jax.random.normal(key, (c.num_hidden_layers, b, kv, ctx, hd))
  pos = ctx + jnp.arange(block, dtype=jnp.int32)[None]
  lay = masks.block_causal(pos, block)
  slots = jnp.arange(ctx, dtype=jnp.int32)[None]
  cache_lay = masks.Layout(slots // block, jnp.zeros_like(slots, bool), jnp.zeros_like(slots))
  attention = transformer.get_attention("xla")
  # Both run as the forward runs them: a scan over the stacked layers (weights and cache read
  # in place by index), so no per-layer slice is copied.
  layer_ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
  attn = jax.jit(lambda q, kw, cache: jax.lax.scan(
      lambda acc, i: (acc + attention(q, kw, kw, lay, lay, cache_k=cache, cache_v=cache,
                                      cache_layout=cache_lay, cache_index=i), None),
      jnp.zeros_like(q), layer_ids)[0])
  parts = max(repeats, 10)
  attn_s = timed(lambda: attn(q, kw, cache), parts)[1]
  x = jax.random.normal(key, (b, block, c.hidden_size))
  moe_p = params.get("moe")
  def moe_layers(p, x):  # the experts read in place from their stacks, as decoding runs them
    rest = {k: v for k, v in p.items() if k != "experts"}
    ids = jnp.arange(c.num_moe_layers, dtype=jnp.int32)
    return jax.lax.scan(lambda acc, xs: (acc + moe_block(
        {**xs[0], "experts": p["experts"]}, x, c, impl=moe_impl, layer=xs[1])[0], None),
        jnp.zeros_like(x), (rest, ids))[0]
  moe = jax.jit(moe_layers)
  moe_s = timed(lambda: moe(moe_p, x), parts)[1] if moe_p is not None else 0.0
  head = jax.jit(lambda x, p: jnp.dot(layers.rms_norm(x, p["final_norm"], c.rms_norm_eps),
                                      p["lm_head"]).astype(jnp.float32))
  head_s = timed(lambda: head(x, params), parts)[1]
  logits = head(x, params)
  sampler = jax.jit(lambda lg: sample(lg, None, 0.0, 0, 1.0, greedy=True))
  sample_s = timed(lambda: sampler(logits), parts)[1]

  from llada_jax.decode.api import prompt_bucket  # noqa: PLC0415
  from llada_jax.model.transformer import forward_core  # noqa: PLC0415
  full = prompt_len // block * block  # the prompt's full blocks go through the prefill
  ptoks = jnp.zeros((1, prompt_bucket(prompt_len, block)), jnp.int32)
  ppos = jnp.arange(ptoks.shape[1], dtype=jnp.int32)[None]
  play = masks.block_causal(ppos, block, jnp.where(ppos < full, 0, -1))
  prefill = jax.jit(lambda p: forward_core(p, c, ptoks, ppos, play, with_logits=False,
                                           moe_impl=moe_impl, experts_in_place=True).kv)
  prefill_s = timed(lambda: prefill(params), repeats)[1]

  per_step = decode_s / nfe
  commits = r.commits * fwd_s / nfe
  rest = fwd_s - attn_s - moe_s - head_s
  loop = per_step - fwd_s - sample_s - commits - prefill_s / nfe
  bw, peak = machine_rates(repeats)
  nbytes, flops = window_work(c, ctx, block)
  bound = max(nbytes / bw, flops / peak)
  print(f"\n3) where a {mode} step goes: prompt {prompt_len}, {gen} generated, NFE {nfe}, "
        f"{r.commits} cache commits, decode {decode_s:.3f} s; parts timed alone at the mean "
        f"context {ctx}")
  rows = [("window forward", fwd_s), ("  attention (all layers, vs the cache)", attn_s),
          ("  MoE blocks", moe_s), ("  final norm + LM head", head_s),
          ("  rest (projections, norms, dense MLP, embedding)", rest),
          ("sampler (greedy, [1, W, V])", sample_s),
          ("cache commits (per step)", commits),
          (f"prompt prefill ({prefill_s * 1e3:.0f} ms, per step)", prefill_s / nfe),
          ("loop overhead (remainder)", loop), ("decode step (wall / NFE)", per_step)]
  print(f"{'part':<52} {'ms/step':>8} {'share':>6}")
  for name, sec in rows:
    print(f"{name:<52} {sec * 1e3:>8.2f} {sec / per_step:>6.0%}")
  print(f"\nroofline of the window forward: {nbytes / 1e6:.1f} MB read at {bw / 1e9:.1f} GB/s = "
        f"{nbytes / bw * 1e3:.2f} ms; {flops / 1e6:.0f} MFLOP at {peak / 1e9:.0f} GFLOP/s = "
        f"{flops / peak * 1e3:.2f} ms; the forward costs {fwd_s / bound:.1f}x the larger")
  return dict(decode_s=decode_s, nfe=nfe, forward_s=fwd_s, bound_s=bound)


def side_by_side(args, c, params, moe_impl):
  """Section 4: the official `generate` (HF remote code, in the reference environment given by
  --reference-python / --reference-code; `tools/reference_generate.py`) against
  `llada_jax.generate` on the same checkpoint and prompt, LLaDA2.0 threshold decoding (the
  official generate's algorithm) at each of --reference-thresholds: NFE, wall time, speed-up and
  token agreement, in one run of this benchmark."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415
  import shutil  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import tempfile  # noqa: PLC0415
  code = os.path.abspath(args.reference_code)
  sources = ("modeling_llada2_moe.py", "configuration_llada2_moe.py")
  missing = [f for f in sources if not os.path.isfile(os.path.join(code, f))]
  if missing:
    raise InputError(f"--reference-code {args.reference_code}: missing {', '.join(missing)} "
                     "(the official remote code of an LLaDA2 checkpoint)")
  if not shutil.which(args.reference_python):
    raise InputError(f"--reference-python {args.reference_python}: not found")
  bl, gen = args.block_length, args.breakdown_gen
  prompt = np.random.default_rng(2).integers(0, c.vocab_size - 2, args.prompt).tolist()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "ckpt")
    llada_jax.save_hf_checkpoint(ckpt, c, params)
    for f in sources:
      shutil.copy(os.path.join(code, f), ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
      cfg = json.load(f)
    cfg["architectures"] = ["LLaDA2MoeModelLM"]
    cfg["auto_map"] = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                       "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}
    with open(os.path.join(ckpt, "config.json"), "w") as f:
      json.dump(cfg, f)
    ids_file = os.path.join(tmp, "prompt.json")
    with open(ids_file, "w") as f:
      json.dump(prompt, f)
    here = os.path.dirname(os.path.abspath(__file__))
    for thr in [float(x) for x in args.reference_thresholds.split(",")]:
      cmd = [args.reference_python, os.path.join(here, "reference_generate.py"),
             "--checkpoint", ckpt, "--prompt-ids", ids_file, "--gen-length", str(gen),
             "--block-length", str(bl), "--steps", str(args.reference_steps),
             "--threshold", str(thr), "--eos-id", str(c.eos_token_id),
             "--mask-id", str(c.mask_token_id), "--threads", str(args.reference_threads)]
      print(f"  official generate, threshold {thr} ...", flush=True)
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if done.returncode:
        raise RuntimeError(f"the reference run failed:\n{done.stderr[-3000:]}")
      ref = json.loads(done.stdout.strip().splitlines()[-1])
      out = {}

      def run(thr=thr):
        out["r"] = llada_jax.generate(
            params, c, [prompt], algorithm="llada2.0", threshold=thr, steps=args.reference_steps,
            block_length=bl, gen_length=gen, eos_early_stop=False, moe_impl=moe_impl)
        return jnp.zeros(())
      ours_s = timed(run, args.repeats)[1]
      r = out["r"]
      a, b = ref["output_ids"], r.output_ids[0]
      agree = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
      rows.append(dict(threshold=thr, nfe_official=ref["nfe"], nfe_ours=int(r.nfe[0]),
                       official_s=ref["seconds"], ours_s=ours_s,
                       speedup=ref["seconds"] / ours_s, token_agreement=agree,
                       torch=ref["torch"], threads=ref["threads"]))
  print(f"\n4) side by side with the official generate (LLaDA2.0 threshold decoding, steps "
        f"{args.reference_steps}, prompt {args.prompt} + {gen} generated, block {bl}; torch "
        f"{rows[0]['torch']}, {rows[0]['threads']} threads)")
  print(f"{'threshold':>9} {'NFE official':>13} {'NFE ours':>9} {'official s':>11} "
        f"{'ours s':>8} {'speed-up':>9} {'tokens agree':>13}")
  for x in rows:
    print(f"{x['threshold']:>9} {x['nfe_official']:>13} {x['nfe_ours']:>9} "
          f"{x['official_s']:>11.2f} {x['ours_s']:>8.3f} {x['speedup']:>8.1f}x "
          f"{x['token_agreement']:>13.3f}")
  return rows


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
  p.add_argument("--sections", default="cache,overhead",
                 help="comma-separated: cache (1), overhead (2), breakdown (3), reference (4)")
  p.add_argument("--prompt", type=int, default=768, help="breakdown: prompt tokens")
  p.add_argument("--breakdown-gen", type=int, default=256, help="breakdown: generated tokens")
  p.add_argument("--modes", default="quality,speedy", help="breakdown: decoding modes")
  p.add_argument("--head-scale", type=float, default=1.0,
                 help="multiplies the random LM head (a peakier, more confident model)")
  p.add_argument("--reference-python", default=None,
                 help="section 4: the python of a reference environment (torch, transformers)")
  p.add_argument("--reference-code", default=None,
                 help="section 4: a directory with the official modeling_llada2_moe.py and "
                      "configuration_llada2_moe.py")
  p.add_argument("--reference-thresholds", default="0.95,0.7")
  p.add_argument("--reference-steps", type=int, default=32)
  p.add_argument("--reference-threads", type=int, default=2)
  args = p.parse_args(argv)
  sections = set(args.sections.split(","))
  known = {"cache", "overhead", "breakdown", "reference"}
  if sections - known:
    raise InputError(f"--sections: unknown {sorted(sections - known)}; choose from "
                     f"{', '.join(sorted(known))}")
  if "reference" in sections and not (args.reference_python and args.reference_code):
    raise InputError("--sections reference needs --reference-python and --reference-code")
  moe_impl = parallel.resolve_moe_impl(args.moe_impl)

  c = mid_config(args)
  params = llada_jax.init_params(c, jax.random.PRNGKey(0))
  params["lm_head"] = params["lm_head"] * args.head_scale
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

  if "cache" in sections:
    cache_vs_recompute(args, decode, c, rng)
  if "overhead" in sections:
    loop_overhead(args, decode, params, c, rng, moe_impl)
  if "breakdown" in sections:
    for mode in args.modes.split(","):
      step_breakdown(params, c, moe_impl, prompt_len=args.prompt, gen=args.breakdown_gen,
                     block=bl, mode=mode, repeats=args.repeats)
  if "reference" in sections:
    side_by_side(args, c, params, moe_impl)


def cache_vs_recompute(args, decode, c, rng):
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


def loop_overhead(args, decode, params, c, rng, moe_impl):
  bl = args.block_length
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
