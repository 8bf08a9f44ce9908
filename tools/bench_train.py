"""Training-step benchmark: the block-diffusion (BDLM, 2L layout) step vs an AR step.

Both steps see the same batch of B x L tokens on the same model: the AR step is a causal forward
of L tokens with a next-token loss; the BDLM step runs the 2L `[x_t ; x_0]` layout with the
block-diffusion mask (logits on the noisy half only). Prints tokens/s and the ratio.

  python tools/bench_train.py [--seq-len 512] [--batch 4] [--block-length 32]
      [--attention-impl xla]
"""

from __future__ import annotations

import sys

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llada_jax
from llada_jax import masks, parallel
from llada_jax.model.transformer import forward_core
from llada_jax.train.objectives import ObjectiveConfig, bdlm_loss


def ar_loss(params, c, batch, key, attention_impl="xla", moe_impl="ragged"):
  """Next-token cross-entropy with a causal mask (block length 1 on the plain sequence)."""
  del key
  x = batch["tokens"]
  layout = masks.block_causal(batch["positions"], 1, batch["segment_ids"])
  logits = forward_core(params, c, x, batch["positions"], layout,
                        attention_impl=attention_impl, moe_impl=moe_impl).logits[:, :-1]
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]
  return nll.mean(), {}


def make_step(loss_fn, opt):
  @jax.jit
  def step(params, opt_state, batch, key):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def bench(step, params, opt_state, batch, repeats):
  key = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  out = step(params, opt_state, batch, key)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, opt_state, batch, jax.random.PRNGKey(i)))
    times.append(time.perf_counter() - t0)
  return compile_s, float(np.median(times))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--block-length", type=int, default=32)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--attention-impl", default="xla")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--moe-impl", default="auto",
                 help="expert implementation of both steps (auto: what the trainer picks here)")
  args = p.parse_args(argv)
  moe_impl = parallel.resolve_moe_impl(args.moe_impl)
  c = llada_jax.tiny_config(
      vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
      intermediate_size=3 * args.hidden, num_experts=args.experts, num_experts_per_tok=2,
      moe_intermediate_size=args.hidden, max_position_embeddings=max(1024, args.seq_len),
      pad_token_id=args.vocab - 2, eos_token_id=args.vocab - 2, mask_token_id=args.vocab - 1)
  params = llada_jax.init_params(c, jax.random.PRNGKey(0))
  opt = optax.adamw(1e-4)
  opt_state = opt.init(params)
  b, length = args.batch, args.seq_len
  rng = np.random.default_rng(0)
  batch = dict(tokens=jnp.asarray(rng.integers(0, args.vocab - 2, (b, length)), jnp.int32),
               segment_ids=jnp.zeros((b, length), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)),
               loss_mask=jnp.ones((b, length), bool))
  oc = ObjectiveConfig(block_length=args.block_length, attention_impl=args.attention_impl,
                       moe_impl=moe_impl)
  losses = {
      "AR (causal, L tokens)": lambda prm, bt, k: ar_loss(prm, c, bt, k, args.attention_impl,
                                                         moe_impl),
      f"BDLM (2L layout, block {args.block_length})": lambda prm, bt, k: bdlm_loss(
          prm, c, bt, k, oc),
  }
  print(f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts, vocab "
        f"{args.vocab}; batch {b} x {length} tokens; attention {args.attention_impl}; "
        f"moe_impl {moe_impl}; "
        f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}")
  rows = []
  for name, loss in losses.items():
    compile_s, run_s = bench(make_step(loss, opt), params, opt_state, batch, args.repeats)
    fwd = jax.jit(lambda prm, bt, k, loss=loss: loss(prm, bt, k)[0])
    _, fwd_s = bench(lambda prm, _, bt, k: fwd(prm, bt, k), params, None, batch, args.repeats)
    rows.append((name, compile_s, run_s, fwd_s, b * length / run_s))
  base, base_fwd = rows[0][2], rows[0][3]
  print(f"\n{'step':<34} {'compile s':>10} {'step s':>9} {'tokens/s':>10} {'vs AR':>7} "
        f"{'loss fwd s':>11} {'fwd vs AR':>10} {'bwd+update s':>13}")
  for name, comp, run, fwd_s, tps in rows:
    print(f"{name:<34} {comp:>10.1f} {run:>9.3f} {tps:>10.0f} {run / base:>6.2f}x "
          f"{fwd_s:>11.3f} {fwd_s / base_fwd:>9.2f}x {run - fwd_s:>13.3f}")
  print("\nThe BDLM forward runs 2L tokens (noisy and clean halves) against the AR step's L, so "
        "its MoE and projections cost ~2x; its attention ~4x (2L x 2L, mostly masked on CPU).")


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
