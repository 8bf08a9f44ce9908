"""Dump the float32 logits `[T, V]` of one sequence.

  python tools/logits.py --checkpoint DIR --input-ids 3,17,511 [--block-length 4] --out FILE.npy

With `--mesh data=2,expert=4` the params are sharded over a device mesh by the default rules
and the forward runs under it with expert-parallel MoE (`llada_jax.parallel`); on a CPU host the
mesh's devices are faked (`jax_num_cpu_devices`).
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
  p.add_argument("--mesh", default=None,
                 help="run sharded on this mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, "
                      "tensor)")
  p.add_argument("--moe-impl", default=None,
                 help="MoE implementation (default: ragged; ep under --mesh)")
  p.add_argument("--out", required=True, help="output .npy file")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  import llada_jax
  try:
    ids = parse_ids(args.input_ids)
    mesh = _mesh(args.mesh) if args.mesh else None
    config, params = llada_jax.load_hf_checkpoint(args.checkpoint, dtype=args.dtype)
    if max(ids) >= config.vocab_size or min(ids) < 0:
      raise ValueError(f"--input-ids has a token outside [0, {config.vocab_size})")
    kw = dict(block_length=args.block_length, attention_impl=args.attention_impl)
    if args.moe_impl:
      kw["moe_impl"] = args.moe_impl
    if mesh is None:
      logits = llada_jax.forward(params, config, np.asarray([ids], np.int32), **kw)
    else:
      from llada_jax import parallel
      logits = parallel.sharded_forward(params, config, np.asarray([ids], np.int32), mesh, **kw)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  np.save(args.out, np.asarray(logits[0], np.float32))
  print(f"wrote {args.out}: logits {tuple(logits.shape[1:])} float32")
  return 0


def _mesh(spec: str):
  """The mesh of `spec` over the first devices; fakes CPU devices if JAX has not started yet."""
  import math

  import jax
  from llada_jax import parallel
  shape = parallel.parse_mesh_spec(spec)
  need = math.prod(shape.values())
  if need > 0:  # no -1 axis
    try:
      jax.config.update("jax_num_cpu_devices", need)
    except RuntimeError:  # backends already initialised (e.g. called from a test)
      pass
  devices = jax.devices()
  if need > 0:
    if len(devices) < need:
      raise ValueError(f"--mesh {spec} needs {need} devices, have {len(devices)} (on CPU set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={need})")
    devices = devices[:need]
  return parallel.make_mesh(shape, devices)


if __name__ == "__main__":
  sys.exit(main())
