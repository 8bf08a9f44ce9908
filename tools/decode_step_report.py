"""What one decode step reads, and what the decode program copies, for a config on a mesh.

  python tools/decode_step_report.py --config llada2_1_mini --mesh expert=8 \
      [--batch 1 --prompt 256 --gen 256 --block-length 32] [--attention-impl xla|pallas_tpu] \
      [--moe-impl ep_ragged] [--require-no-cache-copy]

Lowers the whole `decode_jit` loop for TPU on an `AbstractMesh` (as `tools/export_tpu.py` does:
no TPU, no weights) and prints, per device and per counted forward of the window:

  * weight bytes read: all of the device's params (an upper bound: the dense parts and the
    embedding rows are read in full) and the expected share of its experts that the window's
    B x W x K routed copies touch under uniform routing;
  * KV bytes read: the cache's capacity (what a dense XLA attention reads: every slot, masked)
    and, at mid-generation, the live slots (what a kernel that skips dead cache tiles reads);
  * every operation in the lowered program that copies an array the size of a layer's KV cache
    (concatenate, transpose, pad, copy, select, convert, broadcast of an array with a
    cache-length axis and at least a device's share of one layer's cache): a memory-bound step
    should copy none. With `--require-no-cache-copy` the tool exits 1 when a copy is found.
    Listed apart, and not counted as copies:
      updates  `dynamic_update_slice` and `scatter` producing such an array: cache writes, in
               place when the operand buffer is dead afterwards (the while-loop carry): they
               write the update's bytes, not the cache's;
      fills    `broadcast_in_dim` of a scalar (rank-0 operand) to such a shape: the cache's
               zero initialisation, once per `generate` call, outside the loop; it copies no
               cache data;
      slices   `dynamic_slice` / `gather` results of such a size: one layer's cache read by
               layer index (the XLA attention indexes the stacked `[L, B, KV, S, d]` cache per
               layer; XLA fuses such a slice into its consumer where it can, else it is a
               one-layer copy). The Pallas kernel has none: its index map reads the layer in
               place.
    Ops with a region (`scatter`) are judged by the result type on their closing line.
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import export_tpu  # noqa: E402

from llada_jax import parallel  # noqa: E402
from llada_jax.decode.api import prompt_bucket  # noqa: E402
from llada_jax.model import kv_cache  # noqa: E402
from llada_jax.model import params as params_lib  # noqa: E402

COPY_OPS = ("concatenate", "transpose", "pad", "copy", "select", "convert", "broadcast_in_dim")
UPDATE_OPS = ("dynamic_update_slice", "scatter")
FILL_OPS = ("fill",)  # broadcast_in_dim of a scalar: see the module doc
SLICE_OPS = ("dynamic_slice", "gather")
_OP = re.compile(r"stablehlo\.(\w+)")
_RESULT = re.compile(r"tensor<((?:\d+x)+)(\w+)>")
_SCALAR_OPERAND = re.compile(r":\s*\(tensor<[a-z]\w*>\)\s*->")


def _result_line(lines: list[str], i: int) -> str:
  """The line holding op i's result type: its own, or for an op with a region (a line ending
  in `({`) the closing `}) : (...) -> type` line at the same indentation."""
  line = lines[i]
  if not line.rstrip().endswith("({"):
    return line
  indent = len(line) - len(line.lstrip())
  for later in lines[i + 1:]:
    if later.startswith(" " * indent + "})") and len(later) - len(later.lstrip()) == indent:
      return later
  return line


def cache_sized_ops(text: str, cache_len: int, head_dim: int,
                    min_elements: int) -> list[tuple[str, tuple]]:
  """(op, result shape) of the ops in StableHLO `text` whose result looks like keys or values
  of the cache: a last axis of `head_dim`, another axis of at least `cache_len` slots, and at
  least `min_elements` elements. The result type is the last tensor type on the op's result
  line (`_result_line`). A `broadcast_in_dim` of a scalar is reported as op "fill"."""
  found = []
  lines = text.splitlines()
  for i, line in enumerate(lines):
    m = _OP.search(line)
    if not m or m.group(1) not in COPY_OPS + UPDATE_OPS + SLICE_OPS or "=" not in line:
      continue
    types = _RESULT.findall(_result_line(lines, i))
    if not types:
      continue
    shape = tuple(int(x) for x in types[-1][0].rstrip("x").split("x"))
    if (len(shape) >= 3 and shape[-1] == head_dim and max(shape[:-1]) >= cache_len
        and math.prod(shape) >= min_elements):
      op = m.group(1)
      if op == "broadcast_in_dim" and _SCALAR_OPERAND.search(line):
        op = "fill"
      found.append((op, shape))
  return found


def step_bytes(c, mesh, rules, batch: int, block_length: int, canvas: int, live: int):
  """Per-device bytes one window forward reads: (all params, expected expert bytes touched,
  KV capacity (`kv_cache.capacity` slots for `canvas` positions), KV live at `live` slots)."""
  shapes = params_lib.param_shapes(c)
  specs = parallel.param_partition_specs(c, mesh, rules)
  params = parallel.per_device_bytes(shapes, specs, mesh)
  experts = 0
  if "moe" in shapes:
    pick = lambda t: t["moe"]["experts"]
    local_experts = parallel.per_device_bytes(pick(shapes), pick(specs), mesh)
    copies = batch * block_length * c.num_experts_per_tok
    touched = 1 - (1 - 1 / c.num_experts) ** copies  # expected share of experts hit
    experts = local_experts * touched
  act = jax_itemsize(c.dtype)
  slots = kv_cache.capacity(canvas)
  cache_shape = (c.num_hidden_layers, batch, c.num_key_value_heads, slots, c.head_dim)
  spec = parallel.activation_spec("kv_cache", cache_shape, mesh, rules)
  shards = parallel.rules.shard_count(spec, dict(mesh.shape))
  capacity = 2 * math.prod(cache_shape) * act // shards
  return params, experts, capacity, capacity * live // slots


def jax_itemsize(dtype) -> int:
  import numpy as np  # noqa: PLC0415
  return np.dtype(dtype).itemsize


def main(argv=None) -> int:
  p = export_tpu.build_parser()
  p.description = __doc__.strip().splitlines()[0]
  p.set_defaults(config="llada2_1_mini", batch=1, what="decode")
  p.add_argument("--require-no-cache-copy", action="store_true",
                 help="exit 1 when the decode program copies a cache-sized array")
  a = p.parse_args(argv)
  try:
    c = export_tpu.load_config(a.config, a.dtype)
    mesh, rules, ep = export_tpu.mesh_and_rules(a)
    a.moe_impl = parallel.resolve_moe_impl(a.moe_impl or ep or "ep_ragged", rules=rules)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  bl = a.block_length
  canvas = prompt_bucket(a.prompt, bl) + -(-a.gen // bl) * bl
  live = a.prompt + a.gen // 2
  params, experts, capacity, live_kv = step_bytes(c, mesh, rules, a.batch, bl, canvas, live)
  fmt = export_tpu.fmt_bytes
  print(f"{a.config} on {parallel.format_mesh_shape(dict(mesh.shape))} ({mesh.size} devices), "
        f"batch {a.batch}, prompt {a.prompt}, gen {a.gen}, block {bl}, canvas {canvas} slots, "
        f"attention {a.attention_impl}, moe {a.moe_impl}")
  print("per device, per counted forward of the window:")
  print(f"  weights read: {fmt(params)} (all params)" + (
      f"; routed experts touched ~{fmt(experts)} of them" if experts else ""))
  print(f"  KV read: {fmt(capacity)} at cache capacity; {fmt(live_kv)} live at mid-generation "
        f"({live} of {canvas} slots)")
  exp, seconds = export_tpu.LOWER["decode"](c, mesh, rules, a)
  text = exp.mlir_module()
  layer_cache = a.batch * canvas * c.num_key_value_heads * c.head_dim
  ops = cache_sized_ops(text, canvas, c.head_dim, layer_cache // mesh.size)
  copies = [o for o in ops if o[0] in COPY_OPS]
  updates = [o for o in ops if o[0] in UPDATE_OPS]
  fills = [o for o in ops if o[0] in FILL_OPS]
  slices = [o for o in ops if o[0] in SLICE_OPS]
  print(f"decode program lowered in {seconds:.1f} s; one layer's cache is [B={a.batch}, "
        f"KV={c.num_key_value_heads}, S={kv_cache.capacity(canvas)}, d={c.head_dim}]")
  for title, found in (("cache-sized copies", copies),
                       ("cache-sized updates (dynamic_update_slice, scatter; in place)", updates),
                       ("cache-sized fills (broadcast of a scalar: initialisation)", fills),
                       ("cache-sized slices (dynamic_slice, gather: one layer read by index)",
                        slices)):
    print(f"  {title}: {len(found)}")
    for (op, shape), n in sorted(collections.Counter(found).items()):
      print(f"    {n} x {op} -> {list(shape)}")
  if copies and a.require_no_cache_copy:
    print(f"error: the decode program copies a cache-sized array {len(copies)} times",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
