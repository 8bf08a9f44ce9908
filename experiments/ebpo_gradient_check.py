"""Does a step along EBPO's gradient raise the decoder's reward? A first-order check.

  python experiments/ebpo_gradient_check.py [--reward exact_match] [--positive-only]

Takes the `post_training.py` base model (run that first), decodes G = 8 Quality-mode samples at
temperature 1 (T2T off, as `post_training.py` decodes its M2T-trained models) for each of 64 `bench_sort@train` prompts, computes the EBPO gradient of that batch
(group-normalised advantages; `--positive-only` keeps only A > 0, i.e. ascends the ELBO of the
right answers), steps the params by `eta` along the normalised gradient, and reports for each
eta: the correlation between the rows' new log-ratios and their advantages (positive when the
step raises the ELBO of the rewarded rows) and the mean reward of fresh rollouts (2 seeds x 512).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llada_jax  # noqa: E402
from experiments import post_training as P  # noqa: E402
from llada_jax.train import ebpo as E  # noqa: E402
from llada_jax.train import rewards as R  # noqa: E402
from llada_jax.train import toy_tasks  # noqa: E402

G = 8


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reward", default="exact_match")
  ap.add_argument("--positive-only", action="store_true")
  ap.add_argument("--etas", default="0.003,0.01,0.03,0.1,0.3")
  ap.add_argument("--base", default=os.path.join(P.OUT, "base", "hf"), help="the model (HF dir)")
  args = ap.parse_args(argv)
  tok = P.tokenizer()
  c, params = llada_jax.load_hf_checkpoint(args.base)
  ex = toy_tasks.unique_examples(f"{P.TASK}@train", 64, 99)
  prompts, answers = [tok.encode(p) for p, _ in ex], [a for _, a in ex]
  reward = R.get_reward(args.reward)

  def roll(params, seed):
    flat = [p for p in prompts for _ in range(G)]
    res = llada_jax.generate(params, c, flat, mode="quality", gen_length=P.GEN,
                             block_length=P.BLOCK, temperature=1.0, seed=seed, eos_id=tok.eos_id,
                             mask_id=tok.mask_id, threshold=0.5,
                             editing_threshold=P.EDITING_THRESHOLD, max_post_steps=2)
    r = np.array([reward(tok.decode(o), {"answer": answers[i // G]})
                  for i, o in enumerate(res.output_ids)], np.float32)
    return flat, res.output_ids, r

  flat, outs, r = roll(params, 0)
  adv = E.group_advantages(r.reshape(-1, G)).reshape(-1)
  if args.positive_only:
    adv = np.maximum(adv, 0.0)
  scored = [E.eos_pad(p, o, P.BLOCK, tok.eos_id) for p, o in zip(flat, outs)]
  batch = {k: jnp.asarray(v) for k, v in E.build_batch(flat, scored, P.SEQ, tok.pad_id).items()}
  cfg = E.EBPOConfig(group_size=G, num_timesteps=2, block_length=P.BLOCK, moe_impl="dense")
  trainable = batch["loss_mask"] & (batch["segment_ids"] >= 0)
  _, masks = cfg.draw_masks(jax.random.PRNGKey(0), trainable)
  old = E.policy_block_logprobs(params, c, batch, masks, P.BLOCK, **cfg.impl)
  loss = lambda p: E.ebpo_loss(p, c, batch, masks, old, jnp.asarray(adv), cfg)[0]
  g = jax.grad(loss)(params)
  norm = jnp.sqrt(sum((x.astype(jnp.float32) ** 2).sum() for x in jax.tree_util.tree_leaves(g)))
  print(f"rollout reward {r.mean():.3f}; |grad| {float(norm):.4g}")
  print("| eta | corr(log-ratio, advantage) | fresh rollouts' reward |")
  print("|---|---|---|")
  base_reward = np.mean([roll(params, s)[2].mean() for s in (1, 2)])
  print(f"| 0 | - | {base_reward:.3f} |")
  for eta in (float(x) for x in args.etas.split(",")):
    stepped = jax.tree_util.tree_map(lambda p, d: p - eta * d / norm, params, g)
    new = E.policy_block_logprobs(stepped, c, batch, masks, P.BLOCK, **cfg.impl)
    lr, active = E.log_ratios(new, old, E.block_counts(masks, P.BLOCK), cfg)
    row = np.asarray(jnp.where(active, lr, 0).sum(-1) / jnp.maximum(active.sum(-1), 1))
    fresh = np.mean([roll(stepped, s)[2].mean() for s in (1, 2)])
    print(f"| {eta:g} | {np.corrcoef(row, adv)[0, 1]:.3f} | {fresh:.3f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
