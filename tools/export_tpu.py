"""Lower the full-size model for a TPU pod on any host: `jax.export(..., platforms=("tpu",))` on an
`AbstractMesh` (no TPU, no weights: every input is a ShapeDtypeStruct carrying its sharding).

  python tools/export_tpu.py --config llada2_1_flash --mesh fsdp=4,expert=16,tensor=4 \
      [--what forward,decode,train] [--batch 8 --seq 4096] [--prompt 256 --gen 256] \
      [--moe-impl ep_ragged] [--out DIR]

Prints the mesh, the per-device parameter bytes (by the sharding rules of `llada_jax.parallel`),
and for each program the lowering time, the StableHLO size, the explicit collectives (GSPMD's own
collectives are only inserted when XLA compiles the module) and a check line: the number of
Mosaic kernels (`tpu_custom_call`) and of expert-parallel collectives (`all_to_all`,
`ragged_all_to_all`) in the program. The tool exits 1, with one `missing:` line per program on
stderr, when a requested kernel or EP path is absent: `--attention-impl pallas_tpu` (or `auto`,
which on the TPU target means the Pallas kernel) needs a `tpu_custom_call`; an expert-parallel
`--moe-impl` (`ep`: `all_to_all`, `ep_ragged`: `ragged_all_to_all`) needs its collective
whenever the experts are split over a mesh axis of size > 1.
`--out` writes each program's StableHLO text (`.mlir`) and, when the `flatbuffers` package is
installed, the serialized `Exported` (`.bin`, read back by `jax.export.deserialize`).

Programs: `forward` (logits of `--batch` x `--seq` tokens, block-causal), `decode` (the whole
`decode_jit` while-loop for `--batch` prompts of `--prompt` tokens and `--gen` new tokens), and
`train` (`llada_jax.train.trainer.bdlm_step`, the BDLM train step with AdamW on fp32 master
params and moments with the config's compute dtype inside, as the trainer runs it on a pod).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from llada_jax import parallel  # noqa: E402
from llada_jax.config import ModelConfig, get_preset  # noqa: E402
from llada_jax.model import params as params_lib  # noqa: E402

GiB = 1024 ** 3
PROGRAMS = ("forward", "decode", "train")
# Custom calls without a compatibility guarantee that the TPU program may hold.
DISABLED_CHECKS = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]


def fmt_bytes(b: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if b >= size:
      return f"{b / size:.2f} {unit}"
  return f"{int(b)} B"


def load_config(name: str, dtype: str | None) -> ModelConfig:
  c = ModelConfig.from_json_file(name) if os.path.exists(name) else get_preset(name)
  return c.replace(param_dtype=dtype, dtype=dtype) if dtype else c


def param_report(c: ModelConfig, mesh, rules) -> list[str]:
  """Per-device parameter bytes, total and by group."""
  shapes = params_lib.param_shapes(c)
  specs = parallel.param_partition_specs(c, mesh, rules)
  total = parallel.per_device_bytes(shapes, specs, mesh)
  full = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
  n = params_lib.count_params(c)
  count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
  lines = [f"params: {count}, {fmt_bytes(full)} in all; "
           f"per device {fmt_bytes(total)} ({total:,} bytes)"]
  parts = {
      "embed + lm_head": lambda t: [t["embed"], t["lm_head"], t["final_norm"]],
      "dense layers": lambda t: [t.get("dense", {})],
      "moe routed experts": lambda t: [t.get("moe", {}).get("experts", {})],
      "moe attention/router/shared": lambda t: [
          {k: v for k, v in t.get("moe", {}).items() if k != "experts"}],
  }
  for name, pick in parts.items():
    b = parallel.per_device_bytes(pick(shapes), pick(specs), mesh)
    if b:
      lines.append(f"  {name:30s} {fmt_bytes(b):>12s} per device")
  if "moe" in specs:
    lines.append(f"  expert weights [L, E, D, F]: {specs['moe']['experts']['gate']}")
  return lines


def _sds(shape, dtype, mesh, spec=None, kind=None, rules=None):
  if kind is not None:
    spec = parallel.activation_spec(kind, shape, mesh, rules)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec or P()))


COLLECTIVES = ("ragged_all_to_all", "all_to_all", "all_gather", "reduce_scatter", "all_reduce",
               "collective_permute")


def op_counts(text: str) -> dict[str, int]:
  """Occurrences in StableHLO text of each collective of `COLLECTIVES` and of Mosaic kernels
  (`tpu_custom_call`): ops and custom calls as written, not executions (an op inside a
  while-loop or scan body counts once)."""
  pats = {n: rf"stablehlo\.{n}\b" for n in COLLECTIVES}
  pats["ragged_all_to_all"] = r"@ragged_all_to_all\("
  pats["tpu_custom_call"] = r"@tpu_custom_call\("
  return {n: len(re.findall(p, text)) for n, p in pats.items()}


def _collectives(text: str) -> str:
  counts = op_counts(text)
  return ", ".join(f"{k} {counts[k]}" for k in COLLECTIVES if counts[k]) or "none"


def requirements(c: ModelConfig, mesh, rules, attention_impl: str, moe_impl) -> dict[str, str]:
  """What every lowered program must contain: op name (a key of `op_counts`) -> why.

  A Mosaic kernel when the attention is the Pallas TPU kernel; the EP path's collective when
  `moe_impl` is expert-parallel (an `EPConfig` registered by `register_ep`) and the experts
  are split over mesh axes of size > 1 (otherwise EP exchanges nothing)."""
  from llada_jax.parallel import expert_parallel as ep_lib  # noqa: PLC0415
  need = {}
  if attention_impl == "pallas_tpu":
    need["tpu_custom_call"] = f"attention_impl {attention_impl}"
  cfg = {name: cfg for cfg, name in ep_lib._REGISTERED.items()}.get(moe_impl)
  specs = parallel.param_partition_specs(c, mesh, rules)
  expert_spec = specs.get("moe", {}).get("experts", {}).get("gate")
  split = expert_spec is not None and len(expert_spec) > 1 and expert_spec[1] is not None
  if cfg is not None and split:
    op = "ragged_all_to_all" if cfg.dispatch == "ragged" else "all_to_all"
    need[op] = f"moe_impl {moe_impl} ({cfg.dispatch} dispatch)"
  return need


def check_line(counts: dict[str, int], need: dict[str, str]) -> tuple[str, str | None]:
  """(the report line, a `missing:` line or None) for one program's `op_counts`."""
  line = (f"Mosaic kernels (tpu_custom_call) {counts['tpu_custom_call']}; EP collectives: "
          f"all_to_all {counts['all_to_all']}, ragged_all_to_all {counts['ragged_all_to_all']}")
  absent = [f"{op} (requested by {why})" for op, why in need.items() if not counts[op]]
  return line, ("missing: " + "; ".join(absent)) if absent else None


def export(fn, args, kwargs, mesh):
  with jax.sharding.use_abstract_mesh(mesh):
    t0 = time.perf_counter()
    exp = jax.export.export(fn, platforms=("tpu",), disabled_checks=DISABLED_CHECKS)(
        *args, **kwargs)
    return exp, time.perf_counter() - t0


def lower_forward(c, mesh, rules, a):
  from llada_jax.model.transformer import _forward_jit  # noqa: PLC0415
  ids = _sds((a.batch, a.seq), jnp.int32, mesh, kind="tokens", rules=rules)
  params = parallel.sharded_param_shapes(c, mesh, rules)
  return export(_forward_jit, (params, c, ids, ids),
                dict(block_length=a.block_length, attention_impl=a.attention_impl,
                     moe_impl=a.moe_impl, collect=False), mesh)


def lower_decode(c, mesh, rules, a):
  from llada_jax.decode.api import prompt_bucket  # noqa: PLC0415
  from llada_jax.decode.generate import Knobs, StaticSpec, decode_jit  # noqa: PLC0415
  from llada_jax.decode.settings import DecodeSettings  # noqa: PLC0415
  bl = a.block_length
  bucket = prompt_bucket(a.prompt, bl)
  canvas_len = bucket + -(-a.gen // bl) * bl
  spec = StaticSpec(canvas_length=canvas_len, prompt_bucket=bucket, gen_length=a.gen,
                    block_length=bl, algorithm="llada2.1", mbe_window=1, greedy=True,
                    trajectory=0, attention_impl=a.attention_impl, moe_impl=a.moe_impl)
  s = DecodeSettings.for_mode("quality", gen_length=a.gen, block_length=bl).with_ids(
      c.eos_token_id, c.mask_token_id)
  knobs = jax.tree_util.tree_map(lambda x: _sds(x.shape, x.dtype, mesh),
                                 Knobs.from_settings(s))
  b = a.batch
  args = (parallel.sharded_param_shapes(c, mesh, rules), c,
          _sds((b, canvas_len), jnp.int32, mesh, kind="tokens", rules=rules),
          _sds((b,), jnp.int32, mesh, kind="rows", rules=rules),
          _sds((b, 2), jnp.uint32, mesh,
               spec=P(*parallel.activation_spec("rows", (b,), mesh, rules), None)),
          knobs, spec)
  return export(decode_jit, args, {}, mesh)


def lower_train(c, mesh, rules, a):
  """The BDLM step as the trainer runs it on a pod: fp32 master params and Adam moments, the
  config's compute dtype inside the step, AdamW with clipping, remat."""
  import optax  # noqa: PLC0415
  from llada_jax.train import trainer  # noqa: PLC0415  (raises while there is no trainer)
  from llada_jax.train.objectives import ObjectiveConfig  # noqa: PLC0415
  c = c.replace(param_dtype="float32")  # the trainer's fp32 masters (pod_config)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.1))
  ps = parallel.param_shardings(c, mesh, rules)
  params = parallel.sharded_param_shapes(c, mesh, rules)
  opt_shapes = jax.eval_shape(optimizer.init, params_lib.param_shapes(c))
  opt_sh = parallel.opt_state_shardings(opt_shapes, ps, mesh)
  opt = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                               opt_shapes, opt_sh)
  state = dict(params=params, opt_state=opt, step=_sds((), jnp.int32, mesh))
  tok = lambda dt: _sds((a.batch, a.seq), dt, mesh, kind="tokens", rules=rules)
  batch = dict(tokens=tok(jnp.int32), segment_ids=tok(jnp.int32), positions=tok(jnp.int32),
               loss_mask=tok(jnp.int32))
  oc = ObjectiveConfig(block_length=a.block_length, attention_impl=a.attention_impl,
                       moe_impl=a.moe_impl, remat=True)
  key = _sds((2,), jnp.uint32, mesh)
  return export(trainer.bdlm_step, (state, batch, key),
                dict(c=c, oc=oc, optimizer=optimizer), mesh)


LOWER = {"forward": lower_forward, "decode": lower_decode, "train": lower_train}


def mesh_and_rules(a):
  """(AbstractMesh, rules, EPConfig or None) from --parallel-config, --mesh and --rule."""
  cfg = parallel.load_parallel_config(a.parallel_config) if a.parallel_config else None
  spec = a.mesh if a.mesh else (dict(cfg.mesh) if cfg is not None else None)
  if spec is None:
    raise ValueError("give --mesh or --parallel-config")
  rules = parallel.normalize_rules(cfg.rules if cfg is not None else None,
                                   dict(r.split("=", 1) for r in a.rule))
  ep = parallel.EPConfig.from_config(cfg, rules=rules) if cfg is not None else None
  return parallel.make_abstract_mesh(spec, a.devices), rules, ep


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--config", default="llada2_1_flash", help="preset name or config.json path")
  p.add_argument("--mesh", default=None, help="e.g. fsdp=4,expert=16,tensor=4")
  p.add_argument("--parallel-config", default=None,
                 help="ml_collections parallel config file (configs/mesh_*.py): mesh, rules, "
                      "MoE dispatch; --mesh / --rule / --moe-impl override it")
  p.add_argument("--devices", type=int, default=None,
                 help="device count (needed when an axis is -1)")
  p.add_argument("--what", default="forward,decode,train",
                 help=f"comma-separated programs from {', '.join(PROGRAMS)}")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=4096, help="forward/train sequence length")
  p.add_argument("--prompt", type=int, default=256, help="decode prompt length")
  p.add_argument("--gen", type=int, default=256, help="decode tokens to generate")
  p.add_argument("--block-length", type=int, default=32)
  p.add_argument("--moe-impl", default=None,
                 help="ep_ragged (ragged_all_to_all, the TPU path; the default), ep (dense "
                      "all_to_all), ragged (no expert parallelism)")
  p.add_argument("--attention-impl", default="xla",
                 help="xla, pallas_tpu (the Mosaic kernel, sharded with shard_map), or auto "
                      "(= pallas_tpu: the TPU target's choice)")
  p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                 help="override the config's dtype")
  p.add_argument("--rule", action="append", default=[],
                 help="override a sharding rule, e.g. --rule embed=fsdp,data (repeatable)")
  p.add_argument("--out", default=None, help="write the serialized programs here")
  return p


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  try:
    c = load_config(a.config, a.dtype)
    mesh, rules, ep = mesh_and_rules(a)
    if a.moe_impl is None:
      a.moe_impl = ep if ep is not None else "ep_ragged"
    what = [w.strip() for w in a.what.split(",") if w.strip()]
    bad = sorted(set(what) - set(PROGRAMS))
    if bad:
      raise ValueError(f"--what: unknown program {bad[0]!r} (choose from {', '.join(PROGRAMS)})")
    from llada_jax.parallel.sharded import resolve_moe_impl  # noqa: PLC0415
    a.moe_impl = resolve_moe_impl(a.moe_impl, rules=rules)
    if a.attention_impl == "auto":  # "auto" on a TPU backend
      a.attention_impl = "pallas_tpu"
    from llada_jax.model.transformer import get_attention  # noqa: PLC0415
    get_attention(a.attention_impl)  # raises on an unknown name
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = mesh.size
  print(f"config {a.config}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_experts} experts top-{c.num_experts_per_tok}, {c.param_dtype}")
  print(f"mesh {parallel.format_mesh_shape(parallel.mesh_shape(mesh))} ({n} devices), "
        f"moe_impl {a.moe_impl}")
  for line in param_report(c, mesh, rules):
    print(line)
  need = requirements(c, mesh, rules, a.attention_impl, a.moe_impl)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
  status = 0
  for w in what:
    try:
      exp, secs = LOWER[w](c, mesh, rules, a)
    except ImportError as e:
      print(f"{w}: skipped ({e})")
      continue
    text = exp.mlir_module()
    shape = {"forward": f"batch {a.batch} x {a.seq} tokens",
             "decode": f"batch {a.batch}, prompt {a.prompt}, gen {a.gen}, block {a.block_length}",
             "train": f"batch {a.batch} x {a.seq} tokens, fp32 masters, AdamW, remat"}[w]
    ok = exp.nr_devices == n and exp.platforms == ("tpu",)
    status |= 0 if ok else 1
    print(f"{w} ({shape}): lowered for {exp.platforms[0]} x {exp.nr_devices} devices in "
          f"{secs:.1f} s; StableHLO {len(text) / 1e6:.2f} MB; MoE collectives: "
          f"{_collectives(text)}")
    line, missing = check_line(op_counts(text), need)
    print(f"  {w}: {line}")
    if missing:
      print(f"{w}: {missing}", file=sys.stderr)
      status |= 1
    if a.out:
      with open(os.path.join(a.out, f"{w}.mlir"), "w") as f:
        f.write(text)
      try:
        blob = exp.serialize()
      except ImportError as e:  # serialization needs the optional `flatbuffers` package
        print(f"  {w}.bin not written: {e}")
      else:
        with open(os.path.join(a.out, f"{w}.bin"), "wb") as f:
          f.write(blob)
  return status


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
