"""Dump the float32 logits `[T, V]` of one sequence.

  python tools/logits.py --checkpoint DIR --input-ids 3,17,511 [--block-length 4] --out FILE.npy

With `--mesh data=2,expert=4` (or `auto`) the params are sharded over a device mesh by the
default rules and the forward runs under it with expert-parallel MoE (`llada_jax.forward(...,
mesh=)`); on a CPU host the mesh's devices are faked (`jax_num_cpu_devices`).
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
  p.add_argument("--checkpoint", required=True, help="HF checkpoint directory or hub id")
  p.add_argument("--input-ids", required=True, help="comma-separated token ids")
  p.add_argument("--block-length", type=int, default=None,
                 help="block-causal mask with this block length (default: bidirectional)")
  p.add_argument("--attention-impl", default="auto",
                 help="auto (the Pallas kernel on TPU, XLA elsewhere) | xla | pallas")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="load the weights in this dtype (default: the checkpoint's)")
  p.add_argument("--mesh", default=None,
                 help="run sharded on this mesh: 'auto' or sizes such as data=2,expert=4 (axes "
                      "data, fsdp, expert, tensor)")
  p.add_argument("--moe-impl", default="auto",
                 help="MoE implementation (auto: ragged; dropless expert parallelism on a mesh)")
  p.add_argument("--out", required=True, help="output .npy file")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  import llada_jax
  try:
    ids = parse_ids(args.input_ids)
    from llada_jax import parallel
    parallel.parse_mesh_spec(None if args.mesh in (None, "auto") else args.mesh)
    parallel.fake_cpu_devices(args.mesh)
    ckpt = llada_jax.checkpoint.resolve_checkpoint(args.checkpoint)
    mesh = parallel.mesh_for_checkpoint(args.mesh, ckpt, dtype=args.dtype)
    config, params = llada_jax.load_hf_checkpoint(ckpt, dtype=args.dtype, mesh=mesh)
    if max(ids) >= config.vocab_size or min(ids) < 0:
      raise ValueError(f"--input-ids has a token outside [0, {config.vocab_size})")
    logits = llada_jax.forward(params, config, np.asarray([ids], np.int32),
                               block_length=args.block_length, attention_impl=args.attention_impl,
                               moe_impl=args.moe_impl, mesh=mesh)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  np.save(args.out, np.asarray(logits[0], np.float32))
  print(f"wrote {args.out}: logits {tuple(logits.shape[1:])} float32")
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
