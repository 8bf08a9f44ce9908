"""Dump the float32 logits `[T, V]` of one sequence.

  python tools/logits.py --checkpoint DIR --input-ids 3,17,511 [--block-length 4] --out FILE.npy
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def parse_ids(text: str) -> list[int]:
  try:
    ids = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--input-ids must be comma-separated integers, got {text!r}") from None
  if not ids:
    raise ValueError("--input-ids is empty")
  return ids


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="HF checkpoint directory")
  p.add_argument("--input-ids", required=True, help="comma-separated token ids")
  p.add_argument("--block-length", type=int, default=None,
                 help="block-causal mask with this block length (default: bidirectional)")
  p.add_argument("--attention-impl", default="xla", help="xla | pallas | splash")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="load the weights in this dtype (default: the checkpoint's)")
  p.add_argument("--out", required=True, help="output .npy file")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  import llada_jax
  try:
    ids = parse_ids(args.input_ids)
    config, params = llada_jax.load_hf_checkpoint(args.checkpoint, dtype=args.dtype)
    if max(ids) >= config.vocab_size or min(ids) < 0:
      raise ValueError(f"--input-ids has a token outside [0, {config.vocab_size})")
    logits = llada_jax.forward(params, config, np.asarray([ids], np.int32),
                               block_length=args.block_length,
                               attention_impl=args.attention_impl)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  np.save(args.out, np.asarray(logits[0], np.float32))
  print(f"wrote {args.out}: logits {tuple(logits.shape[1:])} float32")
  return 0


if __name__ == "__main__":
  sys.exit(main())
