"""Sampler benchmark: logits path (`head_logits` + `sample`) vs the LM head fused with the sampler
over vocabulary tiles (`sample_tiled`, XLA), one decode step's sampling, on this host.

For each (B, W, V) with hidden size D and each mode (greedy; plain temperature; top-k) it prints
the bytes of the `[B, W, V]` float32 logits the fused path never materialises, the temporary
buffer bytes XLA allocates for each compiled program (`memory_analysis().temp_size_in_bytes`),
and the time per step of each path (best of `--repeats`, the two paths alternating, compilation excluded) with their ratio.
Both paths include the LM head matmul (it dominates the FLOPs); the Pallas kernel
(`sampler_impl="pallas"`) is not timed here: off TPU it runs in interpret mode.

  python tools/bench_sampler.py [--shapes 1x32x32768,1x32x157184,4x32x157184,8x32x157184]
      [--hidden 2048] [--modes greedy,temperature,top_k] [--vocab-tile 8192] [--dtype float32]
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

from llada_jax.decode.update import head_logits, sample, sample_tiled

MODES = {  # name -> (greedy, temperature, top_k, top_p)
    "greedy": (True, 0.0, 0, 1.0),
    "temperature": (False, 0.8, 0, 1.0),
    "top_k": (False, 0.8, 50, 1.0),
}


def _best_pair(fa, fb, repeats: int) -> tuple[float, float]:
  """Best wall time of each of two functions, alternating them (a shared, busy host drifts)."""
  jax.block_until_ready(fa())  # compile + warm up
  jax.block_until_ready(fb())
  best = [float("inf"), float("inf")]
  for _ in range(repeats):
    for i, f in enumerate((fa, fb)):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      best[i] = min(best[i], time.perf_counter() - t0)
  return best[0], best[1]


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--shapes", default="1x32x32768,1x32x157184,4x32x157184,8x32x157184",
                 help="comma-separated BxWxV")
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--modes", default="greedy,temperature,top_k")
  p.add_argument("--vocab-tile", type=int, default=8192)
  p.add_argument("--max-candidates", type=int, default=128)
  p.add_argument("--dtype", default="float32", help="model dtype of hidden states and lm_head")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  modes = args.modes.split(",")
  d = args.hidden

  print(f"# jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}; "
        f"D={d}, {dtype.name}, vocab tile {args.vocab_tile}, K={args.max_candidates}")
  cols = ["B", "W", "V", "mode", "logits MiB avoided", "temp MiB logits", "temp MiB fused",
          "ms logits", "ms fused", "speed-up"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  rng = np.random.default_rng(0)
  lm_cache = {}
  for b, w, v in shapes:
    if v not in lm_cache:
      lm_cache.clear()
      lm_cache[v] = jnp.asarray(rng.standard_normal((d, v), np.float32) * 0.02, dtype)
    lm_head = lm_cache[v]
    hidden = jnp.asarray(rng.standard_normal((b, w, d), np.float32), dtype)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(b))
    for mode in modes:
      greedy, t, k, top_p = MODES[mode]
      knobs = (keys, jnp.float32(t), jnp.int32(k), jnp.float32(top_p))
      ref = jax.jit(lambda h, w_, *kn, greedy=greedy: sample(head_logits(h, w_), *kn,
                                                             greedy=greedy))
      fused = jax.jit(functools.partial(sample_tiled, greedy=greedy, vocab_tile=args.vocab_tile,
                                        max_candidates=args.max_candidates))
      temp = []
      for f in (ref, fused):
        mem = f.lower(hidden, lm_head, *knobs).compile().memory_analysis()
        temp.append(getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0)
      t_ref, t_fused = _best_pair(lambda: ref(hidden, lm_head, *knobs),
                                  lambda: fused(hidden, lm_head, *knobs), args.repeats)
      if greedy:  # the two paths must agree
        a, c = ref(hidden, lm_head, *knobs), fused(hidden, lm_head, *knobs)
        assert np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
      row = [b, w, v, mode, _mib(b * w * v * 4), _mib(temp[0]), _mib(temp[1]),
             f"{t_ref * 1e3:,.1f}", f"{t_fused * 1e3:,.1f}", f"{t_ref / t_fused:.2f}x"]
      print("| " + " | ".join(str(x) for x in row) + " |", flush=True)


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
