"""How much does `ebpo.noise` lower the variance of EBPO's gradient? One batch, many mask draws.

  python experiments/ebpo_noise_variance.py [--draws 16] [--base out/post_training/base/hf]

Takes the `post_training.py` base model (run that first), decodes G = 8 Quality-mode samples at
temperature 1 (T2T off) for each of `--prompts` (32) `bench_sort@train` prompts and scores them with `math`;
then, for each `ebpo.noise`, computes the gradient of the first EBPO update (ratio 1) of that
fixed batch under `--draws` independent mask draws (N = 2 timesteps) and reports the mean
gradient's squared norm |E g|^2, the variance E|g - E g|^2 (summed over parameters) and their
ratio (signal to noise of one draw). Writes `experiments/results/ebpo_noise_variance.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llada_jax  # noqa: E402
from experiments import post_training as P  # noqa: E402
from experiments.harness import hardware, hardware_line  # noqa: E402
from llada_jax.train import ebpo as E  # noqa: E402
from llada_jax.train import rewards as R  # noqa: E402
from llada_jax.train import toy_tasks  # noqa: E402

G = 8


def flat_grad(tree) -> jax.Array:
  return jnp.concatenate([x.astype(jnp.float32).ravel() for x in jax.tree_util.tree_leaves(tree)])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--draws", type=int, default=16)
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--base", default=os.path.join(P.OUT, "base", "hf"), help="the model (HF dir)")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  tok = P.tokenizer()
  c, params = llada_jax.load_hf_checkpoint(args.base)
  ex = toy_tasks.unique_examples(f"{P.TASK}@train", args.prompts, 99)
  prompts, answers = [tok.encode(p) for p, _ in ex], [a for _, a in ex]
  flat = [p for p in prompts for _ in range(G)]
  res = llada_jax.generate(params, c, flat, mode="quality", gen_length=P.GEN,
                           block_length=P.BLOCK, temperature=1.0, seed=0, eos_id=tok.eos_id,
                           mask_id=tok.mask_id, threshold=0.5,
                           editing_threshold=P.EDITING_THRESHOLD)
  reward = R.get_reward("math")
  r = np.array([reward(tok.decode(o), {"answer": answers[i // G]})
                for i, o in enumerate(res.output_ids)], np.float32)
  adv = jnp.asarray(E.group_advantages(r.reshape(-1, G)).reshape(-1))
  scored = [E.eos_pad(p, o, P.BLOCK, tok.eos_id) for p, o in zip(flat, res.output_ids)]
  batch = {k: jnp.asarray(v) for k, v in E.build_batch(flat, scored, P.SEQ, tok.pad_id).items()}
  rows = []
  for noise in E.NOISES:
    cfg = E.EBPOConfig(group_size=G, num_timesteps=2, block_length=P.BLOCK, moe_impl="ragged",
                       noise=noise)

    @jax.jit
    def grad(p, batch, adv, key, cfg=cfg):
      _, masks = cfg.draw_masks(key, batch["loss_mask"] & (batch["segment_ids"] >= 0))
      old = jax.lax.stop_gradient(E.policy_block_logprobs(p, c, batch, masks, P.BLOCK,
                                                           **cfg.impl))
      return flat_grad(jax.grad(lambda q: E.ebpo_loss(q, c, batch, masks, old, adv, cfg)[0])(p))

    gs = np.stack([np.asarray(grad(params, batch, adv, jax.random.PRNGKey(k)))
                   for k in range(args.draws)])
    mean = gs.mean(0)
    signal = float((mean ** 2).sum())
    var = float(((gs - mean) ** 2).sum(1).mean() * args.draws / (args.draws - 1))
    rows.append((noise, signal, var))
    print(f"{noise}: |E g|^2 {signal:.4g}, E|g - E g|^2 {var:.4g}, ratio {signal / var:.3f}",
          flush=True)
  base_var = dict((n, v) for n, _, v in rows)["independent"]
  lines = ["# EBPO's gradient variance per `ebpo.noise`", "",
           f"`python experiments/ebpo_noise_variance.py --draws {args.draws}` "
           f"({hardware_line(hardware())}; {time.perf_counter() - t0:.0f} s).", "",
           f"One batch: {args.prompts} `bench_sort@train` prompts x {G} Quality-mode rollouts (temperature 1, "
           f"T2T off) of the `post_training.py` base model, mean reward {r.mean():.3f}; the "
           f"first EBPO update's gradient (N = 2 timesteps) under {args.draws} mask draws each.",
           "", "| ebpo.noise | \\|E g\\|^2 | E\\|g - E g\\|^2 | variance vs independent | "
           "signal / noise of one draw |", "|---|---|---|---|---|"]
  for noise, signal, var in rows:
    lines.append(f"| {noise} | {signal:.4g} | {var:.4g} | {var / base_var:.2f}x | "
                 f"{signal / var:.3f} |")
  os.makedirs(args.results, exist_ok=True)
  with open(os.path.join(args.results, "ebpo_noise_variance.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
