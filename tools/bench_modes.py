"""Decode benchmark with answers: accuracy, TPF and speed per decode setting, on exact-answer tasks.

For a byte-level LLaDA2 checkpoint trained on the toy tasks (default: the editing model that
`experiments/paper_in_miniature.py` trains into `out/miniature/editing/hf`), decodes the held-out
test split of each task in one batch per setting and prints one table row per setting:
accuracy (exact match; `pick`: either word), mean TPF, mean NFE, edits per row, tokens/s, batch
size, compile time and run time (first call minus second call, and the second call), with the
hardware and JAX version above the table (`experiments/harness.py` defines every column).

  python tools/bench_modes.py [--checkpoint DIR] [--tasks add2,rev,sort,pick] [--per-task 64]
      [--settings quality,speedy,llada2.0] [--gen-length 16] [--block-length 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = {
    "llada2.0": dict(algorithm="llada2.0", threshold=0.95),
    "quality": dict(mode="quality"),
    "speedy": dict(mode="speedy"),
    "quality+mbe2": dict(mode="quality", mbe_window=2),
    "speedy+mbe2": dict(mode="speedy", mbe_window=2),
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--checkpoint", default=os.path.join(ROOT, "out", "miniature", "editing", "hf"))
  p.add_argument("--tasks", default="add2,rev,sort,pick")
  p.add_argument("--per-task", type=int, default=64)
  p.add_argument("--settings", default="llada2.0,quality,speedy,quality+mbe2,speedy+mbe2")
  p.add_argument("--gen-length", type=int, default=16)
  p.add_argument("--block-length", type=int, default=8)
  p.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  names = [s for s in args.settings.split(",") if s]
  unknown = [s for s in names if s not in SETTINGS]
  if unknown:
    p.error(f"unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
  if not os.path.exists(os.path.join(args.checkpoint, "config.json")):
    p.error(f"no checkpoint in {args.checkpoint} (train one with "
            "`python experiments/paper_in_miniature.py --train-only`)")

  import llada_jax
  from experiments.harness import evaluate_setting, hardware_line
  from experiments.paper_in_miniature import test_set
  from llada_jax.train import toy_tasks
  from llada_jax.train.data import ByteTokenizer

  config, params = llada_jax.load_hf_checkpoint(args.checkpoint)
  if config.vocab_size < 259:
    p.error(f"{args.checkpoint} is not a byte-level model (vocab {config.vocab_size})")
  tok = ByteTokenizer(eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                      mask_id=config.mask_token_id, vocab_size=config.vocab_size)
  try:
    examples = test_set(args.per_task, [t for t in args.tasks.split(",") if t])
  except ValueError as e:
    p.error(str(e))

  print(f"{args.checkpoint}: {len(examples)} held-out prompts ({args.tasks}), gen "
        f"{args.gen_length}, block {args.block_length}, greedy")
  print(f"hardware: {hardware_line()}")
  head = (f"{'setting':>14} {'acc':>6} {'TPF':>5} {'NFE':>5} {'edits':>6} {'tok/s':>7} "
          f"{'batch':>5} {'compile s':>9} {'run s':>6}")
  print(head)
  rows = []
  for name in names:
    r = evaluate_setting(params, config, examples, tok, name=name, gen_length=args.gen_length,
                         block_length=args.block_length, score=toy_tasks.match_any,
                         **SETTINGS[name])
    rows.append(r)
    print(f"{name:>14} {r['accuracy']:>6.3f} {r['mean_tpf']:>5.2f} {r['mean_nfe']:>5.1f} "
          f"{r['edits_per_row']:>6.2f} {r['tokens_per_s']:>7.0f} {r['batch_size']:>5} "
          f"{r['compile_s']:>9.2f} {r['run_s']:>6.2f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
